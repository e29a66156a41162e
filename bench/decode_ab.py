"""Batch-1 decode of two lmstack checkouts (before / after a change), interleaved on one machine.

    .venv/bin/python bench/decode_ab.py --checkouts /path/to/main . [--shape small 15m 110m]
        [--dtype fp32|bf16|both] [--new-tokens N] [--rounds N]

On a shared machine the load changes from minute to minute, so two benchmark runs taken ten
minutes apart do not compare. This runs `lmstack.engine.generate` (greedy, 16-token prompt) of
each checkout in its own subprocess (PYTHONPATH=checkout), alternating checkouts round after
round, and keeps each side's fastest round in CPU time per token (1 thread: what the work cost
even when other jobs take the core away). Models as in bench/llamacpp_decode.py: `small` =
runs/small/chat, `15m` / `110m` = llama2.c's shapes with random weights (seed 0). Prints ms of
CPU per token, tokens per CPU-second and the ratio to the first checkout. A benchmark, not a
test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import load  # bench/common.py (scripts run from bench/)

ROOT = Path(__file__).resolve().parents[1]

# One round in the subprocess: build, warm up, time one generate; print JSON.
CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from lmstack.config import ModelConfig
from lmstack.engine import for_inference, generate
from lmstack.model import GPT
from lmstack.modelio import load_model
shape, dt, n, trained = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
shapes = {"15m": dict(n_layer=6, n_head=6, d_model=288, vocab_size=32000, max_seq_len=256),
          "110m": dict(n_layer=12, n_head=12, d_model=768, vocab_size=32000, max_seq_len=1024)}
if shape == "small":
    m = load_model(trained)
else:
    torch.manual_seed(0)
    m = GPT(ModelConfig(**shapes[shape]))
m = for_inference(m, dt)
prompt = list(range(20, 36))
generate(m, prompt, 8, temperature=0)
c = time.process_time()
ids = generate(m, prompt, n, temperature=0)
print(json.dumps({"cpu_s_per_token": (time.process_time() - c) / n, "ids": ids[:8]}))
"""


def one_round(checkout: str, shape: str, dt: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve()), "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run([sys.executable, "-c", CHILD, shape, dt, str(n), str(ROOT / "runs" / "small" / "chat")],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkouts", nargs="+", required=True, help="lmstack checkouts; the first is the baseline")
    ap.add_argument("--shape", nargs="+", choices=["small", "15m", "110m"], default=["small", "15m", "110m"])
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"checkouts: {args.checkouts}, 1 thread, load {load()}", flush=True)
    table = []
    for shape in args.shape:
        for dt in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
            best = {c: float("inf") for c in args.checkouts}
            ids = {}
            for _ in range(args.rounds):
                for c in args.checkouts:
                    r = one_round(c, shape, dt, args.new_tokens)
                    best[c], ids[c] = min(best[c], r["cpu_s_per_token"]), r["ids"]
            base = best[args.checkouts[0]]
            same = all(v == ids[args.checkouts[0]] for v in ids.values())
            cells = "  ".join(f"{c}: {best[c] * 1e3:.3f} ms ({1 / best[c]:.0f} tok/CPU-s, {base / best[c]:.2f}x)"
                              for c in args.checkouts)
            print(f"{shape:5s} {dt}: {cells} | same first tokens: {same} | load {load()}", flush=True)
            table.append((shape, dt, [best[c] for c in args.checkouts], load()))
    print("\n| shape | dtype | " + " | ".join(f"{c} ms CPU/token" for c in args.checkouts) + " | ratio | load |")
    print("|---|---|" + "---|" * len(args.checkouts) + "---|---|")
    for shape, dt, b, ld in table:
        print(f"| {shape} | {dt} | " + " | ".join(f"{x * 1e3:.2f}" for x in b) + f" | {b[0] / b[-1]:.2f}x | {ld} |")


if __name__ == "__main__":
    main()
