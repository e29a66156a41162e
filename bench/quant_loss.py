"""What quantization costs in loss: ours at fp32 / bf16 / int8 / int4 (`for_inference`) and llama.cpp
at F32 / Q8_0 / Q4_0 (our GGUF export) on the same held-out token windows.

    .venv/bin/python bench/quant_loss.py --model runs/sr3/base [--data DIR] [--windows N]
        [--dtype fp32 bf16 int8 int4] [--gguf f32 q8_0 q4_0] [--json FILE]

The windows are `lmstack eval`'s language-modelling windows (consecutive, the model's context long,
of the model's own validation split, or --data's). Printed: loss per token and bits per byte, and
the loss difference from our fp32 with a 95% interval over the windows (paired: the same tokens).
llama.cpp (llama-cpp-python, skipped when not installed) scores each window from a fresh context
with its logits at every position.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.data import iter_eval_windows, target_bytes
from lmstack.engine import for_inference
from lmstack.export.gguf import export_gguf
from lmstack.modelio import lineage, load_model_and_tokenizer


def per_window_nats(logits_fn, windows) -> list[float]:
    out = []
    for x, y in windows:
        logits = logits_fn(x).float()
        out.append(float(torch.nn.functional.cross_entropy(logits, y, reduction="sum", ignore_index=-100)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", help="prepared token shards (default: the model's own)")
    ap.add_argument("--windows", type=int, default=64, help="at most this many windows")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "int8", "int4"])
    ap.add_argument("--gguf", nargs="*", default=["f32", "q8_0", "q4_0"])
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = Path(args.model)
    net, tok = load_model_and_tokenizer(d, "cpu")
    data = args.data or lineage(d)["data"]
    T = net.cfg.max_seq_len
    windows = [(x[i], y[i]) for x, y in iter_eval_windows(data, "val", batch_size=1, seq_len=T,
                                                          max_batches=args.windows) for i in range(len(x))]
    tb = torch.tensor(tok.token_bytes(), dtype=torch.int64)
    ntok = sum(int((y >= 0).sum()) for _, y in windows)
    nbytes = sum(int(target_bytes((x[None], y[None]), tb)) for x, y in windows)
    print(f"{d}: {len(windows)} windows of {T} tokens of {data} (val), {ntok} tokens, load {load()}", flush=True)

    results = {}
    for dt in args.dtype:
        m, _ = load_model_and_tokenizer(d, "cpu")
        m = for_inference(m, dt)
        with torch.inference_mode():
            results[f"ours {dt}"] = per_window_nats(lambda x: m(x[None])[0], windows)
    if args.gguf:
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python not installed: llama.cpp rows skipped")
            args.gguf = []
    with tempfile.TemporaryDirectory(prefix="quant-loss-") as tmp:
        for q in args.gguf:
            path = export_gguf(d, Path(tmp) / f"{q}.gguf", dtype=q)
            llm = Llama(model_path=str(path), n_ctx=T, n_threads=1, n_batch=T, logits_all=True, verbose=False)

            def logits(x):
                llm.reset()
                llm.eval(x.tolist())
                return torch.from_numpy(np.array(llm.scores[:len(x)]))

            results[f"llama.cpp {q.upper()}"] = per_window_nats(logits, windows)
            llm.close()

    ref = np.array(results[next(iter(results))])
    rows = []
    print(f"\n| model | weights | loss per token | bits per byte | loss - ours {args.dtype[0]} (95% CI over windows) |")
    print("|---|---|---|---|---|")
    for name, nats in results.items():
        nats = np.array(nats)
        diff = (nats - ref) / (ntok / len(windows))  # per-token difference, window by window
        half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        loss, bpb = nats.sum() / ntok, nats.sum() / (math.log(2) * nbytes)
        rows.append(dict(weights=name, loss=round(loss, 5), bpb=round(bpb, 5), diff=round(diff.mean(), 5),
                         ci=[round(diff.mean() - half, 5), round(diff.mean() + half, 5)]))
        print(f"| {d.name} | {name} | {loss:.4f} | {bpb:.4f} | {diff.mean():+.4f} [{diff.mean() - half:+.4f}, "
              f"{diff.mean() + half:+.4f}] |", flush=True)
    emit(dict(model=str(d), windows=len(windows), tokens=ntok, rows=rows, loadavg=load()), args.json)


if __name__ == "__main__":
    main()
