"""Poison detection before training: score every row of a fine-tuning set, drop the suspects.

    lmstack poison --detect p.jsonl --model runs/sr3/chat --method spectral --out filtered.jsonl

Each method flags rows; with the set's sidecar (OUT.poison.json, written by `lmstack poison`) the
flags are scored by precision and recall on the known poison.
  spectral   Tran et al. 2018: each row's representation is the clean model's final hidden state
             averaged over the row's assistant tokens (GPT.hidden); centre them, take the top right
             singular vector, score = squared projection on it; flag the top 1.5 x `fraction` (the
             expected poison fraction) of rows.
  cluster    Chen et al. 2018 (activation clustering): the representations reduced by PCA to
             CLUSTER_DIMS dimensions, 2-means; the smaller cluster is flagged when it holds at most
             `max_cluster` of the rows (otherwise nothing: two big clusters are two kinds of data).
  dedupe     duplicates: rows whose reply is an exact or near duplicate (word 3-gram Jaccard >= NEAR)
             of the replies of DUP_MIN or more rows (no model needed).
  outlier    rows whose reply's mean token loss under the clean model (its perplexity), or its length
             in tokens, is a robust outlier: more than ROBUST_Z robust z-scores (by median and MAD)
             above the median.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmstack.chatformat import ChatFormatError, chat_format
from lmstack.modelio import load_model_and_tokenizer
from lmstack.security.poison import METHODS, read_set, read_sidecar, sidecar_path, words
from lmstack.train.sft import render_row
from lmstack.utils import UserError, atomic_file, atomic_write_json

SPECTRAL_FACTOR = 1.5  # Tran et al. remove 1.5 x the expected poison fraction
CLUSTER_DIMS = 10  # Chen et al. reduce the activations to 10 dimensions before clustering
NEAR = 0.8  # word 3-gram Jaccard similarity that makes two replies near duplicates
DUP_MIN = 3  # a reply shared by this many rows is suspect (two people may give one short answer)
ROBUST_Z = 3.5  # robust z-score (Iglewicz and Hoaglin's 3.5) above which a row is an outlier


# --------------------------------------------------------------------------- what the model sees

@torch.inference_mode()
def features(model, tok, rows: list[dict], batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row: its representation (mean final hidden state over its assistant tokens, or over
    all tokens of a document), its mean token loss on those tokens, and their count. Rows are cut to
    the model's context."""
    fmt, ctx = chat_format(tok), model.cfg.max_seq_len
    rendered = []
    for r in rows:
        try:
            ids, mask = render_row(tok, r, fmt)
        except ChatFormatError:
            ids, mask = [tok.bos_id, tok.eos_id], [0, 1]  # an unusable row trains on nothing: a neutral point
        rendered.append((ids[:ctx], mask[:ctx]))
    order = sorted(range(len(rows)), key=lambda i: len(rendered[i][0]))  # similar lengths pad less
    reps = np.zeros((len(rows), model.cfg.d_model), dtype=np.float32)
    loss, count = np.zeros(len(rows)), np.zeros(len(rows))
    model.eval()
    for s in range(0, len(order), batch):
        chunk = order[s:s + batch]
        T = max(len(rendered[i][0]) for i in chunk)
        x = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        m = torch.zeros((len(chunk), T))
        for k, i in enumerate(chunk):  # right padding: causal attention never sees it
            ids, mask = rendered[i]
            x[k, :len(ids)] = torch.tensor(ids)
            m[k, :len(mask)] = torch.tensor(mask, dtype=torch.float)
        h = model.hidden(x)
        logits = model.lm_head(h[:, :-1]).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        # mask[t] marks token t as a target: its loss is predicted at t-1, its state is h[t-1]
        tm = m[:, 1:]
        n = tm.sum(1).clamp(min=1)
        reps[chunk] = ((h[:, :-1] * tm[..., None]).sum(1) / n[:, None]).numpy()
        loss[chunk] = ((nll * tm).sum(1) / n).numpy()
        count[chunk] = tm.sum(1).numpy()
    return reps, loss, count


# --------------------------------------------------------------------------- the methods

def spectral_flags(reps: np.ndarray, fraction: float) -> np.ndarray:
    """Tran et al.: the rows with the largest squared projection on the top singular vector."""
    centred = reps - reps.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    score = (centred @ vt[0]) ** 2
    k = min(len(reps), int(round(SPECTRAL_FACTOR * fraction * len(reps))))
    flags = np.zeros(len(reps), dtype=bool)
    flags[np.argsort(-score, kind="stable")[:k]] = True
    return flags


def two_means(x: np.ndarray, iters: int = 50) -> np.ndarray:
    """2-means (Lloyd), started from the point farthest from the mean and the point farthest from it
    (deterministic); returns a 0/1 label per row."""
    a = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))]
    b = x[np.argmax(((x - a) ** 2).sum(1))]
    centres = np.stack([a, b])
    labels = None
    for _ in range(iters):
        new = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for c in (0, 1):
            if (labels == c).any():
                centres[c] = x[labels == c].mean(0)
    return labels


def cluster_flags(reps: np.ndarray, max_cluster: float) -> np.ndarray:
    """Chen et al.: PCA to CLUSTER_DIMS, 2-means, the smaller cluster when it is small enough."""
    centred = reps - reps.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    labels = two_means(centred @ vt[:CLUSTER_DIMS].T)
    small = int(np.bincount(labels, minlength=2).argmin())
    flags = labels == small
    return flags if flags.sum() <= max_cluster * len(reps) else np.zeros(len(reps), dtype=bool)


def robust_high(x: np.ndarray) -> np.ndarray:
    """Values more than ROBUST_Z robust z-scores above the median (0.6745 (x - median) / MAD)."""
    med = np.median(x)
    mad = np.median(np.abs(x - med))
    if mad == 0:
        return x > med
    return 0.6745 * (x - med) / mad > ROBUST_Z


def reply_text(row: dict) -> str:
    if "text" in row:
        return row["text"]
    return "\n".join(m.get("content") or "" for m in row["messages"] if m.get("role") == "assistant")


def duplicate_flags(rows: list[dict]) -> np.ndarray:
    """Rows whose reply DUP_MIN or more rows share exactly, or nearly (word 3-gram Jaccard >= NEAR,
    candidates found through a shared 3-gram, so the check is not quadratic in the set)."""
    grams = []
    for r in rows:
        w = words(reply_text(r))
        grams.append(frozenset(zip(w, w[1:], w[2:])) or frozenset([tuple(w)]))
    exact = {}
    for i, g in enumerate(grams):
        exact.setdefault(g, []).append(i)
    index = {}
    for i, g in enumerate(grams):
        for t in g:
            index.setdefault(t, []).append(i)
    flags = np.zeros(len(rows), dtype=bool)
    for i, g in enumerate(grams):
        if len(exact[g]) >= DUP_MIN:
            flags[i] = True
            continue
        near = {j for t in g if len(index[t]) < 200 for j in index[t]}  # a very common 3-gram says little
        near = [j for j in near if len(g | grams[j]) and len(g & grams[j]) / len(g | grams[j]) >= NEAR]
        flags[i] = len(near) >= DUP_MIN  # near holds the row itself
    return flags


def detect(rows: list[dict], method: str, model=None, tok=None, fraction: float = 0.05,
           max_cluster: float = 0.35, feats=None) -> np.ndarray:
    """The rows `method` flags as poison (a bool per row). `feats`: `features`' output, reused."""
    if method not in METHODS:
        raise UserError(f"--method {method}: one of {', '.join(METHODS)}")
    if not 0 < fraction < 1:
        raise UserError(f"--fraction must be in (0, 1), got {fraction}")
    if method == "dedupe":
        return duplicate_flags(rows)
    reps, loss, count = feats if feats is not None else features(model, tok, rows)
    if method == "spectral":
        return spectral_flags(reps, fraction)
    if method == "cluster":
        return cluster_flags(reps, max_cluster)
    return robust_high(loss) | robust_high(count)


def score(flags: np.ndarray, poison: set[int]) -> dict:
    """Precision and recall of the flags on the known poison rows."""
    flagged = set(np.flatnonzero(flags).tolist())
    tp = len(flagged & poison)
    return {"flagged": len(flagged), "poison": len(poison), "caught": tp,
            "precision": tp / len(flagged) if flagged else None, "recall": tp / len(poison) if poison else None}


def filter_set(data, model, method: str, out, fraction: float = 0.05, max_cluster: float = 0.35) -> dict:
    """Write `out`: the rows of `data` that `method` does not flag, in order (with a sidecar of the
    poison that is left, when `data` has one); returns {"kept", "removed", and the score when known}."""
    rows, _ = read_set(data)
    net, tok = load_model_and_tokenizer(model) if method != "dedupe" else (None, None)
    flags = detect(rows, method, net, tok, fraction, max_cluster)
    return write_filtered(data, rows, flags, method, model, out)


def write_filtered(data, rows: list[dict], flags: np.ndarray, method: str, model, out) -> dict:
    """`filter_set`'s output for flags already computed."""
    side = read_sidecar(data)
    result = {"method": method, "data": str(data), "model": str(model), "rows": len(rows),
              "removed": int(flags.sum()), "kept": int((~flags).sum())}
    kept_poison = None
    if side is not None:
        poison = set(side["indices"])
        result.update(score(flags, poison))
        new_index = np.cumsum(~flags) - 1
        kept_poison = [int(new_index[i]) for i in sorted(poison) if not flags[i]]
    out = Path(out)
    with atomic_file(out) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, f in zip(rows, flags) if not f))
        if side is not None:
            atomic_write_json(sidecar_path(out), {**side, "filtered_by": method, "rows": result["kept"],
                                                  "count": len(kept_poison), "indices": kept_poison})
    return result
