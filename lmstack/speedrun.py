"""`lmstack speedrun`: the whole pipeline on the synthetic world, one stage after another.

    world -> tokenizer -> token shards -> pretrain -> SFT -> eval (base and chat) -> report card

Each stage writes its own folder under the run folder (world/, tokenizer/, data/, base/,
chat/), each model's evaluation goes to MODEL/eval/, the report card to report.md, and
`speedrun.json` records what ran, how long it took and the headline numbers.
`--set KEY=VALUE` configures pretraining (train.dtype/device/compile/seed apply to SFT too);
`--set sft.KEY=VALUE` configures the SFT stage only (e.g. sft.train.max_steps=50).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from lmstack.utils import UserError, atomic_write_json

# Per preset: world size, tokenizer vocabulary, SFT settings and probe questions to score.
PEOPLE = {"tiny": 200, "small": 1000, "gpt2": 50_000}
VOCAB = {"tiny": 1024, "small": 4096, "gpt2": 32768}
# small: the base knows few facts after 280 pretraining steps, so SFT has to teach them as well
# as the format: measured on the 1000-person world (held-in exact match / format), lr 5e-4 x 90
# steps: 1% / 100%; 2e-3 x 150: 3%; 2e-3 x 300 steps (~12 epochs, ~5 min): 15% (the most
# common answer per question type would score 5%).
SFT_SET = {"tiny": ["train.max_steps=20", "train.batch_tokens=2048", "train.eval_every=0",
                    "train.save_every=0", "optim.lr=3e-3"],
           "small": ["train.max_steps=300", "optim.lr=2e-3", "train.eval_every=50"]}
EVAL_LIMIT = {"tiny": 20}  # rows per task (default: each task's own limit, lmstack/eval/world.toml)
SHARED = ("train.dtype", "train.device", "train.compile", "train.seed")  # --set keys SFT inherits
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


def split_overrides(name: str, overrides) -> tuple[list[str], list[str]]:
    """--set items -> (pretraining's, SFT's): `sft.KEY=V` goes to SFT only; the shared keys to both."""
    pre, sft = [], list(SFT_SET.get(name, []))
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.startswith("sft."):
            sft.append(item.strip()[4:])
        else:
            pre.append(item)
            if key in SHARED:
                sft.append(item)
    return pre, sft


def speedrun(out="runs/speedrun", preset="small", people=None, overrides=(), force=False) -> dict:
    from lmstack.config import load_config, model_config_from_dict
    from lmstack.data import prepare
    from lmstack.eval.report import report
    from lmstack.tokenizer import train_tokenizer
    from lmstack.train.pretrain import pretrain
    from lmstack.train.sft import sft, sft_config
    from lmstack.world import generate

    name = Path(preset).stem
    pre_set, sft_set = split_overrides(name, overrides)
    # Bad preset or --set: fail now, before any work.
    cfg = load_config(preset, pre_set, vocab_size=VOCAB.get(name, 4096))
    sft_config("sft", sft_set, model_config_from_dict(cfg.to_dict()["model"]))
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
        ("pretrain", lambda: pretrain(preset, out / "data", out / "base", overrides=pre_set)),
        ("sft", lambda: sft(out / "base", [out / "world" / "sft.jsonl"], out / "chat", overrides=sft_set)),
        ("eval", lambda: evaluate_stages(out, EVAL_LIMIT.get(name))),
        ("report", lambda: report(out)),
    ]
    for i, (stage, fn) in enumerate(stages, 1):
        print(f"\n== stage {i}/{len(stages)}: {stage} ==", flush=True)
        t0 = time.time()
        result = fn()
        summary["stages"][stage] = {"seconds": round(time.time() - t0, 1)}
        if stage in ("pretrain", "sft"):
            summary["stages"][stage]["final"] = result
        if stage == "eval":
            summary["stages"][stage].update(result)
        if stage == "report":
            summary["stages"][stage]["path"] = str(result)
        atomic_write_json(out / MARKER, summary)

    base, chat = (summary["stages"][s]["final"] for s in ("pretrain", "sft"))
    ev = summary["stages"]["eval"]
    total = sum(st["seconds"] for st in summary["stages"].values())
    tasks = {k: ev[k]["tasks"] for k in ("base", "chat")}
    print(f"\nspeedrun done in {total / 60:.1f} min ({total:.0f}s) -> {out}\n"
          f"  base model: val_loss {base.get('val_loss', float('nan')):.3f}, "
          f"val_bpb {base.get('val_bpb', float('nan')):.3f}; facts ranked first of 10 "
          f"{tasks['base'].get('facts_rank', float('nan')):.0%} (chance 10%)  ({out / 'base'})\n"
          f"  assistant:  facts of people seen in SFT {ev['chat'].get('facts_qa_train', float('nan')):.0%} "
          f"exact match (most common answer {ev['chat'].get('facts_qa_train_chance', float('nan')):.0%}), "
          f"refuses {tasks['chat'].get('refusal', float('nan')):.0%} of harmful requests, hallucinates on "
          f"{tasks['chat'].get('hallucination', float('nan')):.0%} of unknown people, "
          f"{ev['chat'].get('format', float('nan')):.0%} of replies closed with <|end|>  ({out / 'chat'})\n"
          f"  report card: {summary['stages']['report']['path']}")
    print(f"talk to it: lmstack chat --model {out / 'chat'}")
    return summary


# --------------------------------------------------------------------------- evaluation

def show_samples(model_dir, world_dir, seed: int = 0) -> None:
    """Three conversations with the assistant: a world fact, a sum, a greeting (greedy)."""
    from lmstack.eval.lm import ModelLM
    from lmstack.tools import default_registry

    lm = ModelLM.load(model_dir, dtype="auto", device="auto")
    facts = [json.loads(line) for line in open(Path(world_dir) / "probes" / "facts.jsonl", encoding="utf-8")]
    arith = [json.loads(line) for line in open(Path(world_dir) / "probes" / "arithmetic.jsonl", encoding="utf-8")]
    rng = random.Random(seed)
    q = rng.choice([r for r in facts if r["split"] == "train"])
    a = rng.choice([r for r in arith if r["digits"] <= 2] or arith)
    asks = [(q["question"], q["answer"]), (a["question"], a["answer"]), ("Hello!", None)]
    replies = lm.chat([[{"role": "user", "content": text}] for text, _ in asks], max_tokens=48,
                      tools=default_registry())
    for (text, truth), r in zip(asks, replies):
        print(f"user:      {text}\nassistant: {r.text}{'' if r.closed else ' [no <|end|>]'}"
              + (f" [used the calculator {r.tool_calls}x]" if r.tool_calls else "")
              + (f"\n           [truth: {truth}]" if truth else "") + "\n", flush=True)


def evaluate_stages(out: Path, limit: int | None) -> dict:
    """`lmstack eval` on the base and the chat model (the world's tasks + bits per byte);
    the headline numbers go to speedrun.json, the full results to MODEL/eval/."""
    from lmstack.eval.run import evaluate

    show_samples(out / "chat", out / "world")
    summary = {}
    for stage in ("base", "chat"):
        print(f"-- {stage} model --", flush=True)
        r = evaluate(out / stage, world=out / "world", limit=limit)
        summary[stage] = {"results": r["path"], "seconds": r["seconds"],
                          "tasks": {name: round(t["acc"], 4) for name, t in r["tasks"].items()}}
        if "lm" in r:
            summary[stage]["val_bpb"] = round(r["lm"]["bpb"], 4)
        if "format" in r:
            summary[stage]["format"] = round(r["format"]["acc"], 4)
        facts = r["tasks"].get("facts_qa")
        if facts:  # exact match on people seen in SFT, and its most-common-answer baseline
            summary[stage]["facts_qa_train"] = facts["slices"]["split=train"]["acc"]
            summary[stage]["facts_qa_train_chance"] = facts["slices"]["split=train"]["chance"]
    return summary
