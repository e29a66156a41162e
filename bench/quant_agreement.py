"""Greedy agreement of a quantized model with fp32: the same prompts decoded greedily at fp32 and
at bf16 / int8 / int4 (`for_inference`), compared token by token.

    .venv/bin/python bench/quant_agreement.py --model runs/sr3/chat [--prompts N] [--new-tokens N]
        [--dtype bf16 int8 int4] [--threads 1]

Prompts: the world's fact questions (probes/facts.jsonl of the model's world, from its lineage)
as a chat turn for a chat model, as the cloze text for a base model. Each prompt is
decoded alone (batch 1, as a user's request is) up to --new-tokens tokens or the model's stop token
(the end of a chat turn; EOS for a base model). Printed per dtype: the share of replies identical to
fp32's, the mean number of tokens before the first difference, and the share of fp32's positions
where the same token came (after a difference the two texts go their own ways, so that last one
also counts what happens to come back into step).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.chatformat import chat_format, render_chat
from lmstack.engine import for_inference, generate
from lmstack.modelio import lineage, load_model_and_tokenizer


def prompts_for(model_dir: Path, tok, chat: bool, n: int, world: str | None) -> list[list[int]]:
    world = world or lineage(model_dir).get("world")
    if world is None:
        raise SystemExit(f"{model_dir}: no world found in its lineage; pass --world")
    rows = [json.loads(line) for line in (Path(world) / "probes" / "facts.jsonl").read_text().splitlines()[:n]]
    if chat:
        return [render_chat(tok, [{"role": "user", "content": r["question"]}], add_generation_prompt=True)[0]
                for r in rows]
    return [tok.bos + tok.encode(r["cloze"]) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--world", help="the world folder (default: from the model's run.json)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = Path(args.model)
    net, tok = load_model_and_tokenizer(d, "cpu")
    prompts = prompts_for(d, tok, lineage(d).get("chat", False), args.prompts, args.world)
    n = args.new_tokens

    chat = lineage(d).get("chat", False)
    stops = chat_format(tok).stop_ids if chat else tok.text_stop_ids

    def decode(model):
        return [generate(model, p, max_tokens=min(n, model.cfg.max_seq_len - len(p)), temperature=0.0,
                         stop_ids=stops) for p in prompts]

    t0 = time.time()
    ref = decode(for_inference(copy.deepcopy(net), "fp32"))
    print(f"{d}: {len(prompts)} prompts x {n} greedy tokens, fp32 reference in {time.time() - t0:.0f}s, load {load()}")
    mean_len = statistics.mean(len(r) for r in ref)
    rows = []
    for dt in args.dtype:
        out = decode(for_inference(copy.deepcopy(net), dt))
        first = [next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), min(len(r), len(o)))
                 for r, o in zip(ref, out)]
        same = sum(r == o for r, o in zip(ref, out)) / len(ref)
        pos = sum(a == b for r, o in zip(ref, out) for a, b in zip(r, o)) / sum(len(r) for r in ref)
        row = dict(model=str(d), dtype=dt, prompts=len(prompts), new_tokens=n, identical=round(same, 3),
                   tokens_before_first_difference=round(statistics.mean(first), 1), positions_agree=round(pos, 3))
        rows.append(row)
        print(f"{dt:5s} identical to fp32 {same:6.1%} | mean tokens before the first difference "
              f"{row['tokens_before_first_difference']:5.1f} (fp32's replies: {mean_len:.1f}) | positions that agree "
              f"{pos:6.1%}", flush=True)
    emit(dict(rows=rows, loadavg=load()), args.json)


if __name__ == "__main__":
    main()
