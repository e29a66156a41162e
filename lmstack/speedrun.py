"""`lmstack speedrun`: the whole pipeline on the synthetic world, one stage after another.

Stages so far: world. Each stage writes its own folder under the run folder.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.utils import check_output_dir
from lmstack.world import generate, print_stats

PEOPLE = {"tiny": 200, "small": 2000, "gpt2": 50_000}


def speedrun(out="runs/speedrun", preset="small", people=None, overrides=(), force=False):
    out = check_output_dir(out, force)
    people = people or PEOPLE.get(preset, PEOPLE["small"])
    print(f"== stage 1/1: world ({people} people) ==")
    world = generate(Path(out) / "world", people=people, seed=0, force=True)
    print_stats(world)
    print(f"speedrun done: {out}")
