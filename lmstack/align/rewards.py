"""Rewards for RL on checkable tasks (`lmstack grpo --reward SPEC`): plain Python callables

    reward(row: dict, answer: str) -> float

`row` is the prompts-file row the rollout was sampled for (its question plus whatever the
reward needs to check it: an answer, a task type); `answer` is the text of the policy's reply
(tool calls left out; see lmstack/align/rollout.py for how a reply that calls a tool is scored).

SPEC is one of
  arithmetic              1 if the reply's last number is row["answer"], else 0
  world                   the synthetic world's ground truth, by the labelling guide's rules
                          (lmstack/world/labeller.py), scaled to [0, 1] (see `WorldReward`)
  python:MODULE:FUNCTION  any importable function with the signature above
`load_reward(spec, prompts=FILE)` turns a SPEC into the callable; the prompts file tells the
world reward where world.json is (it looks in the file's folder and the two above it).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

from lmstack.modelio import world_above
from lmstack.utils import UserError
from lmstack.world import labeller, load_world

Reward = Callable[[dict, str], float]
BUILTIN = ("arithmetic", "world")


def arithmetic(row: dict, answer: str) -> float:
    """1.0 when the last number in the reply equals the row's answer, else 0.0.

    Rows: probes/arithmetic.jsonl ({question, answer, a, op, b, digits}), or any row with a
    question/prompt and an "answer" (or "a", "op", "b")."""
    truth = labeller.arithmetic_truth(row)
    if truth is None:
        raise UserError(f"arithmetic reward: the row has no \"answer\" (nor whole numbers a, b and an op + - *): "
                        f"{json.dumps(row)[:120]}")
    return 1.0 if labeller.final_number(answer) == truth else 0.0


class WorldReward:
    """The world's ground truth, as the simulated labeller (lmstack/world/labeller.py) judges a
    reply, scaled to [0, 1]. Which rule judges a row is `labeller.task_of`'s to say:

      harmful request    1 a polite refusal, else 0
      unknown person     1 "I don't know ...", else 0
      arithmetic         1 the right last number, 0.5 "I don't know", 0 wrong
      fact               1 states the truth, 0.5 "I don't know", 0 wrong
      benign request     1 helpful and polite (and states its "truth" if any), 0 rude or a refusal
    World probe rows (WORLD/probes/*.jsonl) and comparison rows (WORLD/comparisons.jsonl) work
    as they are; a comparison row about a fact names a person and relation in its meta, whose
    truth is looked up in world.json (found at or above the prompts file)."""

    def __init__(self, world_dir: str | Path | None = None):
        self.world_dir = Path(world_dir) if world_dir else None
        self._people: dict | None = None

    def people(self) -> dict:
        """world.json's people by id, read at the first call (UserError: no world.json, or a corrupt one)."""
        if self._people is None:
            if self.world_dir is None:
                raise UserError("world reward: a fact row names a person, but no world.json was found "
                                "at or above the prompts file")
            self._people = {p["id"]: p for p in load_world(self.world_dir)["people"]}
        return self._people

    def _person(self, pid: str) -> dict:
        if pid not in self.people():
            raise UserError(f"world reward: person {pid!r} is not in {self.world_dir / 'world.json'}")
        return self._people[pid]

    def task(self, row: dict) -> dict:
        """The labeller's task for a prompts row (UserError when the row cannot be checked)."""
        task = labeller.task_of(row, self._person)
        if task is None:
            raise UserError(f"world reward cannot check this row (no task, meta.type, expected or answer): "
                            f"{json.dumps(row)[:120]}")
        return task

    def __call__(self, row: dict, answer: str) -> float:
        task = self.task(row)
        best = 2 if task["type"] in ("fact", "arithmetic") else 1
        return labeller.score(task, answer) / best


def load_reward(spec: str, prompts=None) -> Reward:
    """arithmetic | world | python:MODULE:FUNCTION -> a reward callable (UserError, one line,
    when the spec is unknown or the function cannot be imported)."""
    if not isinstance(spec, str) or not spec:
        raise UserError("--reward: give arithmetic | world | python:MODULE:FUNCTION")
    if spec == "arithmetic":
        return arithmetic
    if spec == "world":
        return WorldReward(world_above(prompts))
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UserError(f"--reward {spec}: write python:MODULE:FUNCTION (e.g. python:mypkg.rewards:exact)")
        _, module, name = parts
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise UserError(f"--reward {spec}: cannot import module {module!r} ({e})") from None
        except Exception as e:  # the module itself failed while importing
            raise UserError(f"--reward {spec}: importing {module!r} failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        fn = getattr(mod, name, None)
        if fn is None:
            raise UserError(f"--reward {spec}: module {module!r} has no attribute {name!r}")
        if not callable(fn):
            raise UserError(f"--reward {spec}: {module}.{name} is not callable")
        return fn
    raise UserError(f"unknown --reward {spec!r} (arithmetic | world | python:MODULE:FUNCTION)")


def call_reward(fn: Reward, row: dict, answer: str) -> float:
    """fn(row, answer) as a float; a reward that returns something else is the user's error."""
    value = fn(row, answer)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the reward function returned {type(value).__name__} {value!r}, not a number") from None
    if value != value:  # NaN
        raise UserError("the reward function returned NaN")
    return value


__all__ = ["BUILTIN", "Reward", "WorldReward", "arithmetic", "call_reward", "load_reward"]
