"""An injection classifier for untrusted text: does this document, tool result or page carry
instructions for the assistant?

Logistic regression on hashed features (the "hashing trick": no vocabulary to store): word
unigrams and bigrams, and character 3-5-grams, each hashed with CRC-32 (stable across runs,
unlike Python's salted `hash`) into 2**18 buckets; a text's features are its distinct buckets,
weighted 1/sqrt(count) so long and short texts score on one scale. Before hashing the text is
lowercased and every zero-width character becomes a visible "§", so a run of invisible
characters is itself a feature. Trained and scored with numpy. Saved as classifier.npz (weights) + classifier.json (its settings).
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np

from lmstack.utils import UserError, atomic_file, atomic_write_json

BUCKETS = 1 << 18
CHAR_NGRAMS = (3, 4, 5)
ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"
_ZW = str.maketrans({c: "§" for c in ZERO_WIDTH})
_WORD = re.compile(r"\w+|[^\w\s]")


def normalise(text: str) -> str:
    return " ".join(text.lower().translate(_ZW).split())


def features(text: str) -> np.ndarray:
    """The distinct hashed buckets of a text."""
    t = normalise(text)
    words = _WORD.findall(t)
    grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    padded = f" {t} "
    grams += [f"c:{padded[i:i + n]}" for n in CHAR_NGRAMS for i in range(len(padded) - n + 1)]
    return np.unique(np.fromiter((zlib.crc32(g.encode()) % BUCKETS for g in grams), dtype=np.int64,
                                 count=len(grams)))


class InjectionClassifier:
    """`score(text)` -> P(the text carries planted instructions); `flag(text)`: score >= threshold."""

    def __init__(self, weights: np.ndarray, bias: float, threshold: float = 0.5):
        self.weights, self.bias, self.threshold = weights.astype(np.float32), float(bias), threshold

    def score(self, text: str) -> float:
        f = features(text)
        if not len(f):
            return 1 / (1 + math.exp(-self.bias))
        z = float(self.weights[f].sum()) / math.sqrt(len(f)) + self.bias
        return 1 / (1 + math.exp(-z))

    def flag(self, text: str) -> bool:
        return self.score(text) >= self.threshold

    def save(self, folder: str | os.PathLike) -> None:
        """classifier.npz + classifier.json in `folder` (each written to a temp file, then renamed)."""
        folder = Path(folder)
        with atomic_file(folder / "classifier.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, weights=self.weights)
        atomic_write_json(folder / "classifier.json", {"bias": self.bias, "threshold": self.threshold,
                                                        "buckets": BUCKETS, "char_ngrams": list(CHAR_NGRAMS)})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "InjectionClassifier":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "classifier.json").read_text())
            weights = np.load(folder / "classifier.npz")["weights"]
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            raise UserError(f"{folder} is not an injection classifier folder ({e})")
        if meta.get("buckets") != BUCKETS or len(weights) != BUCKETS:
            raise UserError(f"{folder}: classifier made with {meta.get('buckets')} buckets; this lmstack uses {BUCKETS}")
        return cls(weights, meta["bias"], meta.get("threshold", 0.5))


def train(texts: list[str], labels: list[int], steps: int = 300, lr: float = 0.2, l2: float = 1e-6) -> InjectionClassifier:
    """Fit the classifier on texts labelled 1 (planted instructions) or 0 (clean): full-batch
    Adam on the mean logistic loss plus an L2 penalty. The gradient of a sparse linear model is a
    bincount over the texts' buckets, so numpy does it in milliseconds a step."""
    if len(texts) != len(labels) or not texts or len(set(labels)) < 2:
        raise UserError("the classifier needs texts of both labels")
    feats = [features(t) for t in texts]
    idx = np.concatenate(feats)
    row = np.repeat(np.arange(len(feats)), [len(f) for f in feats])
    per = np.concatenate([np.full(len(f), 1 / math.sqrt(max(len(f), 1))) for f in feats])
    y = np.asarray(labels, dtype=np.float64)
    params = np.zeros(BUCKETS + 1)  # the weights, then the bias
    m, v = np.zeros_like(params), np.zeros_like(params)
    for t in range(1, steps + 1):
        z = np.bincount(row, weights=params[idx] * per, minlength=len(y)) + params[-1]
        err = (1 / (1 + np.exp(-z)) - y) / len(y)  # d(mean logistic loss)/dz
        grad = np.empty_like(params)
        grad[:-1] = np.bincount(idx, weights=err[row] * per, minlength=BUCKETS) + 2 * l2 * params[:-1]
        grad[-1] = err.sum()
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad ** 2
        params -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return InjectionClassifier(params[:-1], params[-1])


def confusion(clf: InjectionClassifier, texts: list[str], labels: list[int]) -> dict:
    """Precision, recall and the false-positive rate on clean texts (with the counts behind them)."""
    flags = [clf.flag(t) for t in texts]
    tp = sum(f and y for f, y in zip(flags, labels))
    fp = sum(f and not y for f, y in zip(flags, labels))
    pos = sum(labels)
    neg = len(labels) - pos
    return {"tp": tp, "fp": fp, "positives": pos, "negatives": neg,
            "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / pos if pos else None,
            "false_positive_rate": fp / neg if neg else None}
