"""The ground-truth win rate of one model against another on the synthetic world.

    lmstack winrate --a A --b B [--world runs/small/world] [--n 200] [--exclude comparisons.jsonl]

Both models answer the same n world prompts greedily (probes: facts questions, harmful requests,
benign requests, questions about people who do not exist; `world_prompts`); the world's
simulated labeller (lmstack/world/labeller.py) picks the better answer of each pair or calls a
tie. A's win rate = wins / (wins + losses), with a 95% Wilson interval, overall and by prompt
type; the labeller's mean score of each model too, and how often each model refuses: on benign
requests the labeller ties a refusal with a wrong answer, so a model that wins by refusing more
harmful requests can refuse more harmless ones without the win rate showing it (README: Alignment).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from lmstack.eval.lm import ModelLM
from lmstack.stats import wilson
from lmstack.utils import UserError, atomic_write_json, check_output_file, read_jsonl
from lmstack.world import labeller

PROBE_KINDS = {"fact": "facts.jsonl", "harmful": "harmful.jsonl", "benign": "benign.jsonl",
               "unknown_person": "nonexistent.jsonl", "arithmetic": "arithmetic.jsonl"}
WIN_RATE_KINDS = ("fact", "harmful", "benign", "unknown_person")


def world_prompts(world_dir, n: int = 200, seed: int = 0, kinds=WIN_RATE_KINDS, exclude=None) -> list[dict]:
    """n prompts from the world's probes, split evenly over `kinds`, sampled with `seed`:
    [{"prompt", "task", "source"}]. `exclude`: comparison files whose prompts are left out
    (e.g. the training comparisons, so that every prompt is unseen)."""
    world = Path(world_dir)
    if not (world / "world.json").is_file():
        raise UserError(f"{world} is not a world folder (no world.json)")
    skip = set()
    for f in ([exclude] if isinstance(exclude, (str, Path)) else list(exclude or [])):
        skip |= {r["prompt"] for _, r in read_jsonl(f, "comparisons file")
                 if isinstance(r, dict) and isinstance(r.get("prompt"), str)}
    rng = random.Random(seed)
    out = []
    for j, kind in enumerate(kinds):
        if kind not in PROBE_KINDS:
            raise UserError(f"unknown prompt kind {kind!r} ({' | '.join(PROBE_KINDS)})")
        path = world / "probes" / PROBE_KINDS[kind]
        rows = [(ln, r) for ln, r in read_jsonl(path, "probe file")
                if isinstance(r, dict) and isinstance(r.get("question"), str) and r["question"] not in skip]
        k = (j + 1) * n // len(kinds) - j * n // len(kinds)
        for ln, r in sorted(rng.sample(rows, min(k, len(rows))), key=lambda t: t[0]):
            task = labeller.task_of(r)
            if task is not None and task["type"] == kind:
                out.append({"prompt": r["question"], "task": task, "source": f"{path}:{ln}"})
    return out


def win_rate(model_a, model_b, world_dir, n: int = 200, seed: int = 0, max_tokens: int = 64,
             exclude=None, batch_size: int = 32, out=None, quiet: bool = False) -> dict:
    """Ground-truth win rate of model A against model B: both answer the same n world prompts
    greedily (`world_prompts`), the simulated labeller (`lmstack.world.labeller.label`) picks
    the better answer or calls a tie. win_rate = wins / (wins + losses) of A, with a 95% Wilson
    interval, overall and by prompt type; `score_a` / `score_b` are the labeller's mean scores.
    Writes the result (with every item) to `out` when given."""
    if out is not None:
        check_output_file(out, what=".json file")
    items = world_prompts(world_dir, n, seed, exclude=exclude)
    if not items:
        raise UserError(f"no world prompts left to compare on ({world_dir}; every one is excluded?)")
    replies = []
    for d in (model_a, model_b):
        lm = ModelLM.load(d, batch_size=batch_size)
        replies.append([r.text for r in lm.chat([[{"role": "user", "content": it["prompt"]}] for it in items],
                                                 max_tokens=max_tokens)])
        del lm
    tally: dict[str, Counter] = {}
    for it, a, b in zip(items, *replies):
        task = it["task"]
        res = labeller.label(task, a, b)
        outcome = "tie" if res is None else ("win" if res[0] == a else "loss")
        it.update(a=a, b=b, outcome=outcome, score_a=labeller.score(task, a), score_b=labeller.score(task, b),
                  refuses_a=labeller.is_refusal(a), refuses_b=labeller.is_refusal(b))
        for key in ("all", task["type"]):
            c = tally.setdefault(key, Counter())
            c[outcome] += 1
            for k in ("score_a", "score_b", "refuses_a", "refuses_b"):
                c[k] += it[k]
            c["n"] += 1

    def summary(c: Counter) -> dict:
        w, l = c["win"], c["loss"]
        return {"n": c["n"], "wins": w, "losses": l, "ties": c["tie"],
                "win_rate": w / (w + l) if w + l else float("nan"), "ci": list(wilson(w, w + l)),
                **{k: c[k] / c["n"] for k in ("score_a", "score_b", "refuses_a", "refuses_b")}}

    result = {"a": str(model_a), "b": str(model_b), "world": str(world_dir), "seed": seed,
              "max_tokens": max_tokens, **summary(tally["all"]),
              "by_type": {k: summary(v) for k, v in sorted(tally.items()) if k != "all"}, "items": items}
    if out is not None:
        atomic_write_json(out, result)
    if not quiet:
        print_win_rate(result)
    return result


def print_win_rate(r: dict) -> None:
    print(f"A = {r['a']}\nB = {r['b']}\nground truth: {r['world']} (simulated labeller), greedy answers")
    print(f"{'prompts':16s} {'n':>4s} {'A wins':>7s} {'B wins':>7s} {'ties':>5s} {'A win rate':>11s}  {'95% CI':13s}"
          f" {'score A':>8s} {'score B':>8s} {'A refuses':>10s} {'B refuses':>10s}")
    for name, s in [("all", r), *r["by_type"].items()]:
        lo, hi = s["ci"]
        rate = f"{100 * s['win_rate']:10.1f}%  [{100 * lo:4.1f}, {100 * hi:5.1f}]" if s["wins"] + s["losses"] else \
            f"{'-':>11s}  {'(all ties)':13s}"
        print(f"{name:16s} {s['n']:4d} {s['wins']:7d} {s['losses']:7d} {s['ties']:5d} {rate} "
              f"{s['score_a']:8.2f} {s['score_b']:8.2f} {100 * s['refuses_a']:9.1f}% {100 * s['refuses_b']:9.1f}%")
