"""What k samples per problem are worth, estimated from n >= k samples per problem.

Every estimator gives, for one problem, the expected accuracy of a method that sees a random
k-subset of the problem's n samples; the curve is the mean over problems, its 95% interval a
percentile bootstrap over problems (problems are the unit that varies, not samples).

  pass@k        some sample of the k is right (the oracle: a perfect verifier). Unbiased
                estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), c = right samples.
  majority@k    the most frequent final answer of the k is right (self-consistency, Wang et
                al. 2022). Samples with no answer do not vote; a tie counts 1/t (a uniform
                tie-break). Averaged over `draws` random k-subsets (seeded; exact at k = 1 and k = n).
  best-of-k     the sample a verifier scores highest among the k is right. Exact: sample i is the
                subset's best when it is in the subset and the other k-1 come from the m_i
                samples scored below it, so P = C(m_i, k-1) / C(n, k). Ties of score are broken
                by a seeded random order.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_at_k(answers: list, truth: str, k: int, draws: int = 256, seed: int = 0) -> float:
    """Expected accuracy of a majority vote over k of `answers` (None = no answer: no vote)."""
    if k >= len(answers):
        return _vote(answers, truth)
    if k == 1:  # exact: a vote of one is that sample's answer (a sampled estimate could exceed pass@1)
        return sum(a == truth for a in answers) / len(answers)
    rng = random.Random(seed)
    return sum(_vote(rng.sample(answers, k), truth) for _ in range(draws)) / draws


def _vote(answers: list, truth: str) -> float:
    """1 if the vote picks the truth, 1/t if it ties with t-1 others (the expected value of a
    uniform tie-break), else 0."""
    counts = Counter(a for a in answers if a is not None)
    if not counts or truth not in counts:
        return 0.0
    top = max(counts.values())
    return 1.0 / sum(c == top for c in counts.values()) if counts[truth] == top else 0.0


def best_of_k(scores: list[float], hits: list[int], k: int, seed: int = 0) -> float:
    """Expected accuracy of taking the highest-scored sample among k of n (exact)."""
    n = len(scores)
    k = min(k, n)
    rng = random.Random(seed)
    order = sorted(range(n), key=lambda i: (scores[i], rng.random()))  # ties: a random order
    total = math.comb(n, k)
    return sum(hits[i] * math.comb(rank, k - 1) for rank, i in enumerate(order)) / total


def bootstrap_ci(values: list[float], reps: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of per-problem values, resampling problems."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n (n itself included)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]
