"""Data-parallel training on CPU (gloo): one process against 2 ranks (DDP and FSDP2), and the cost
of activation checkpointing (AC), at the same global batch.

    .venv/bin/python bench/train_parallel.py [--shape small|tiny] [--steps N] [--rounds N] [--json FILE]

Each configuration runs in its own process (2 ranks: under torchrun), one thread per rank, on random
tokens at the preset's micro batch and global batch (one process accumulates twice the micro-batches
of each of 2 ranks). A step is the loop's step, through the loop's own pieces (distributed.parallelize,
no_sync, clip_grad_norm_, build_optimizer, next_token_loss): micro-batches with the gradient sync on
the last one only, gradients normalised by the global token count, clipping, AdamW. Reported per
configuration: the median step after 2 warm-up steps, tokens/s, tokens per CPU-second (tokens/s over
ranks x threads: what holds on a busy machine), the bytes of parameters + gradients + AdamW state one
rank holds (its shards under FSDP), and rank 0's peak resident memory (ru_maxrss) over what it held
before building the model (activations included: what AC shrinks). Ratios are against the one
process run of the same round.

A benchmark, not a test: it prints figures and asserts nothing about time. On a busy machine run
--rounds 2 or more and read the spread; every line carries the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import free_port, load  # bench/common.py (scripts run from bench/)

CONFIGS = [  # (name, ranks, train.parallel, activation checkpointing)
    ("1 process", 1, "ddp", False),
    ("2 ranks DDP", 2, "ddp", False),
    ("2 ranks FSDP", 2, "fsdp", False),
    ("1 process + AC", 1, "ddp", True),
    ("2 ranks FSDP + AC", 2, "fsdp", True),
]


def worker(shape: str, steps: int, parallel: str, ac: bool) -> None:
    """One rank (or the one process): build, wrap, train `steps` steps, print a JSON line on rank 0."""
    from lmstack import distributed
    from lmstack.config import load_config
    from lmstack.model import GPT
    from lmstack.train.loop import build_optimizer
    from lmstack.train.objectives import next_token_loss

    torch.set_num_threads(1)
    info = distributed.init("cpu")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config(shape, ["model.vocab_size=4096"])
    tc = cfg.train
    torch.manual_seed(0)
    model = GPT(cfg.model)
    _, train_model = distributed.parallelize(model, parallel, ac)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    grad_accum = tc.batch_tokens // (tc.micro_batch_size * tc.seq_len * info.world_size)
    gen = torch.Generator().manual_seed(info.rank)
    times, held = [], 0
    for step in range(steps + 2):
        t0 = time.perf_counter()
        for micro in range(grad_accum):
            x = torch.randint(0, cfg.model.vocab_size, (tc.micro_batch_size, tc.seq_len + 1), generator=gen)
            with distributed.no_sync(train_model, skip=micro < grad_accum - 1):
                loss_sum, n = next_token_loss(train_model, (x[:, :-1], x[:, 1:]))
                loss_sum.backward()
        scale = info.world_size / tc.batch_tokens  # the loop's normalisation by the global token count
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        distributed.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        if step == 0:  # what this rank holds: its (shards of) parameters, gradients, AdamW moments
            tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
            tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
            held = sum(_local(t).numel() * _local(t).element_size() for t in tensors)
        optimizer.zero_grad(set_to_none=True)
        distributed.barrier()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if distributed.is_main():
        print("RESULT " + json.dumps({"step_s": statistics.median(times), "held_bytes": held,
                                      "rss_growth_bytes": (peak - rss0) * 1024, "params": model.num_params(),
                                      "batch_tokens": tc.batch_tokens, "grad_accum": grad_accum}), flush=True)
    distributed.cleanup()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def run_config(shape, steps, ranks, parallel, ac) -> dict:
    here = Path(__file__).resolve()
    args = ["--worker", "--shape", shape, "--steps", str(steps), "--parallel", parallel] + (["--ac"] if ac else [])
    if ranks == 1:
        cmd = [sys.executable, str(here), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=bench", str(here), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-3000:])
    return json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="small", help="a preset: small | tiny")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=1, help="every configuration this many times, in turn")
    ap.add_argument("--json", help="append the results to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--ac", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.shape, a.steps, a.parallel, a.ac)
    print(f"{'round':>5} {'configuration':<20} {'step s':>7} {'tok/s':>7} {'tok/CPU-s':>9} {'vs 1 proc':>9} "
          f"{'held MB/rank':>12} {'RSS growth MB':>13}  load")
    for rnd in range(a.rounds):
        base = None
        for name, ranks, parallel, ac in CONFIGS:
            r = run_config(a.shape, a.steps, ranks, parallel, ac)
            tok_s = r["batch_tokens"] / r["step_s"]
            base = base or tok_s
            row = {"round": rnd, "config": name, "shape": a.shape, "ranks": ranks, "parallel": parallel, "ac": ac,
                   "step_s": round(r["step_s"], 4), "tok_s": round(tok_s, 1), "tok_per_cpu_s": round(tok_s / ranks, 1),
                   "ratio_vs_1": round(tok_s / base, 3), "held_mb_per_rank": round(r["held_bytes"] / 2**20, 2),
                   "rss_growth_mb": round(r["rss_growth_bytes"] / 2**20, 1), "params": r["params"],
                   "grad_accum": r["grad_accum"], "load": load()}
            print(f"{rnd:>5} {name:<20} {row['step_s']:>7.3f} {tok_s:>7,.0f} {row['tok_per_cpu_s']:>9,.0f} "
                  f"{row['ratio_vs_1']:>8.2f}x {row['held_mb_per_rank']:>12.2f} {row['rss_growth_mb']:>13.1f}  {row['load']}",
                  flush=True)
            if a.json:  # (the table above is the printout; the file gets the JSON lines)
                with open(a.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
