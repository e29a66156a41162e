"""`lmstack speedrun`: the whole pipeline on the synthetic world, one stage after another.

    world -> tokenizer -> token shards -> pretrain -> SFT -> sample conversations + a quick eval

Each stage writes its own folder under the run folder (world/, tokenizer/, data/, base/,
chat/) and `speedrun.json` records what ran, how long it took and the final metrics.
`--set KEY=VALUE` configures pretraining (train.dtype/device/compile/seed apply to SFT too);
`--set sft.KEY=VALUE` configures the SFT stage only (e.g. sft.train.max_steps=50).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import torch

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
EVAL_QUESTIONS = {"tiny": 10}  # default 100
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
        ("eval", lambda: assistant_report(out / "chat", out / "world",
                                          n_questions=EVAL_QUESTIONS.get(name, 100))),
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
        atomic_write_json(out / MARKER, summary)

    base, chat, ev = (summary["stages"][s].get("final", summary["stages"][s]) for s in ("pretrain", "sft", "eval"))
    total = sum(s["seconds"] for s in summary["stages"].values())
    print(f"\nspeedrun done in {total / 60:.1f} min ({total:.0f}s) -> {out}\n"
          f"  base model: val_loss {base.get('val_loss', float('nan')):.3f}, "
          f"val_bpb {base.get('val_bpb', float('nan')):.3f}"
          f"  ({out / 'base'})\n"
          f"  assistant:  val_loss {chat.get('val_loss', float('nan')):.3f} on assistant tokens, "
          f"held-in facts {ev['exact_match']:.0%} exact match (most-common-answer baseline "
          f"{ev['majority_baseline']:.0%}), {ev['rank_accuracy']:.0%} "
          f"ranked first of {ev['choices']} (chance {1 / ev['choices']:.0%}), "
          f"{ev['format_ok']:.0%} replies closed with <|end|>  ({out / 'chat'})")
    print(f"talk to it: lmstack chat --model {out / 'chat'}")
    return summary


# --------------------------------------------------------------------------- the assistant's report

def chat_reply(model, tok, messages: list[dict], max_tokens: int = 48) -> tuple[str, bool]:
    """Greedy reply with THE chat template -> (text with any tool calls shown, closed with <|end|>?)."""
    from lmstack.engine import generate
    from lmstack.tokenizer import render_chat

    end = tok.special_ids["<|end|>"]
    ids, _ = render_chat(tok, messages, add_generation_prompt=True)
    new = generate(model, ids, max_tokens=max_tokens, temperature=0.0, seed=0,
                   stop_ids={end, tok.eos_id, tok.bos_id})
    closed = bool(new) and new[-1] == end
    return tok.decode(new[:-1] if closed else new), closed


@torch.no_grad()
def rank_answer(model, tok, question: str, reply_start: str, candidates: list[str]) -> int:
    """Index of the candidate the model finds most likely to complete its reply `reply_start`
    (e.g. "X was born in the city of") to `question` (sum of the candidate's token log-probs)."""
    from lmstack.tokenizer import render_chat

    prompt, _ = render_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
    prompt += tok.encode(reply_start)
    rows = [prompt + tok.encode(" " + c) for c in candidates]
    width = max(map(len, rows))
    x = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # right padding: causal, harmless
    logp = torch.log_softmax(model(x)[:, :-1].float(), dim=-1).gather(-1, x[:, 1:, None])[..., 0]
    scores = [logp[i, len(prompt) - 1:len(rows[i]) - 1].sum() for i in range(len(rows))]
    return int(torch.stack(scores).argmax())


def assistant_report(model_dir, world_dir, n_questions: int = 100, seed: int = 0) -> dict:
    """Print a few sample conversations, then score greedy replies on held-in world facts.

    exact_match: the answer (or an alias) appears in the reply, on `n_questions` facts of
    train-split people; majority_baseline: the same for a model that always gives the most
    common answer of the relation. rank_accuracy: how often the true answer is the most likely
    of itself and its distractors to end a reply begun with the probe's cloze ("X was born
    in the city of"); chance 1/choices. format_ok: replies that closed their turn with <|end|>."""
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import checkpoint

    model_dir, world_dir = Path(model_dir), Path(world_dir)
    model, tok = checkpoint.load_model(model_dir), Tokenizer.load(model_dir)
    facts = [json.loads(line) for line in open(world_dir / "probes" / "facts.jsonl", encoding="utf-8")]
    held_in = [r for r in facts if r["split"] == "train"]
    arith = [json.loads(line) for line in open(world_dir / "probes" / "arithmetic.jsonl", encoding="utf-8")]
    rng = random.Random(seed)
    q = rng.choice(held_in)
    a = rng.choice([r for r in arith if r["digits"] <= 2] or arith)
    for text, truth in [(q["question"], q["answer"]), (a["question"], a["answer"]), ("Hello!", None)]:
        reply, closed = chat_reply(model, tok, [{"role": "user", "content": text}])
        print(f"user:      {text}\nassistant: {reply}{'' if closed else ' [no <|end|>]'}"
              + (f"\n           [truth: {truth}]" if truth else "") + "\n", flush=True)

    # The exact-match baseline of a model that knows no facts but the answer format: always
    # give the most common answer for the question's relation (e.g. the largest city).
    common = {}
    for rel in {r["relation"] for r in held_in}:
        answers = Counter(r["answer"] for r in held_in if r["relation"] == rel)
        common[rel] = answers.most_common(1)[0][0]
    hits = ranked = closed_n = 0
    sample = rng.sample(held_in, min(n_questions, len(held_in)))
    for r in sample:
        reply, closed = chat_reply(model, tok, [{"role": "user", "content": r["question"]}])
        answers = [r["answer"], *r.get("aliases", [])]
        hits += any(ans.lower() in reply.lower() for ans in answers)
        closed_n += closed
        ranked += rank_answer(model, tok, r["question"], r["cloze"], [r["answer"], *r["distractors"]]) == 0
    n = max(len(sample), 1)
    result = {"questions": len(sample), "exact_match": hits / n,
              "majority_baseline": sum(common[r["relation"]] == r["answer"] for r in sample) / n,
              "rank_accuracy": ranked / n, "choices": 1 + len(sample[0]["distractors"]) if sample else 10,
              "format_ok": closed_n / n}
    print(f"held-in facts ({len(sample)} questions about people seen in SFT): exact match "
          f"{result['exact_match']:.0%} (always the most common answer: {result['majority_baseline']:.0%}), "
          f"true answer ranked first of {result['choices']} {result['rank_accuracy']:.0%} "
          f"(chance {1 / result['choices']:.0%}); {result['format_ok']:.0%} of replies closed with <|end|>")
    return result
