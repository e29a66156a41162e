"""The results store: one JSONL file per experiment (RESULTS/NAME.jsonl), one line per scored model
of a finished run, plain text a person can read and diff (and `lmstack capabilities` reads):

    {"experiment", "variant", "scale", "seed", "commit", "time", "model", "stage", "N", "N_total", "D",
     "flops", "val_loss", "metrics": {TASK: {"acc", "ci", "n", "chance", "baseline", "baseline_ci", "better",
                                             "slices": {KEY: {"acc", "ci", "n", "chance", "baseline", ...}}}},
     "command"}

"stage" is the model scored ("base", "chat" or "reader"); N (non-embedding parameters), N_total, D (pretraining
tokens), flops (GPT.flops_per_token x D) and val_loss (pretraining's final validation loss) describe
the pretraining both models rest on. "baseline" is the task's score with the prompt's subject
swapped for another row's (the answer's prior; null where a task has none). A run's lines are
appended in one write and flushed, so a kill leaves them all or none.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from lmstack.eval.run import COPY_TASK, COPY_TEXT_TASK, ICL_TASK
from lmstack.model import GPT
from lmstack.modelio import read_config
from lmstack.utils import UserError, read_json, read_jsonl


def _measure(value: str, n: str, none: float):
    """A built-in measure's results -> a stored metric: `value` the score, `n` what it counts,
    `none` the score of a model without the ability (lower scores are better for both)."""
    return lambda r: {"acc": rounded(r[value]), "ci": rounded(r["ci"]), "n": r[n], "chance": none,
                      "baseline": None, "baseline_ci": None, "better": "lower"}


# `lmstack eval`'s built-in measures a recipe may name (beside the world's tasks): the name in --tasks
# and in eval's results -> its stored metric. In-context copying: the loss on a random sequence's second
# occurrence over its first (1: none), of the vocabulary's tokens (copy) or the text's (copy_text);
# Olsson et al.'s score: loss late in a context minus early (0: none).
MEASURES = {**dict.fromkeys((COPY_TASK, COPY_TEXT_TASK), _measure("ratio", "sequences", 1.0)),
            ICL_TASK: _measure("score", "windows", 0.0)}
# Continuous scores eval reports beside exact match (kept where a task or slice has them).
CONTINUOUS = ("mean_rank", "answer_logprob", "digit_acc")


def rounded(x):
    """A number as stored: 5 decimals (a file to read and diff), NaN as null (strict JSON); lists too."""
    if isinstance(x, list):
        return [rounded(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 5)
    return x


def _score(s: dict) -> dict:
    w = s.get("swapped") or {}  # the subject-swapped score, where the task has one
    return {"acc": rounded(s["acc"]), "ci": rounded(s["ci"]), "n": s["n"], "chance": rounded(s.get("chance")),
            "baseline": rounded(w.get("acc")), "baseline_ci": rounded(w.get("ci")),
            **{k: rounded(s[k]) for k in CONTINUOUS if k in s}}


def metrics(results: dict, tasks: list[str]) -> dict:
    """`lmstack eval`'s results -> the stored metrics of these tasks (every slice kept; a measure eval
    could not take, such as icl on a split too short for a whole context, is left out)."""
    out = {}
    for t in tasks:
        if t in MEASURES:
            if t in results:
                out[t] = MEASURES[t](results[t])
        else:
            r = results["tasks"][t]
            out[t] = {**_score(r), "better": r["better"], "slices": {k: _score(s) for k, s in r["slices"].items()}}
    return out


def model_size(base) -> dict:
    """A record's N (non-embedding), N_total, D (pretraining tokens) and training FLOPs
    (GPT.flops_per_token x D), from a base trained by `lmstack pretrain` (its run.json)."""
    train = (read_json(Path(base) / "run.json") or {}).get("train")
    if not train:
        raise UserError(f"{base}: no run.json with a train section (a base trained by lmstack pretrain "
                        "is needed for N and D)")
    with torch.device("meta"):
        model = GPT(read_config(base))
    d = train["max_steps"] * train["batch_tokens"]
    return {"N": model.num_params(include_embeddings=False), "N_total": model.num_params(), "D": d,
            "flops": model.flops_per_token(train["seq_len"]) * d}


def store_path(results, name: str) -> Path:
    return Path(results) / f"{name}.jsonl"


def read_records(path) -> list[dict]:
    """The store's records (none when the file does not exist yet); a line that is not one (a hand
    edit, a line torn by a crash) is passed over with a note."""
    path = Path(path)
    if not path.is_file():
        return []
    skipped = {}
    rows = [row for _, row in read_jsonl(path, "results store", skipped)]
    records = [r for r in rows if isinstance(r, dict) and KEYS <= r.keys()]
    bad = skipped.get("bad JSON", 0) + len(rows) - len(records)
    if bad:
        print(f"{path}: passed over {bad} line(s) that are not records", flush=True)
    return records


def append_records(path, records: list[dict]) -> None:
    """Append records as lines in one write, flushed to disk: all or none of them appear."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, allow_nan=False) + "\n" for r in records).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
            data = b"\n" + data  # a torn last line (a crash mid-write) stays a line of its own
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


KEYS = {"variant", "scale", "seed", "stage", "metrics"}  # what a line needs to count as a record


def run_key(record: dict) -> tuple:
    return record["variant"], record["scale"], record["seed"]
