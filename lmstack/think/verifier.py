"""`lmstack think verifier-data`: training data for verifiers, from the model's own samples.

A verifier is a reward model (`lmstack reward train`, the Bradley-Terry head on the SFT model)
trained on comparisons whose labels the world can check exactly:

  outcome.jsonl   an outcome verifier (Cobbe et al. 2021): for each problem, a sampled reply
                  with the right final answer is preferred to one with a wrong answer.
  process.jsonl   a process verifier (Lightman et al. 2023, "let's verify step by step"): the
                  world's worked solutions are deterministic, so step i of a sampled scratchpad
                  is right exactly when its first i lines are the true solution's. At a
                  sample's first wrong step, the true prefix up to that step is preferred to the
                  sample's; the verifier then scores partial solutions (a step-level search
                  uses it, lmstack/think/beam.py).

The problems are arithmetic drawn outside the world's held-out probes (the curve is measured
on those), asked with the same "think step by step" prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.think.curve import PROMPT, sample
from lmstack.utils import UserError, atomic_output_dir, check_output_dir
from lmstack.world import arithmetic as ar
from lmstack.world.rl_prompts import held_out, pick_problems


def training_problems(world, digits=(1, 2, 3), per_op: int = 100, seed: int = 0) -> list[dict]:
    """Arithmetic problems of the given digits, never one of the world's probes."""
    held, rng, rows = held_out(world), random.Random(seed), []
    for d in digits:
        if not 1 <= d <= max(ar.MAX_DIGITS.values()):
            raise UserError(f"--digits: {d} is not a number of digits the world has (1 to 5)")
        for op in ar.OPS:
            if d <= ar.MAX_DIGITS[op]:
                rows += [{"question": f"What is {ar.expression(a, op, b)}?", "answer": str(ar.compute(a, op, b)),
                          "a": a, "op": op, "b": b, "digits": d} for a, op, b in pick_problems(rng, op, d, per_op, held)]
    return rows


def outcome_pairs(records: list[dict], prompt: str = PROMPT, per_problem: int = 4, seed: int = 0) -> list[dict]:
    """Comparisons: a right sample over a wrong one, same problem (distinct texts). An empty reply
    (the model ended its turn at once) is wrong but is no text to compare: a comparison's answers
    are non-empty (`lmstack reward train` refuses the file otherwise)."""
    rng, rows = random.Random(seed), []
    for rec in records:
        right = sorted({s["text"] for s in rec["samples"] if s["hit"]})
        wrong = sorted({s["text"] for s in rec["samples"] if not s["hit"] and s["text"].strip()})
        pairs = [(r, w) for r in right for w in wrong]
        for chosen, rejected in rng.sample(pairs, min(per_problem, len(pairs))):
            rows.append(_row(rec, prompt, chosen, rejected, "outcome"))
    return rows


def first_wrong_step(text: str, truth_steps: list[str]) -> int | None:
    """The index of the first line of `text` that is not the true solution's; None if all are."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i >= len(truth_steps) or line != truth_steps[i]:
            return i
    return None if len(lines) == len(truth_steps) else len(lines)


def truth_steps(problem: dict) -> list[str]:
    return ar.worked(int(problem["a"]), problem["op"], int(problem["b"])).split("\n")


def process_pairs(records: list[dict], prompt: str = PROMPT, per_problem: int = 4, seed: int = 0) -> list[dict]:
    """Comparisons of partial solutions: the true first i+1 steps over a sample's, where step i
    is the sample's first wrong one (the shared first i steps are right in both)."""
    rng, rows = random.Random(seed), []
    for rec in records:
        steps, seen = truth_steps(rec["problem"]), set()
        for s in rec["samples"]:
            i = first_wrong_step(s["text"], steps)
            if i is None or i >= len(steps) or i > s["text"].count("\n"):
                continue  # all right, too long (nothing to compare with), or stopped early
            rejected = "\n".join(s["text"].split("\n")[:i + 1])
            if rejected.strip() and rejected not in seen:
                seen.add(rejected)
        for rejected in rng.sample(sorted(seen), min(per_problem, len(seen))):
            i = rejected.count("\n")
            rows.append(_row(rec, prompt, "\n".join(steps[:i + 1]), rejected, "process", step=i))
    return rows


def _row(rec: dict, prompt: str, chosen: str, rejected: str, kind: str, **meta) -> dict:
    p = rec["problem"]
    return {"prompt": [{"role": "user", "content": prompt.format(**p)}], "chosen": chosen, "rejected": rejected,
            "meta": {"type": kind, "op": p.get("op"), "digits": p.get("digits"), **meta}}


def verifier_data(model, world, out, digits=(1, 2, 3), per_op: int = 100, n: int = 8, temperature: float = 0.8,
                  prompt: str = PROMPT, max_tokens: int = 192, batch_size: int = 64, seed: int = 0,
                  force: bool = False) -> dict:
    """Sample n replies to each training problem; write OUT/outcome.jsonl, OUT/process.jsonl and
    OUT/samples.jsonl; return the counts (and the samples' accuracy, the generator's skill)."""
    from lmstack.eval.lm import ModelLM

    problems = training_problems(world, digits, per_op, seed)
    check_output_dir(out, force)
    lm = ModelLM.load(model, batch_size=batch_size)
    records = sample(lm, problems, prompt, n, temperature, max_tokens, seed)
    outcome, process = outcome_pairs(records, prompt, seed=seed), process_pairs(records, prompt, seed=seed)
    if not outcome and not process:
        raise UserError("no comparisons: every sample was right, or every one wrong (try other --digits)")
    with atomic_output_dir(out, force) as tmp:
        for name, rows in (("outcome", outcome), ("process", process), ("samples", records)):
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    hits = [s["hit"] for r in records for s in r["samples"]]
    return {"problems": len(problems), "samples": len(hits), "sample_acc": sum(hits) / len(hits),
            "outcome_pairs": len(outcome), "process_pairs": len(process), "out": str(Path(out))}
