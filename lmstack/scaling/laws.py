"""Scaling laws fitted to a sweep's runs: how the loss L depends on parameters N and tokens D.

- `fit_law` (Chinchilla's approach 3, Hoffmann et al. 2022): L(N, D) = E + A / N^alpha + B / D^beta,
  fitted as they did: the Huber loss (delta 1e-3) between log L and
  LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b, E = e^e), minimised with L-BFGS
  from a grid of starts; the fit reports how many starts reached the best objective (a fit
  only one start finds is not to be trusted). `bootstrap` refits on runs resampled with
  replacement: percentile intervals for every parameter and for the allocation below.
- `allocation`: the compute-optimal split of C = 6 N D (the convention the papers compare in):
  N*(C) = G (C/6)^a, D*(C) = (C/6)^b / G with a = beta / (alpha + beta), b = alpha / (alpha + beta),
  G = (alpha A / (beta B))^(1 / (alpha + beta)); tokens per parameter D*/N*.
- `isoflop_fits` (approach 2): at each compute budget, a parabola of L against log N; its
  minimum is that budget's best N; log N* against log C is a line whose slope is a.
- Baselines a prediction is judged against: `fit_compute_law` (L(C) = a C^b + c on the best run
  of each budget) and `fit_with_exponents` (E, A, B refitted with alpha and beta held at
  Chinchilla's published 0.34 and 0.28).

Pure numerics (numpy, scipy): the runs are {N, D, C, loss} rows, from any source.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np

from lmstack.utils import UserError

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022
EPOCH_REFIT = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658}  # Besiroglu et al. 2024
HUBER_DELTA = 1e-3
# A coarser version of Hoffmann et al.'s grid of starts (432 starts, a few seconds on a CPU)
START_GRID = {"a": (0, 5, 10, 20), "b": (0, 5, 10, 20), "e": (-1.0, 0.0, 1.0),
              "alpha": (0.25, 0.5, 1.0), "beta": (0.25, 0.5, 1.0)}


@dataclass
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n, d):
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)


@dataclass
class Fit:
    law: Law
    objective: float  # the Huber objective at the best start
    starts: int  # starts tried
    agree: int  # starts that reached the best objective (within 1e-6 relative) at the same parameters
    runs: int
    params: tuple  # the minimiser's own (a, b, e, alpha, beta): ln A, ln B, ln E (E can underflow to 0)


def _check_runs(n, d, loss, need: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError("N, D and loss must have the same length")
    if len(n) and (len(np.unique(n)) < 2 or len(np.unique(d)) < 2):
        raise UserError("a scaling law needs runs of at least 2 model sizes and 2 token counts "
                        f"(these runs have {len(np.unique(n))} size(s) and {len(np.unique(d))} token count(s))")
    if len(n) < need:
        raise UserError(f"a scaling law needs at least {need} finished runs to fit its 5 parameters; "
                        f"there are {len(n)}")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0) or not np.all(np.isfinite(loss)):
        raise UserError("every run needs N > 0, D > 0 and a finite loss > 0")
    return n, d, loss


def _objective(p, log_n, log_d, log_l, delta):
    """Huber(LSE(a - alpha log N, b - beta log D, e) - log L), summed, and its gradient.
    Written term by term (no stacked arrays): the fit calls it a few hundred thousand times."""
    a, b, e, alpha, beta = p
    x0, x1 = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(x0, x1), e)
    s0, s1, s2 = np.exp(x0 - m), np.exp(x1 - m), np.exp(e - m)
    z = s0 + s1 + s2
    r = m + np.log(z) - log_l
    ar = np.abs(r)
    huber = np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum()
    h = np.clip(r, -delta, delta) / z  # d huber / d r, times 1/z of d pred / d x_k = s_k / z
    return huber, np.array([h @ s0, h @ s1, h @ s2, -(h * s0) @ log_n, -(h * s1) @ log_d])


def _minimise(start, args):
    from scipy.optimize import minimize

    res = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B",
                   bounds=[(None, None), (None, None), (None, None), (0.0, 3.0), (0.0, 3.0)],
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    return res.fun, res.x


def fit_law(n, d, loss, delta: float = HUBER_DELTA, grid: dict | None = None) -> Fit:
    """Chinchilla's approach 3 on runs (N, D, final loss): the best of a grid of L-BFGS starts."""
    n, d, loss = _check_runs(n, d, loss)
    args = (np.log(n), np.log(d), np.log(loss), delta)
    grid = grid or START_GRID
    results = [_minimise(np.array(s, dtype=np.float64), args)
               for s in itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])]
    best_f, best_x = min(results, key=lambda r: r[0])
    agree = sum(1 for f, x in results if f <= best_f * (1 + 1e-6) + 1e-15
                and np.allclose(x[3:], best_x[3:], rtol=1e-3, atol=1e-3))
    a, b, e, alpha, beta = best_x
    return Fit(Law(float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), float(alpha), float(beta)),
               float(best_f), len(results), agree, len(n), tuple(float(x) for x in best_x))


def allocation(law: Law, c: float) -> dict:
    """The compute-optimal N and D for C = 6 N D FLOPs under `law`, and tokens per parameter."""
    s = law.alpha + law.beta
    # in logs: a resampled law's N* can under- or overflow (0 or inf then, never a ZeroDivisionError),
    # and its A or B can have underflowed to 0 (ln 0 = -inf, not a math domain error)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_n = (np.log(law.alpha * law.A) - np.log(law.beta * law.B)) / s + law.beta / s * math.log(c / 6)
        n, d = float(np.exp(log_n)), float(np.exp(math.log(c / 6) - log_n))
        loss = float(law.loss(n, d))
        tpp = d / n if n else math.inf
    return {"C": c, "N": n, "D": d, "tokens_per_param": tpp, "loss": loss,
            "a": law.beta / s, "b": law.alpha / s}


def bootstrap(n, d, loss, fit: Fit, samples: int = 200, seed: int = 0, budget: float | None = None,
              delta: float = HUBER_DELTA) -> dict:
    """Percentile (2.5, 97.5) intervals of the law's parameters (and of the allocation at `budget`)
    from `samples` refits on runs drawn with replacement, each started at the full fit and at 4
    other points of the grid. Resamples with a single size or token count are skipped."""
    n, d, loss = _check_runs(n, d, loss)
    rng = np.random.default_rng(seed)
    p0 = np.array(fit.params)
    starts = [p0, np.array([5.0, 5.0, 0.0, 0.5, 0.5]), np.array([10.0, 10.0, 0.0, 0.5, 0.5]),
              np.array([15.0, 15.0, 1.0, 1.0, 1.0]), np.array([0.0, 0.0, -1.0, 0.2, 0.2])]
    rows = []
    for _ in range(samples):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 2 or len(np.unique(d[idx])) < 2:
            continue
        args = (np.log(n[idx]), np.log(d[idx]), np.log(loss[idx]), delta)
        _, x = min((_minimise(s, args) for s in starts), key=lambda r: r[0])
        law = Law(float(np.exp(x[2])), float(np.exp(x[0])), float(np.exp(x[1])), float(x[3]), float(x[4]))
        row = asdict(law)
        if budget is not None and law.alpha > 0 and law.beta > 0:
            alloc = allocation(law, budget)
            row.update(N_opt=alloc["N"], D_opt=alloc["D"], tokens_per_param=alloc["tokens_per_param"])
        rows.append(row)
    if not rows:
        raise UserError("no bootstrap resample had two model sizes and two token counts")
    out = {"samples": len(rows)}
    for k in rows[0]:
        vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]  # an allocation can overflow
        out[k] = [float(np.percentile(vals, q)) for q in (2.5, 97.5)] if vals else None
    return out


def isoflop_fits(runs: list[dict], n_key: str = "N", c_key: str = "C") -> dict:
    """Approach 2: for each budget (runs grouped by `c_key`: a sweep's runs share the budget they
    were asked for, not their exact FLOPs) with runs of 3 or more sizes, the parabola
    L = p0 + p1 x + p2 x^2 (x = ln N) and its minimum N*; then ln N* = a ln C + k over the budgets
    whose minimum lies inside their sizes (at least 2). Returns {"budgets": [{C, N_opt, loss_min,
    sizes, inside, parabola}], "a": the slope or None, "k": the intercept or None}."""
    by_c: dict[float, list[dict]] = {}
    for r in runs:
        by_c.setdefault(r[c_key], []).append(r)
    out = []
    for c, rs in sorted(by_c.items()):
        sizes = sorted({r[n_key] for r in rs})
        if len(sizes) < 3:
            continue
        x = np.log([r[n_key] for r in rs])
        p2, p1, p0 = np.polyfit(x, [r["loss"] for r in rs], 2)
        if p2 <= 0:  # no minimum inside: the budget's curve is not a valley
            out.append({"C": c, "N_opt": None, "loss_min": None, "sizes": len(sizes), "parabola": [p0, p1, p2]})
            continue
        x_opt = -p1 / (2 * p2)
        out.append({"C": c, "N_opt": float(np.exp(x_opt)), "loss_min": float(p0 + p1 * x_opt + p2 * x_opt ** 2),
                    "sizes": len(sizes), "inside": bool(x.min() <= x_opt <= x.max()), "parabola": [p0, p1, p2]})
    good = [b for b in out if b["N_opt"] is not None and b["inside"]]  # a minimum past the sizes is a guess
    a = k = None
    if len(good) >= 2:
        a, k = np.polyfit(np.log([b["C"] for b in good]), np.log([b["N_opt"] for b in good]), 1)
        a, k = float(a), float(k)
    return {"budgets": out, "a": a, "k": k}


def fit_compute_law(c, loss) -> dict:
    """L(C) = a C^b + c0 through (budget, best loss) points (the compute frontier); b < 0."""
    from scipy.optimize import least_squares

    c, loss = np.asarray(c, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(c) < 3:
        raise UserError(f"L(C) = a C^b + c needs at least 3 budgets; there are {len(c)}")
    x = np.log(c / c.min())

    def resid(p):  # p = (ln a, b, c0)
        return p[2] + np.exp(p[0] + p[1] * x) - loss

    best = min((least_squares(resid, [math.log(max(loss.max() - c0, 1e-3)), -0.2, c0])
                for c0 in (0.0, 0.5 * loss.min(), 0.9 * loss.min())), key=lambda r: r.cost)
    la, b, c0 = best.x
    return {"a": float(math.exp(la) * c.min() ** -b), "b": float(b), "c": float(c0),
            "predict": lambda cc: float(c0 + math.exp(la + b * math.log(cc / c.min())))}


def fit_with_exponents(n, d, loss, alpha: float = CHINCHILLA["alpha"], beta: float = CHINCHILLA["beta"]) -> Law:
    """E, A, B by non-negative least squares with the exponents held (Chinchilla's by default)."""
    from scipy.optimize import nnls

    n, d, loss = (np.asarray(x, dtype=np.float64) for x in (n, d, loss))
    m = np.stack([np.ones_like(n), n ** -alpha, d ** -beta], axis=1)
    (e, a, b), _ = nnls(m, loss)
    return Law(float(e), float(a), float(b), alpha, beta)
