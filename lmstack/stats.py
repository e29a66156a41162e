"""The statistics every evaluation reports: accuracy with a 95% interval, chance, paired tests.

An accuracy on n items is a binomial proportion, so it is reported with its Wilson score
interval (exact enough at small n and at 0 or 1, unlike the normal "p +- 1.96 se"). A score
is called above chance only when the whole interval lies above the chance level. Two models
scored on the same items are compared with the paired (McNemar) test: only the items where
they disagree carry information about which is better.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion with k successes out of n."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # The interval always holds p: in floating point, 0 of n gave a lower end of ~1e-18 > 0.
    return (min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half)))


def summarize(hits: list[float], chance: float | None = None) -> dict:
    """hits: 1/0 per item -> {n, correct, acc, ci, chance, above_chance}."""
    n, k = len(hits), float(sum(hits))
    lo, hi = wilson(k, n)
    out = {"n": n, "correct": k, "acc": k / n if n else float("nan"), "ci": [lo, hi]}
    if chance is not None:
        out["chance"] = chance
        out["above_chance"] = bool(n) and lo > chance
    return out


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (McNemar's exact test)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_compare(a: list[float], b: list[float]) -> dict:
    """Two models' 1/0 hits on the same items -> the difference a - b, its 95% interval and
    McNemar's exact p-value. `significant` when p < 0.05."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} items")
    n = len(a)
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    diff = (a_only - b_only) / n if n else float("nan")
    # Interval of a mean of paired differences d_i in {-1, 0, 1} (normal approximation).
    if n > 1:
        var = ((a_only + b_only) / n - diff * diff) / (n - 1)
        half = Z95 * math.sqrt(max(var, 0.0))
    else:
        half = float("nan")
    p = binom_two_sided(a_only, a_only + b_only)
    return {"n": n, "diff": diff, "ci": [diff - half, diff + half], "a_only": a_only, "b_only": b_only,
            "p_value": p, "significant": p < 0.05}


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total negative log-likelihood in nats over text of n_bytes UTF-8 bytes -> bits per byte
    (comparable across tokenizers, unlike loss per token)."""
    return nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
