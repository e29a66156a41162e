"""Where a batch-1 decode step's time goes: CPU time per step and the torch profiler's table.

    .venv/bin/python bench/decode_profile.py [--shape small 110m] [--dtype fp32|bf16|both]
        [--steps N] [--rounds N] [--top N] [--threads N] [--compile] [--json FILE]

`small` is runs/small/chat (bench/llamacpp_decode.py's trained model); `110m` is the stories110M
shape with random weights (as there). The model goes through `for_inference(model, dtype)`, then
`prefill` of a 16-token random prompt and `--steps` calls of `engine.decode_one_token` with the
argmax fed back (no sampling, no deltas: the model's step alone; the prefill's cost is spread
over the steps). `--compile`: the same through `torch.compile(decode_one_token)` (inductor,
dynamic shapes) on the unpacked model, its compilation in the printed warm-up time. Printed
per shape and dtype: ms per step (wall and CPU; the fastest of `--rounds` rounds), the
profiler's operator count per step, the time inside the matrix products (oneDNN / addmm / mm / linear kernels) against everything else, and the `--top`
operators by self CPU time. A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.config import ModelConfig
from lmstack.engine import decode_one_token, for_inference, prefill
from lmstack.model import GPT
from lmstack.modelio import load_model

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"110m": dict(n_layer=12, n_head=12, d_model=768, vocab_size=32000, max_seq_len=1024)}
MATMULS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm")


def build(shape: str) -> GPT:
    if shape == "small":
        return load_model(ROOT / "runs" / "small" / "chat")
    torch.manual_seed(0)
    return GPT(ModelConfig(**SHAPES[shape]))


def steps(model, prompt, n: int, step=decode_one_token) -> None:
    model.setup_cache(1, prompt.shape[1] + n + 1)
    logits = prefill(model, prompt)
    for i in range(n):
        logits = step(model, logits.argmax(-1), prompt.shape[1] + i)
    model.clear_cache()


def run(shape: str, dt: str, n: int, top: int, rounds: int, compile: bool = False) -> dict:
    # compiled: inductor cannot trace the opaque packed oneDNN weights, so the model is unpacked
    model = for_inference(build(shape), dt, pack=False if compile else None)
    step = torch.compile(decode_one_token, dynamic=True, fullgraph=True) if compile else decode_one_token
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(16, model.cfg.vocab_size, (1, 16), generator=g)
    with torch.inference_mode():
        t0 = time.perf_counter()
        steps(model, prompt, 8, step)  # warm-up (and the compilation)
        steps(model, prompt, 8, step)
        warm = time.perf_counter() - t0
        walls, cpus = [], []
        for _ in range(rounds):  # the fastest round: the least disturbed by other jobs
            w, c = time.perf_counter(), time.process_time()
            steps(model, prompt, n, step)
            walls.append((time.perf_counter() - w) / n)
            cpus.append((time.process_time() - c) / n)
        wall, cpu = min(walls), min(cpus)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps(model, prompt, n, step)
    events = prof.key_averages()
    # Operator calls, the ones nested inside others included (e.g. rms_norm's parts).
    ops = [e for e in events if e.key.startswith(("aten::", "mkldnn::", "inductor", "Torch-Compiled"))]
    total_self = sum(e.self_cpu_time_total for e in events) / n / 1e3  # ms per step
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMULS
             or e.key.startswith(("aten::_mkl", "mkldnn"))) / n / 1e3
    count = sum(e.count for e in ops) / n
    row = dict(shape=shape, dtype=dt, compiled=compile, warmup_s=round(warm, 1), ms_per_step=round(wall * 1e3, 3), cpu_ms_per_step=round(cpu * 1e3, 3),
               ops_per_step=round(count, 1), profiled_ms=round(total_self, 3), matmul_ms=round(mm, 3),
               tok_per_cpu_s=round(1 / cpu, 1), loadavg=load())
    print(f"\n== {shape} {dt}{' compiled' if compile else ''} (warm-up {warm:.1f} s): {wall * 1e3:.3f} ms/step wall, {cpu * 1e3:.3f} ms CPU ({1 / cpu:.0f} tok per CPU-s); "
          f"profiled {total_self:.3f} ms/step of which matrix products {mm:.3f} ms "
          f"({mm / max(total_self, 1e-9):.0%}); {count:.0f} operator calls per step | load {load()}")
    print(f"{'operator':40s} {'calls/step':>10s} {'self ms/step':>12s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"{e.key[:40]:40s} {e.count / n:10.1f} {e.self_cpu_time_total / n / 1e3:12.4f}")
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=["small", *SHAPES], default=["small", "110m"])
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of --steps (the fastest is kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile decode_one_token (inductor, dynamic shapes; the model unpacked)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, python {sys.version.split()[0]}, load {load()}")
    rows = [run(s, dt, args.steps, args.top, args.rounds, args.compile) for s in args.shape
            for dt in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype])]
    emit(dict(torch=torch.__version__, threads=args.threads, rows=rows), args.json)


if __name__ == "__main__":
    main()
