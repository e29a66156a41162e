"""One matrix-vector product (batch-1 decode's work) per weight format, at the 110M shape's sizes:
packed bf16 (what `for_inference(model, "bf16")` runs on a CPU) against int8 and int4 (lmstack/quant.py)
and, for reference, torch's int8 product with 8-bit activations (fbgemm's `quantized.linear_dynamic`,
not used by lmstack).

    .venv/bin/python bench/quant_kernels.py [--threads 1] [--repeats 200]

Times are CPU time per call, the median of 5 rounds, each call on the next of enough copies of the
weight (--mb of them in bf16) that the weights come from memory, as in a model's decode step
(--mb 0: one copy, in cache); the ratio is packed bf16's time over the format's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

from common import load  # bench/common.py (scripts run from bench/)
from lmstack.engine import PackedLinear
from lmstack.quant import Int4Linear, Int8Linear, quantize_int8

SHAPES = [(2048, 768, "up/gate 2048 x 768"), (768, 2048, "down 768 x 2048"), (768, 768, "q/k/v/o 768 x 768"),
          (32000, 768, "head 32000 x 768")]


def cpu_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        c = time.process_time()
        for _ in range(repeats):
            fn()
        rounds.append((time.process_time() - c) / repeats * 1e6)
    return statistics.median(rounds)


def w8a8(linear):
    """fbgemm's int8 x int8 product, activations quantized per call (per tensor); None if unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.quantized.engine = "fbgemm"
            q, s = quantize_int8(linear.weight)
            qw = torch._make_per_channel_quantized_tensor(q, s.double(), torch.zeros_like(s, dtype=torch.long), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)
    except (RuntimeError, AttributeError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--mb", type=int, default=256, help="bf16 megabytes of weight copies cycled through (0: one copy)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.mb} MB of bf16 copies, load {load()}")
    print("| matrix | packed bf16 us | int8 us (ratio) | int4 us (ratio) | int8 x 8-bit activations us (ratio) |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    for n, k, name in SHAPES:
        lin = torch.nn.Linear(k, n, bias=False)
        x32, x16 = torch.randn(1, k), torch.randn(1, k).bfloat16()
        # enough copies of the weight that they do not fit in the caches, as a model's weights do not
        copies = max(1, -(-args.mb * 2**20 // (2 * n * k)))
        make = {"bf16": lambda: PackedLinear(copy.deepcopy(lin).to(torch.bfloat16)), "int8": lambda: Int8Linear(lin),
                "int4": lambda: Int4Linear(lin), "w8a8": lambda: w8a8(lin)}
        t = {}
        with torch.inference_mode():
            for kind, new in make.items():
                fs = [new() for _ in range(copies)]
                if fs[0] is None:
                    t[kind] = float("nan")
                    continue
                x = x32 if kind == "w8a8" else x16
                calls = iter(fs * (10 * args.repeats))  # the copies in turn, more calls than cpu_us makes
                t[kind] = cpu_us(lambda: next(calls)(x), args.repeats)
        r = {k_: t["bf16"] / v for k_, v in t.items()}
        print(f"| {name} | {t['bf16']:.1f} | {t['int8']:.1f} ({r['int8']:.2f}x) | {t['int4']:.1f} ({r['int4']:.2f}x) | "
              f"{t['w8a8']:.1f} ({r['w8a8']:.2f}x) |", flush=True)
    print(f"load {load()}")


if __name__ == "__main__":
    main()
