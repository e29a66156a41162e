"""Decode throughput: lmstack's engine against Hugging Face `generate` (with its KV cache).

    .venv/bin/python bench/decode_throughput.py [--shape 14m|gpt2|both] [--dtype fp32|bf16|both]
        [--batch 1 16] [--new-tokens N] [--prompt-len N] [--repeats N] [--threads N] [--json FILE]

Both sides run a model of the identical shape with the identical weights: our GPT, and an HF
LlamaForCausalLM that gets our weights by a pure rename (`model.` + name; tied embeddings),
cast to the same dtype. First they must agree: the same greedy tokens on the same prompts
(in bf16 the two may round differently, so there the agreement is printed, not required).
Then both greedily decode the same number of new tokens after the same short random prompt
(HF with min_new_tokens = max_new_tokens, so neither stops early), at batch 1 and batch 16.
Runs alternate ours / HF and the median of `--repeats` is kept, so a burst of load elsewhere
hits both. tok/s counts new tokens over the whole call (a short prompt's prefill included,
the same work on both sides).

The bandwidth line: at batch 1 each new token reads every weight once (the head's V x d matrix
too; the embedding only one row), so weights bytes / step is a floor on the time per token;
`GB/s` is what each side achieved, to compare with the machine's memory bandwidth (measured
here with a large copy, same thread count).

`ours-unpacked` is our engine without `PackedLinear` (what the oneDNN packing is worth).
With --threads 1 each line also gives tokens per CPU-second: what the work cost even when other
jobs take the core away part of the time (on a shared 2-core machine, 2 threads are unreliable:
a parallel op waits for its second thread's time slice whenever the other core is busy).

A benchmark, not a test: it prints figures and ratios and asserts nothing about time. Each
figure comes with the load average (other engineers' jobs skew it; measure again when quiet).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.config import ModelConfig
from lmstack.engine import for_inference, generate_batch
from lmstack.model import GPT

SHAPES = {
    # ~14M: a small Llama shape (6 x 384, vocab 8192); gpt2: GPT-2-small's 124M shape.
    "14m": dict(n_layer=6, n_head=6, d_model=384, vocab_size=8192, max_seq_len=512),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a large tensor copy (read + write counted): roughly the most decode can stream."""
    a = torch.empty(mb * 2**20 // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * a.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). With one thread, CPU time is what the work
    cost even when other jobs take the core away half the time: the load-robust figure."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def build_pair(shape: str, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = ModelConfig(**SHAPES[shape])
    torch.manual_seed(seed)
    ours = GPT(mc)
    hf_cfg = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.ffn_hidden,
        num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head, num_key_value_heads=mc.n_kv_head,
        max_position_embeddings=mc.max_seq_len, rope_theta=mc.rope_theta, rms_norm_eps=mc.norm_eps,
        tie_word_embeddings=mc.tie_embeddings, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(hf_cfg)
    sd = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.generation_config.pad_token_id = 0
    hf = hf.to(dtype).eval()
    # Our default (Linear weights packed for oneDNN on a CPU), and the same model without the
    # packing, to show what it is worth.
    unpacked = for_inference(copy.deepcopy(ours), dtype, pack=False)
    return {"ours": for_inference(ours, dtype), "ours-unpacked": unpacked}, hf


def ours_generate(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    return [c.ids for c in generate_batch(model, prompts.tolist(), max_tokens=n, temperature=0)]


def hf_generate(model, prompts: torch.Tensor, n: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
    return out[:, prompts.shape[1]:].tolist()


def weight_bytes(model) -> int:
    """Bytes of weights read per decode step: every weight once. The tied V x d table counts
    once: as the head (the embedding lookup reads one row of it). `model`: the HF LlamaModel
    (ours may hold packed weights, which are not parameters)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run(shape: str, dt: str, batches: list[int], new_tokens: int, prompt_len: int, repeats: int,
        bandwidth: float) -> list[dict]:
    variants, hf = build_pair(shape, DTYPES[dt])
    ours = variants["ours"]
    g = torch.Generator().manual_seed(1)
    wb = weight_bytes(hf.model)
    print(f"\n== {shape} {dt}: {hf.num_parameters() / 1e6:.1f}M params, {wb / 1e6:.0f} MB of weights read per "
          f"step -> at most {bandwidth * 1e9 / wb:.0f} steps/s at {bandwidth:.0f} GB/s", flush=True)
    rows = []
    for batch in batches:
        prompts = torch.randint(16, ours.cfg.vocab_size, (batch, prompt_len), generator=g)
        a, b = ours_generate(ours, prompts, 16), hf_generate(hf, prompts, 16)
        agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (batch * 16)
        if dt == "fp32":
            assert a == b, "greedy tokens differ from HF in fp32: the two models are not the same function"
        runs = {**{k: (ours_generate, m) for k, m in variants.items()}, "HF": (hf_generate, hf)}
        wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
        for fn, m in runs.values():  # warm-up
            fn(m, prompts, 4)
        for _ in range(repeats):
            for k, (fn, m) in runs.items():
                w, c = _timed_both(lambda: fn(m, prompts, new_tokens))
                wall[k].append(w)
                cpu[k].append(c)
        tok_s = {k: batch * new_tokens / statistics.median(v) for k, v in wall.items()}
        tok_cpu_s = {k: batch * new_tokens / statistics.median(v) for k, v in cpu.items()}
        row = dict(shape=shape, dtype=dt, batch=batch, new_tokens=new_tokens, prompt_len=prompt_len,
                   threads=torch.get_num_threads(), tok_s={k: round(v, 1) for k, v in tok_s.items()},
                   ratio=round(tok_s["ours"] / tok_s["HF"], 2), greedy_agreement=round(agree, 3),
                   tok_per_cpu_s={k: round(v, 1) for k, v in tok_cpu_s.items()},
                   cpu_ratio=round(tok_cpu_s["ours"] / tok_cpu_s["HF"], 2), loadavg=load())
        extra = "".join(f" ({k} {v:.1f}, {v / tok_s['HF']:.2f}x)" for k, v in tok_s.items() if k not in ("ours", "HF"))
        line = (f"{shape:4s} {dt:4s} batch {batch:2d}: ours {tok_s['ours']:7.1f} tok/s  HF {tok_s['HF']:7.1f} tok/s  "
                f"ours/HF {row['ratio']:.2f}x{extra}")
        if batch == 1:  # memory-bound: how fast the weights streamed
            row["weights_gb_s"] = {k: round(v * wb / 1e9, 1) for k, v in tok_s.items()}
            line += f" | weights at {row['weights_gb_s']['ours']:.0f} vs {row['weights_gb_s']['HF']:.0f} GB/s"
        if torch.get_num_threads() == 1:
            line += (f" | per CPU-second: ours {tok_cpu_s['ours']:.0f}, HF {tok_cpu_s['HF']:.0f}, "
                     f"{row['cpu_ratio']:.2f}x")
        print(f"{line} | greedy agreement {agree:.0%} | load {row['loadavg']}", flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["14m", "gpt2", "both"], default="both")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=0, help="tokens to decode (default 128 for 14m, 48 for gpt2)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    bw = copy_bandwidth()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, copy bandwidth {bw:.0f} GB/s, load {load()}", flush=True)
    rows = []
    for shape in (["14m", "gpt2"] if args.shape == "both" else [args.shape]):
        n = args.new_tokens or (128 if shape == "14m" else 48)
        for dt in (["fp32", "bf16"] if args.dtype == "both" else [args.dtype]):
            rows += run(shape, dt, args.batch, n, args.prompt_len, args.repeats, bw)
    emit(dict(torch=torch.__version__, transformers=transformers.__version__,
                           threads=torch.get_num_threads(), copy_gb_s=round(bw, 1), rows=rows), args.json)


if __name__ == "__main__":
    main()
