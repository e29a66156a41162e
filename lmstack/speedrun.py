"""`lmstack speedrun`: the whole pipeline on the synthetic world, one stage after another.

    world -> tokenizer -> token shards -> pretrain -> samples

Each stage writes its own folder under the run folder (world/, tokenizer/, data/, base/)
and `speedrun.json` records what ran, how long it took and the final metrics.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from lmstack.utils import UserError, atomic_write_json

# Per preset: world size and tokenizer vocabulary.
PEOPLE = {"tiny": 200, "small": 1000, "gpt2": 50_000}
VOCAB = {"tiny": 1024, "small": 4096, "gpt2": 32768}
MARKER = "speedrun.json"


def _prepare_run_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"run folder {out} is not empty (use --force to start it over)")
        if not (out / MARKER).exists():  # never rm -rf a folder we did not make
            raise UserError(f"{out} is not a speedrun folder (no {MARKER}); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def speedrun(out="runs/speedrun", preset="small", people=None, overrides=(), force=False) -> dict:
    from lmstack.config import load_config
    from lmstack.data import prepare
    from lmstack.tokenizer import train_tokenizer
    from lmstack.train.pretrain import pretrain, sample
    from lmstack.world import generate, load_world

    name = Path(preset).stem
    load_config(preset, list(overrides), vocab_size=VOCAB.get(name, 4096))  # bad preset/--set: fail now
    out = Path(out)
    _prepare_run_folder(out, force)
    people = people or PEOPLE.get(name, PEOPLE["small"])
    summary = {"preset": preset, "people": people, "overrides": list(overrides), "stages": {}}
    atomic_write_json(out / MARKER, summary)
    stages = [
        ("world", lambda: generate(out / "world", people=people, seed=0)),
        ("tokenizer", lambda: train_tokenizer([out / "world" / "pretrain.jsonl"],
                                              vocab_size=VOCAB.get(name, 4096), out=out / "tokenizer")),
        ("data", lambda: prepare([out / "world" / "pretrain.jsonl"], tokenizer=out / "tokenizer",
                                 out=out / "data", val_fraction=0.02)),
        ("pretrain", lambda: pretrain(preset, out / "data", out / "base", overrides=list(overrides))),
    ]
    for i, (stage, fn) in enumerate(stages, 1):
        print(f"\n== stage {i}/{len(stages) + 1}: {stage} ==", flush=True)
        t0 = time.time()
        result = fn()
        summary["stages"][stage] = {"seconds": round(time.time() - t0, 1)}
        if stage == "pretrain":
            summary["stages"][stage]["final"] = result
        atomic_write_json(out / MARKER, summary)

    print(f"\n== stage {len(stages) + 1}/{len(stages) + 1}: samples ==")
    world = load_world(out / "world")
    rng = random.Random(0)
    for person in rng.sample(world["people"], 3):
        prompt = f"{person['name']} was born in"
        print(f"[truth: {person['birth_city']}]")
        sample(out / "base", prompt, max_tokens=40, temperature=0.0)
    final = summary["stages"]["pretrain"]["final"]
    total = sum(s["seconds"] for s in summary["stages"].values())
    print(f"\nspeedrun done in {total / 60:.1f} min ({total:.0f}s): val_loss {final.get('val_loss', float('nan')):.3f}, "
          f"val_bpb {final.get('val_bpb', float('nan')):.3f} -> {out}")
    print(f"try it: lmstack sample --model {out / 'base'} --prompt \"{world['people'][0]['name']} works for\"")
    return summary
