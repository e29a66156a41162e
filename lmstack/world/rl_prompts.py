"""Training prompts for RL with a checkable reward (`lmstack grpo --reward arithmetic`).

The problems never include the world's held-out arithmetic probes, so an RL-trained model is
still measured on problems it never practised. Each problem is asked in every phrasing the
assistant data uses, so the policy learns the arithmetic, not one wording.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.utils import UserError, atomic_write_text, check_output_file
from lmstack.world import arithmetic as ar
from lmstack.world.assistant import ARITH_QUESTIONS

MAX_ANY = max(ar.MAX_DIGITS.values())


def _operands(digits: int) -> range:
    # Exactly ar.operand's range: 1 digit includes 0, more digits have no leading zero.
    return range(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits)


def problem_count(op: str, digits: int) -> int:
    """How many problems of `digits` digits ar.sample_problem can produce (a >= b for -)."""
    n = len(_operands(digits))
    return n * (n + 1) // 2 if op == "-" else n * n


def all_problems(op: str, digits: int):
    for a in _operands(digits):
        for b in _operands(digits):
            if op != "-" or a >= b:
                yield a, op, b


def held_out(world_dir) -> set[tuple[int, str, int]]:
    """The (a, op, b) of the world's arithmetic probes."""
    world = Path(world_dir)
    if not (world / "world.json").is_file():
        raise UserError(f"{world} is not a world folder (no world.json)")
    path = world / "probes" / "arithmetic.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found (the world's arithmetic probes)")
    held = set()
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                held.add((int(r["a"]), r["op"], int(r["b"])))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{ln}: not an arithmetic probe row") from None
    return held


def pick_problems(rng: random.Random, op: str, digits: int, per_op: int, held: set) -> list[tuple[int, str, int]]:
    """`per_op` distinct problems of `digits` digits outside `held` (all of them when there are fewer)."""
    r = _operands(digits)
    left = problem_count(op, digits) - sum(1 for a, o, b in held if o == op and a in r and b in r
                                           and (op != "-" or a >= b))
    if left <= per_op:
        # A small space (at most per_op problems, or too few left outside the probes to sample
        # per_op distinct ones): take all of it.
        return [p for p in all_problems(op, digits) if p not in held]
    taken, picked = set(held), []
    while len(picked) < per_op:  # ends: more than per_op problems are left outside the probes
        p = ar.sample_problem(rng, op, digits, taken)
        if p not in taken:  # sample_problem gives up after 100 tries and returns a taken one
            taken.add(p)
            picked.append(p)
    return picked


def arithmetic_prompts(world_dir, out_file, digits=(1,), per_op: int = 200, seed: int = 0) -> dict:
    """Write RL prompts for arithmetic of the given operand sizes to `out_file` (jsonl).

    For each d in `digits` and each op that has d-digit problems: every such problem when there
    are at most `per_op`, else `per_op` distinct ones sampled with ar.sample_problem; never a
    held-out probe. One row per problem and phrasing: {question, answer, a, op, b, digits},
    shuffled with `seed`. Returns {"rows", "problems", "by_digits": {d: problems}, "path"}."""
    digits = sorted(set(digits))
    if not digits or any(not isinstance(d, int) or not 1 <= d <= MAX_ANY for d in digits):
        raise UserError(f"--digits must be whole numbers from 1 to {MAX_ANY} (got {digits})")
    if per_op < 1:
        raise UserError(f"--per-op must be >= 1 (got {per_op})")
    out = check_output_file(out_file, what=".jsonl file")
    held = held_out(world_dir)
    rng = random.Random(seed)
    rows, by_digits = [], {}
    for d in digits:
        by_digits[d] = 0
        for op in "+-*":
            if d > ar.MAX_DIGITS[op]:
                continue
            for a, op, b in pick_problems(rng, op, d, per_op, held):
                by_digits[d] += 1
                e, answer = ar.expression(a, op, b), str(ar.compute(a, op, b))
                rows += [{"question": q.format(e=e), "answer": answer, "a": a, "op": op, "b": b, "digits": d}
                         for q in ARITH_QUESTIONS]
    random.Random(seed).shuffle(rows)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": len(rows), "problems": sum(by_digits.values()), "by_digits": by_digits, "path": str(out)}
