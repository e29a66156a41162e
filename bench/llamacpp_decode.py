"""Batch-1 decode throughput: lmstack's engine against llama.cpp (llama-cpp-python) on the same
weights at the same precision, through our GGUF export.

    .venv/bin/python bench/llamacpp_decode.py [--shape small 15m 110m] [--dtype fp32 bf16 int8 int4 | both]
        [--new-tokens N] [--prompt-len N] [--repeats N] [--threads N] [--trained DIR] [--json FILE]

Needs `pip install gguf llama-cpp-python` (the latter compiles llama.cpp; with
CMAKE_ARGS="-DGGML_NATIVE=ON" it uses this CPU's instructions, AVX512-BF16 included).

Shapes: `small` is the trained runs/small/chat (5.9M params, 6 x 256, vocab 4096, context 256;
`--trained DIR` names another trained model folder, e.g. a speedrun's chat model);
`15m` and `110m` are llama2.c's stories15M (6 layers, d 288, 6 heads, vocab 32000, context 256)
and stories110M (12 layers, d 768, 12 heads, vocab 32000, context 1024) shapes with random
weights (speed does not depend on the weights), tied embeddings, the tokenizer of runs/small/chat
(or a tiny one trained here) padded to 32000 entries in the GGUF.

Each model is exported with `lmstack.export.gguf.export_gguf` into a temporary folder: F32 for our
fp32, BF16 for our bf16, Q8_0 for our int8, Q4_0 for our int4 (norms F32 in all): the same
precision class, not the same rounding (lmstack/quant.py: per-row int8 scales and bf16 activations
against llama.cpp's blocks of 32 that also round the activations to 8 bits). Ours:
`lmstack.engine.generate` (greedy) on `for_inference(model, dtype)`. llama.cpp: `Llama.eval` on the same prompt ids, then one token
at a time, each the argmax of llama.cpp's logits (what our greedy does; no sampler chain, no
stop token). Both decode `--new-tokens` tokens after the same `--prompt-len` random prompt;
tok/s counts new tokens over the whole call (the short prefill included, the same work on both
sides). Runs alternate ours / llama.cpp and the median of `--repeats` is kept. Before timing,
the first 16 greedy tokens of both are compared (printed as agreement: with random weights the
top logits are close together, so fp32 rounding differences can flip one).

A benchmark, not a test: it prints figures and ratios and asserts nothing about time. Every line
carries the load average (other jobs on a shared machine skew 2-thread figures badly: take them
on an idle machine, or with --threads 1, where each line also gives tokens per CPU-second: the
cost of the work even when other jobs take the core away part of the time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.config import ModelConfig
from lmstack.engine import for_inference, generate
from lmstack.model import GPT
from lmstack.export.gguf import export_gguf
from lmstack.tokenizer import Tokenizer
from lmstack.modelio import load_model, save_weights
from lmstack.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
TRAINED = ROOT / "runs" / "small" / "chat"
SHAPES = {
    # llama2.c's stories15M / stories110M shapes (ffn 768 / 2048 = our 8/3 * d rounded to 64)
    "15m": dict(n_layer=6, n_head=6, d_model=288, vocab_size=32000, max_seq_len=256),
    "110m": dict(n_layer=12, n_head=12, d_model=768, vocab_size=32000, max_seq_len=1024),
}
GGUF_DTYPE = {"fp32": "f32", "bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def model_folder(shape: str, tmp: Path) -> Path:
    """runs/small/chat (or --trained) as is, or a random-weight model folder of a named shape."""
    if shape == "small":
        if not (TRAINED / "model.safetensors").is_file():
            raise SystemExit(f"{TRAINED} not found (train it, or leave 'small' out of --shape)")
        return TRAINED
    d = tmp / shape
    d.mkdir()
    if (TRAINED / "tokenizer.json").is_file():
        shutil.copy(TRAINED / "tokenizer.json", d / "tokenizer.json")
    else:
        from lmstack.tokenizer import train_tokenizer

        (tmp / "text.txt").write_text("The quick brown fox jumps over the lazy dog. 1234 + 5678.\n" * 200)
        train_tokenizer([tmp / "text.txt"], vocab_size=400, out=tmp / "tok", progress=False).save(d)
    cfg = ModelConfig(**SHAPES[shape])
    torch.manual_seed(0)
    save_weights(GPT(cfg), d / "model.safetensors")
    atomic_write_json(d / "config.json", dataclasses.asdict(cfg))
    return d


def last_logits(llm) -> np.ndarray:
    """The logits of the last token llama.cpp evaluated (Llama.scores keeps them only with
    logits_all=True, which would compute the head at every prompt position)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp: evaluate the prompt, then n greedy tokens (argmax of the last logits)."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(last_logits(llm))))
        llm.eval(out[-1:])
    return out


def ours_greedy(model, ids: list[int], n: int) -> list[int]:
    return generate(model, ids, max_tokens=n, temperature=0.0)


def run(shape: str, dt: str, tmp: Path, new_tokens: int, prompt_len: int, repeats: int, threads: int) -> dict:
    from llama_cpp import Llama

    folder = model_folder(shape, tmp) if not (tmp / shape).exists() else tmp / shape
    path = export_gguf(folder, tmp / f"{shape}-{dt}.gguf", dtype=GGUF_DTYPE[dt], force=True)
    model = load_model(folder)
    n_params = sum(p.numel() for p in model.parameters())  # before packing (packed weights are not parameters)
    model = for_inference(model, dt)
    cfg = model.cfg
    llm = Llama(model_path=str(path), n_ctx=min(cfg.max_seq_len, prompt_len + new_tokens + 16),
                n_threads=threads, n_threads_batch=threads, n_batch=512, logits_all=False, verbose=False)
    g = torch.Generator().manual_seed(1)
    n_tok = Tokenizer.load(folder).vocab_size  # ids the tokenizer knows (the rest are GGUF padding)
    prompt = torch.randint(16, n_tok, (prompt_len,), generator=g).tolist()

    a, b = ours_greedy(model, prompt, 16), llama_greedy(llm, prompt, 16)  # also the warm-up
    agree = sum(x == y for x, y in zip(a, b)) / 16
    runs = {"ours": lambda: ours_greedy(model, prompt, new_tokens),
            "llama.cpp": lambda: llama_greedy(llm, prompt, new_tokens)}
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            got = fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
            assert len(got) == new_tokens, (k, len(got))
    tok_s = {k: new_tokens / statistics.median(v) for k, v in wall.items()}
    tok_cpu_s = {k: new_tokens / statistics.median(v) for k, v in cpu.items()}
    row = dict(shape=shape, params_m=round(n_params / 1e6, 1), dtype=dt, gguf=GGUF_DTYPE[dt].upper(),
               threads=threads, new_tokens=new_tokens, prompt_len=prompt_len,
               tok_s={k: round(v, 1) for k, v in tok_s.items()},
               ratio=round(tok_s["ours"] / tok_s["llama.cpp"], 2), greedy_agreement=agree, loadavg=load())
    line = (f"{shape:5s} {n_params / 1e6:6.1f}M {dt:4s} (GGUF {row['gguf']:4s}) {threads} thr: "
            f"ours {tok_s['ours']:7.1f} tok/s  llama.cpp {tok_s['llama.cpp']:7.1f} tok/s  "
            f"ours/llama.cpp {row['ratio']:.2f}x")
    if threads == 1:  # one thread each: CPU time is what the work cost even when other jobs take the core
        row["tok_per_cpu_s"] = {k: round(v, 1) for k, v in tok_cpu_s.items()}
        row["cpu_ratio"] = round(tok_cpu_s["ours"] / tok_cpu_s["llama.cpp"], 2)
        line += (f" | per CPU-second: ours {tok_cpu_s['ours']:.0f}, llama.cpp {tok_cpu_s['llama.cpp']:.0f}, "
                 f"{row['cpu_ratio']:.2f}x")
    print(f"{line} | greedy agreement {agree:.0%} | load {row['loadavg']}", flush=True)
    llm.close()
    return row


def main():
    global TRAINED
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", choices=["small", *SHAPES], default=["small", *SHAPES])
    ap.add_argument("--dtype", nargs="+", choices=[*GGUF_DTYPE, "both"], default=["both"],
                    help="ours (GGUF): fp32 (F32), bf16 (BF16), int8 (Q8_0), int4 (Q4_0); both = fp32 bf16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads on both sides (torch and llama.cpp)")
    ap.add_argument("--trained", default=str(TRAINED), help="the trained model folder of the 'small' shape")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    TRAINED = Path(args.trained)
    torch.set_num_threads(args.threads)
    import llama_cpp

    print(f"torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, load {load()}")
    print(f"llama.cpp: {llama_cpp.llama_print_system_info().decode().strip()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llamacpp-bench-") as tmp:
        for shape in args.shape:
            for dt in [d for x in args.dtype for d in (["fp32", "bf16"] if x == "both" else [x])]:
                rows.append(run(shape, dt, Path(tmp), args.new_tokens, args.prompt_len, args.repeats, args.threads))
    print("\n| shape | params | dtype (GGUF) | threads | ours tok/s | llama.cpp tok/s | ours/llama.cpp | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['params_m']}M | {r['dtype']} ({r['gguf']}) | {r['threads']} | {r['tok_s']['ours']} | "
              f"{r['tok_s']['llama.cpp']} | {r['ratio']:.2f}x | {r['loadavg']} |")
    emit(dict(torch=torch.__version__, llama_cpp=llama_cpp.__version__, threads=args.threads, rows=rows), args.json)


if __name__ == "__main__":
    main()
