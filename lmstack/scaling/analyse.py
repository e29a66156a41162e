"""What a sweep says: `lmstack scaling fit | predict | plot`.

- fit: Chinchilla's approach 3 (with bootstrap intervals) and approach 2 (iso-FLOP parabolas) on a
  sweep's runs, with N counted both ways (all parameters, and without the embeddings), the
  compute-optimal N*, D* and tokens per parameter at the sweep's budgets, beside Chinchilla's,
  Epoch AI's refit and nanochat's. Writes SWEEP/fit.json.
- predict: fit on the budgets at most a third of a larger one, predict that budget's best depth
  (the law's minimum over the depth dial, with the exact FLOPs per token of each shape) and its
  loss, then train it (2-3 seeds, and one seed of each neighbouring depth) and report the error
  against the seeds' spread and against two baselines: L(C) = a C^b + c through the best run of
  each fitted budget, and the law with Chinchilla's exponents (E, A, B refitted). SWEEP/predict.json.
- plot: iso-FLOP curves with their parabolas, the compute frontier, predicted against measured:
  PNGs and SWEEP/report.md.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from lmstack.data import load_manifest
from lmstack.scaling import laws
from lmstack.scaling.sweep import SETTINGS, Point, plan_run, read_results, sweep
from lmstack.utils import UserError, atomic_write_json, atomic_write_text, check_output_file, read_json

NANOCHAT_TOKENS_PER_PARAM = (10.5, 12.0)  # nanochat's measured compute-optimal ratio
CONVENTIONS = {"N": "all parameters", "N_ne": "without embeddings"}


def _columns(runs: list[dict], n_key: str):
    return [r[n_key] for r in runs], [r["D"] for r in runs], [r["loss"] for r in runs]


def fit_runs(runs: list[dict], n_key: str = "N", samples: int = 200, budgets=()) -> dict:
    """Both approaches on `runs` with N counted as `n_key`; allocations at `budgets`."""
    n, d, loss = _columns(runs, n_key)
    fit = laws.fit_law(n, d, loss)
    top = max(budgets) if budgets else max(r["C"] for r in runs)
    boot = laws.bootstrap(n, d, loss, fit, samples=samples, budget=top) if samples else None
    iso = laws.isoflop_fits(runs, n_key, "C_target")
    return {"convention": CONVENTIONS[n_key], "n_key": n_key, "law": vars(fit.law), "objective": fit.objective,
            "starts": fit.starts, "starts_agreeing": fit.agree, "runs": fit.runs, "intervals": boot,
            "allocation": [laws.allocation(fit.law, c) for c in sorted(set(budgets) or {top})],
            "isoflop": iso,
            "isoflop_tokens_per_param": [b["C"] / 6 / b["N_opt"] ** 2 for b in iso["budgets"] if b["N_opt"]]}


def fit_sweep(sweep_dir, samples: int = 200, out=None, quiet: bool = False) -> dict:
    """`lmstack scaling fit`: both conventions; prints a table, writes SWEEP/fit.json (or `out`)."""
    if out is not None:
        check_output_file(out, what="fit's .json file")
    if samples < 0:
        raise UserError("--bootstrap must be >= 0")
    runs = read_results(sweep_dir)
    budgets = sorted({r["C_target"] for r in runs})
    res = {"sweep": str(sweep_dir), "runs": len(runs), "budgets": budgets,
           "fits": {k: fit_runs(runs, k, samples, budgets) for k in CONVENTIONS},
           "references": {"chinchilla": laws.CHINCHILLA, "epoch_refit": laws.EPOCH_REFIT,
                          "nanochat_tokens_per_param": NANOCHAT_TOKENS_PER_PARAM}}
    atomic_write_json(Path(out) if out else Path(sweep_dir) / "fit.json", res)
    if not quiet:
        print(fit_table(res))
    return res


def fit_table(res: dict) -> str:
    """The fit as a markdown table: ours (both conventions) beside the published laws."""
    def ci(f, k):
        iv = (f.get("intervals") or {}).get(k)  # None: no resample gave a finite value
        return f" ({iv[0]:.3g}-{iv[1]:.3g})" if iv else ""

    lines = ["| law | alpha | beta | E | tokens per parameter at C | starts agreeing |", "|---|---|---|---|---|---|"]
    for f in res["fits"].values():
        law, alloc = f["law"], f["allocation"][-1]
        lines.append(f"| this sweep, N = {f['convention']} ({f['runs']} runs) | {law['alpha']:.3f}{ci(f, 'alpha')} | "
                     f"{law['beta']:.3f}{ci(f, 'beta')} | {law['E']:.3f}{ci(f, 'E')} | "
                     f"{alloc['tokens_per_param']:.3g}{ci(f, 'tokens_per_param')} at {alloc['C']:.3g} | "
                     f"{f['starts_agreeing']}/{f['starts']} |")
    for name, ref in (("Chinchilla (Hoffmann et al. 2022)", laws.CHINCHILLA),
                      ("Epoch AI's refit (Besiroglu et al. 2024)", laws.EPOCH_REFIT)):
        tpp = laws.allocation(laws.Law(**ref), 5.76e23)["tokens_per_param"]
        lines.append(f"| {name} | {ref['alpha']} | {ref['beta']} | {ref['E']} | {tpp:.1f} at 5.76e23 | |")
    lo, hi = NANOCHAT_TOKENS_PER_PARAM
    lines.append(f"| nanochat (measured) | | | | {lo}-{hi} | |")
    iso = [(k, f["isoflop"]) for k, f in res["fits"].items()]
    for k, it in iso:
        pts = ", ".join(f"C {b['C']:.2g}: N* {b['N_opt']:.3g}" + ("" if b.get("inside") else " (outside the sizes)")
                        for b in it["budgets"] if b["N_opt"])
        slope = f"; N* ~ C^{it['a']:.2f} (through the minima inside their sizes)" if it["a"] is not None else ""
        pts = pts or "no budget with 3 sizes and a valley"
        lines.append(f"\nIso-FLOP parabolas, N = {CONVENTIONS[k]}: {pts}{slope}")
    return "\n".join(lines)


# --- predict ------------------------------------------------------------------------------------

def _law_best(law, settings, budget, depths, vocab, n_key):
    """(best depth, its predicted loss, every depth's) for `budget` under `law` over the dial."""
    preds = {}
    for depth in depths:
        _, run = plan_run(settings, Point(depth, budget, 0), vocab)
        preds[depth] = float(law.loss(run[n_key], run["D"]))
    best = min(preds, key=preds.get)
    return best, preds[best], preds


def predict(sweep_dir, budget: float, seeds: int = 2, n_key: str = "N", neighbours: bool = True,
            quiet: bool = False) -> dict:
    """`lmstack scaling predict`: fit on the budgets <= budget / 3, predict, train, compare."""
    sweep_dir = Path(sweep_dir)
    if seeds < 1 or not (budget > 0 and math.isfinite(budget)):
        raise UserError("--seeds must be >= 1 and --budget a positive FLOP count")
    settings = read_json(sweep_dir / SETTINGS)
    if not isinstance(settings, dict):
        raise UserError(f"{sweep_dir} is not a sweep folder (no sweep.json)")
    runs = read_results(sweep_dir)
    fitted = [r for r in runs if r["C_target"] * 3 <= budget * (1 + 1e-9)]
    if not fitted:
        raise UserError(f"no run of this sweep has a budget of at most a third of {budget:.3g}")
    top = max(r["C_target"] for r in fitted)
    law = laws.fit_law(*_columns(fitted, n_key)).law
    vocab = load_manifest(settings["data"])["vocab_size"]
    swept = sorted({r["depth"] for r in runs})
    depths = list(range(1, 2 * max(swept) + 1))
    best, loss_pred, preds = _law_best(law, settings, budget, depths, vocab, n_key)
    frontier = {}
    for r in fitted:
        frontier[r["C_target"]] = min(frontier.get(r["C_target"], math.inf), r["loss"])
    try:
        compute = laws.fit_compute_law(list(frontier), list(frontier.values()))
        base1 = compute["predict"](budget)
    except UserError:
        base1 = None
    chin = laws.fit_with_exponents(*_columns(fitted, n_key))
    base2_depth, base2, _ = _law_best(chin, settings, budget, depths, vocab, n_key)
    train_depths = [best] + ([d for d in (best - 1, best + 1) if d >= 1] if neighbours else [])
    if not quiet:
        print(f"predict: fitted on {len(fitted)} runs (budgets up to {top:.3g}); at {budget:.3g} FLOPs "
              f"({budget / top:.1f}x) the law's best depth is {best}, loss {loss_pred:.4f}; training it with "
              f"{seeds} seed(s)" + (f" and depths {train_depths[1:]} with one" if len(train_depths) > 1 else ""),
              flush=True)
    kw = {k: settings[k] for k in ("preset", "overrides", "aspect", "head_dim")}
    sweep(settings["data"], sweep_dir, [best], [budget], seeds=seeds, **kw)
    if len(train_depths) > 1:
        sweep(settings["data"], sweep_dir, train_depths[1:], [budget], seeds=1, **kw)
    at = [r for r in read_results(sweep_dir) if r["C_target"] == budget]
    mine = [r["loss"] for r in at if r["depth"] == best]
    measured = statistics.mean(mine)
    spread = statistics.stdev(mine) if len(mine) > 1 else None
    by_depth = {}
    for r in at:
        by_depth.setdefault(r["depth"], []).append(r["loss"])
    measured_best = min(by_depth, key=lambda k: statistics.mean(by_depth[k]))
    res = {"budget": budget, "fitted_runs": len(fitted), "largest_fitted_budget": top, "n_key": n_key,
           "law": vars(law), "predicted": {"depth": best, "loss": loss_pred, "by_depth": preds},
           "measured": {"depth": best, "losses": mine, "mean": measured, "seed_std": spread,
                        "by_depth": {k: statistics.mean(v) for k, v in sorted(by_depth.items())},
                        "best_depth": measured_best},
           "error": loss_pred - measured,
           "baselines": {"compute_law": None if base1 is None else {"loss": base1, "error": base1 - measured,
                                                                    "law": {k: compute[k] for k in "abc"}},
                         "chinchilla_exponents": {"loss": base2, "depth": base2_depth, "error": base2 - measured,
                                                  "law": vars(chin)}}}
    atomic_write_json(sweep_dir / "predict.json", res)
    if not quiet:
        print(predict_table(res))
    return res


def predict_table(res: dict) -> str:
    m, s = res["measured"], res["measured"]["seed_std"]
    noise = f" +- {s:.4f} (seed std, {len(m['losses'])} seeds)" if s is not None else " (one seed)"
    rows = [("the law fitted here (approach 3)", res["predicted"]["loss"], res["error"], res["predicted"]["depth"])]
    b = res["baselines"]
    if b["compute_law"]:
        rows.append(("L(C) = a C^b + c through the fitted budgets' best runs", b["compute_law"]["loss"],
                     b["compute_law"]["error"], None))
    rows.append(("Chinchilla's exponents, E, A, B refitted", b["chinchilla_exponents"]["loss"],
                 b["chinchilla_exponents"]["error"], b["chinchilla_exponents"]["depth"]))
    lines = [f"At {res['budget']:.3g} FLOPs ({res['budget'] / res['largest_fitted_budget']:.1f}x the largest fitted "
             f"budget): measured {m['mean']:.4f}{noise} at depth {m['depth']}; best measured depth "
             f"{m['best_depth']} ({', '.join(f'{k}: {v:.4f}' for k, v in m['by_depth'].items())})",
             "", "| predictor | predicted loss | error | best depth |", "|---|---|---|---|"]
    for name, loss, err, depth in rows:
        lines.append(f"| {name} | {loss:.4f} | {err:+.4f} | {'' if depth is None else depth} |")
    return "\n".join(lines)


# --- plot -----------------------------------------------------------------------------------------

def plot(sweep_dir, out=None, n_key: str = "N") -> list[Path]:
    """isoflop.png, frontier.png and predicted.png (if predict ran), and report.md beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    runs = read_results(sweep_dir)  # before anything is written: a missing sweep is one line
    out = Path(out) if out else sweep_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file (name a folder for the PNGs and report.md)")
    out.mkdir(parents=True, exist_ok=True)
    pred = read_json(sweep_dir / "predict.json")
    held = pred["budget"] if isinstance(pred, dict) else None
    fitted = [r for r in runs if held is None or r["C_target"] * 3 <= held * (1 + 1e-9)]
    if isinstance(pred, dict) and pred.get("n_key") == n_key:  # the law predict fitted on these very runs
        law = laws.Law(**pred["law"])
    else:
        law = laws.fit_law(*_columns(fitted, n_key)).law
    iso = laws.isoflop_fits(fitted, n_key, "C_target")
    files = []
    budgets = sorted({r["C_target"] for r in runs})
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c, col in zip(budgets, colors):
        rs = sorted((r for r in runs if r["C_target"] == c), key=lambda r: r[n_key])
        ax.scatter([r[n_key] for r in rs], [r["loss"] for r in rs], color=col, label=f"C = {c:.2g}", zorder=3)
        ax.plot([r[n_key] for r in rs], [law.loss(r[n_key], r["D"]) for r in rs], color=col, lw=1, alpha=0.6)
        b = next((b for b in iso["budgets"] if b["C"] == c), None)
        if b and b["N_opt"]:
            p0, p1, p2 = b["parabola"]
            ns = np.geomspace(rs[0][n_key] / 1.3, rs[-1][n_key] * 1.3, 100)
            x = np.log(ns)
            ax.plot(ns, p0 + p1 * x + p2 * x * x, color=col, lw=1, ls=":")
    ax.set(xscale="log", xlabel=f"N ({CONVENTIONS[n_key]})", ylabel="validation loss (nats/token)",
           title="iso-FLOP curves: runs, the law at their N and D (solid), parabolas (dotted)")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "isoflop.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    cs = np.geomspace(min(budgets) / 3, max(budgets) * 10, 50)
    ax.plot(cs, [laws.allocation(law, c)["N"] for c in cs], label="approach 3: N*(C)")
    pts = [b for b in iso["budgets"] if b["N_opt"]]
    if pts:
        ax.scatter([b["C"] for b in pts], [b["N_opt"] for b in pts], color="C1", label="approach 2: parabola minima")
    best = {}
    for r in runs:
        if r["C_target"] not in best or r["loss"] < best[r["C_target"]]["loss"]:
            best[r["C_target"]] = r
    ax.scatter(list(best), [r[n_key] for r in best.values()], marker="x", color="k", label="best run of each budget")
    ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=f"N* ({CONVENTIONS[n_key]})",
           title="the compute-optimal frontier")
    ax.legend(fontsize=8)
    files.append(_save(fig, out / "frontier.png"))

    if held is not None:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for r in runs:
            kept = r["C_target"] * 3 <= held * (1 + 1e-9)
            ax.scatter(law.loss(r[n_key], r["D"]), r["loss"], color="C0" if kept else "C3",
                       marker="o" if kept else "*", s=30 if kept else 90)
        lo, hi = min(r["loss"] for r in runs) * 0.97, max(r["loss"] for r in runs) * 1.03
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.set(xlabel="predicted loss", ylabel="measured loss", title="fitted runs (o) and the held-out budget (*)")
        files.append(_save(fig, out / "predicted.png"))

    res = read_json(sweep_dir / "fit.json")
    md = [f"# Scaling sweep {sweep_dir}", "", f"{len(runs)} runs, budgets {', '.join(f'{c:.2g}' for c in budgets)}.",
          ""]
    if isinstance(res, dict):
        md += [fit_table(res), ""]
    if isinstance(pred, dict):
        md += [predict_table(pred), ""]
    md += [f"![{f.stem}]({f.name})" for f in files]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return files + [out / "report.md"]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
