"""What a training run costs on this machine: tokens/s of one SFT-like optimizer step, and the
hours the default `sft` preset's tokens (150 steps x 8,192) would take at that speed.

    .venv/bin/python bench/train_cost.py [--shape tiny|small|135m ...] [--dtype auto|fp32 ...]
        [--seq-len 512] [--micro 4] [--batch-tokens 8192] [--steps 3] [--threads 2] [--json FILE]

A step is what train/loop.py does for one optimizer step: batch_tokens / (micro x seq_len)
micro-batches of forward + next-token loss + backward under the run's autocast, the gradient
scaled, clipped, and lmstack's AdamW stepped. Random weights and random tokens (the work does not
depend on the values). The first step is warm-up and left out; the median of the rest is
reported. Shapes: the `tiny` and `small` presets (vocabulary 4,096, the context raised to the
sequence length) and a Llama of SmolLM2-135M's shape (576 wide, 30 layers, 9 heads, 3 KV heads,
FFN 1,536, vocabulary 49,152, tied). A benchmark, not a test: it asserts nothing about time, and
prints the load average beside each figure (others' work on a shared machine slows it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import emit, load  # bench/common.py (scripts run from bench/)
from lmstack.config import ModelConfig, load_config
from lmstack.device import autocast_dtype
from lmstack.model import GPT
from lmstack.train.loop import build_optimizer, duration
from lmstack.train.objectives import next_token_loss

_SFT = load_config("sft").train
SFT_TOKENS = _SFT.max_steps * _SFT.batch_tokens  # what the sft preset trains on
SMOL135M = dict(d_model=576, n_layer=30, n_head=9, n_kv_head=3, ffn_hidden=1536, vocab_size=49152,
                tie_embeddings=True)
CPU = torch.device("cpu")


def model_config(shape: str, seq_len: int) -> ModelConfig:
    if shape == "135m":
        return ModelConfig(max_seq_len=seq_len, **SMOL135M)
    cfg = load_config(shape).model
    cfg.vocab_size, cfg.max_seq_len = 4096, max(cfg.max_seq_len, seq_len)
    return cfg


def measure(shape: str, dtype: str, seq_len: int, micro: int, batch_tokens: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = GPT(model_config(shape, seq_len)).train()
    opt = build_optimizer(model, load_config("sft").optim, CPU)
    amp = autocast_dtype(dtype, CPU)
    accum = batch_tokens // (micro * seq_len)
    x = torch.randint(model.cfg.vocab_size, (accum, micro, seq_len + 1))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        n_total = 0
        for i in range(accum):
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                loss_sum, n = next_token_loss(model, (x[i, :, :-1], x[i, :, 1:]))
            loss_sum.backward()
            n_total += int(n)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(n_total)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    tok_s = batch_tokens / step_s
    return {"shape": shape, "params": model.num_params(), "dtype": "bf16" if amp else "fp32",
            "seq_len": seq_len, "micro": micro, "batch_tokens": batch_tokens, "step_s": round(step_s, 3),
            "tok_per_s": round(tok_s, 1), "sft_preset_hours": round(SFT_TOKENS / tok_s / 3600, 2),
            "sft_preset": duration(SFT_TOKENS / tok_s), "threads": torch.get_num_threads(), "load": load()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs="+", default=["tiny", "small", "135m"], choices=["tiny", "small", "135m"])
    ap.add_argument("--dtype", nargs="+", default=["auto", "fp32"], choices=["auto", "fp32", "bf16"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    for shape in a.shape:
        for dt in a.dtype:
            emit(measure(shape, dt, a.seq_len, a.micro, a.batch_tokens, a.steps), a.json)


if __name__ == "__main__":
    main()
