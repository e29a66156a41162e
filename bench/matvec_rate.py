"""How fast one thread streams a model's weights through matrix-vector products, by kernel.

    .venv/bin/python bench/matvec_rate.py [--shape small 110m] [--passes N]

Batch-1 decode is one matrix-vector product per weight matrix per token, so the rate at which a
kernel streams the weights bounds the tokens per second. For each shape this cycles through the
matrices of one decode step (after `for_inference`'s fusion: per layer q/k/v, o, gate/up, down,
then the head), with random weights, and times a pass through all of them with: `F.linear`
(MKL / oneDNN behind torch), `PackedLinear` (oneDNN pre-packed, the engine's default), and, in
fp32, numpy's `@` (its bundled OpenBLAS `sgemv`, the kernel of `lmstack export twofile`'s
run.py). GB/s = weight bytes per pass / CPU seconds per pass (best of 5 rounds). `small` has
runs/small/chat's shape (6 x 256, 4 heads, ffn 704, vocab 3444), `110m` llama2.c's stories110M
(12 x 768, ffn 2048, vocab 32000). A benchmark, not a test: it asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read when numpy loads OpenBLAS: before the import
import numpy as np
import torch
import torch.nn.functional as F

from common import load  # bench/common.py (scripts run from bench/)

SHAPES = {"small": dict(n_layer=6, d=256, kv=256, ffn=704, vocab=3444),
          "110m": dict(n_layer=12, d=768, kv=768, ffn=2048, vocab=32000)}


def matrices(shape: str) -> list[tuple[int, int]]:
    s = SHAPES[shape]
    d, kv, ffn = s["d"], s["kv"], s["ffn"]
    return [(d + 2 * kv, d), (d, d), (2 * ffn, d), (d, ffn)] * s["n_layer"] + [(s["vocab"], d)]


def best_pass(fn, passes: int) -> float:
    fn()
    best = float("inf")
    for _ in range(5):
        c = time.process_time()
        for _ in range(passes):
            fn()
        best = min(best, (time.process_time() - c) / passes)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--passes", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread, load {load()}")
    for shape in args.shape:
        shapes = matrices(shape)
        for dt in (torch.float32, torch.bfloat16):
            ws = [torch.randn(o, i).to(dt) for o, i in shapes]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
            xs = {i: torch.randn(1, 1, i).to(dt) for _, i in shapes}
            nbytes = sum(w.numel() * w.element_size() for w in ws)
            kernels = {
                "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
                "PackedLinear": lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")
                                         for w, p in zip(ws, packed)],
            }
            if dt == torch.float32:
                nws, nxs = [w.numpy() for w in ws], {i: x.view(-1).numpy() for i, x in xs.items()}
                kernels["numpy (OpenBLAS)"] = lambda: [w @ nxs[w.shape[1]] for w in nws]
            with torch.inference_mode():
                rates = {k: nbytes / best_pass(fn, args.passes) / 1e9 for k, fn in kernels.items()}
            cells = ", ".join(f"{k} {v:.1f}" for k, v in rates.items())
            print(f"{shape:5s} {str(dt)[6:]:8s} {nbytes / 1e6:6.1f} MB a step: GB/s per CPU-second: {cells} | "
                  f"load {load()}", flush=True)


if __name__ == "__main__":
    main()
