"""Training throughput: our GPT against Hugging Face LlamaForCausalLM of the identical shape.

    .venv/bin/python bench/train_throughput.py [--shape small|gpt2|both] [--dtype fp32|bf16|both]
        [--steps N] [--threads N] [--batch N] [--compile] [--muon] [--device auto|cpu|cuda] [--clock wall|cpu]
        [--json FILE]

Both models get the same weights (ours copied into HF by a pure rename, logits checked equal
in fp32), the same batch, the same AdamW (lmstack's build_optimizer: same groups, same
settings), the same autocast and the same thread count. A step is a full training step:
forward + loss + backward + grad clip + AdamW step. The models' steps alternate, so a burst
of load elsewhere on the machine hits all of them; warm-up steps are excluded and the median
step is reported. MFU is against the matmul peak measured here, in the precision used.
--compile adds both models under torch.compile (ours the way the loop does it with
train.compile=true), compared with each other, and ours with each block compiled on its own (what
train.compile does with FSDP or activation checkpointing). Where there is a GPU (--device auto, the default,
finds it) both run there (SDPA's flash kernels, fused AdamW; steps timed between CUDA
synchronisations) and MFU is given against the GPU's datasheet bf16 peak
(lmstack.device.peak_flops) as well as against its measured matmul peak.
--muon adds ours with optim.optimizer=muon (Muon on the blocks' matrices, AdamW on the rest; a copy
of the model), its rate against ours with AdamW: Muon's Newton-Schulz steps cost the same whatever
the batch, so --batch (rows of seq_len tokens; default the shape's) sets what they are spread over.
--clock cpu times every step and the matmul peak in CPU seconds of this process instead of wall
seconds (with --threads 1 on a busy CPU: what the work costs, whoever else runs; MFU is then
against the CPU-time peak).

This is a benchmark, not a test: it prints figures and ratios and asserts nothing about time.
On a small machine anything else running skews the figures, the more so with as many threads
as cores: each figure comes with the load average and with `other`, the CPU cores that other
processes used while it was measured (measure again when that is not ~0).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import resource
import statistics
import time

import torch

from common import busy_cpu_seconds, emit, load, own_cpu_seconds  # bench/common.py (scripts run from bench/)
from lmstack.config import load_config
from lmstack.model import GPT
from lmstack.device import autocast_dtype, peak_flops, pick_device
from lmstack.train.loop import build_optimizer
from lmstack.train.objectives import next_token_loss

# The `small` preset at its own micro batch, and GPT-2-small's shape (124M) at batch 8 x 256.
SHAPES = {
    "small": dict(preset="small", vocab_size=4096, batch=16, seq_len=256),
    "gpt2": dict(preset="gpt2", vocab_size=50304, batch=8, seq_len=256),
}
DEVICE = torch.device("cpu")  # --device
CLOCK = time.perf_counter  # --clock: time.process_time counts this process's CPU seconds


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class OtherLoad:
    """CPU cores used by every process but this one over an interval, from /proc/stat (the
    load average counts this benchmark's own threads too). NaN where there is no /proc/stat."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()

    def cores(self) -> float:
        used = (busy_cpu_seconds() - self.busy0) - (own_cpu_seconds() - self.own0)
        return max(0.0, used) / (time.perf_counter() - self.t0)


def _faults() -> int:
    """Minor page faults so far: fresh memory the kernel had to map (and zero) for us. Memory
    freed and allocated again each step costs this; on a VM it is a large share of a step."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def matmul_peak(dtype: torch.dtype, precision: str = "highest", n: int = 2048, reps: int = 8) -> float:
    """Best-of-`reps` GFLOP/s of an n x n x n matmul: the most a matmul-bound step could reach."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        if DEVICE.type == "cuda":
            n = 8192  # a GPU needs a larger product to reach its peak
        a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
        for _ in range(2):  # warm-up: thread pool, kernel selection
            a @ b
        best = float("inf")
        for _ in range(reps):
            sync()
            t0 = CLOCK()
            a @ b
            sync()
            best = min(best, CLOCK() - t0)
        return 2 * n**3 / best / 1e9
    finally:
        torch.set_float32_matmul_precision(old)


def build_pair(shape: str, seed: int = 0):
    """(run config, our GPT, an HF LlamaForCausalLM of the same config with the same weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = load_config(s["preset"], [f"model.vocab_size={s['vocab_size']}"])
    mc = cfg.model
    torch.manual_seed(seed)
    ours = GPT(mc)
    hf_cfg = LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.ffn_hidden,
        num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head, num_key_value_heads=mc.n_kv_head,
        max_position_embeddings=mc.max_seq_len, rope_theta=mc.rope_theta, rms_norm_eps=mc.norm_eps,
        tie_word_embeddings=mc.tie_embeddings, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_cfg).float()
    # Export is a pure rename: "model." in front of everything but the output head.
    sd = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if mc.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return cfg, ours, hf


def check_logits(ours, hf, x) -> float:
    with torch.no_grad():
        a, b = ours(x[:2]), hf(input_ids=x[:2]).logits
    err = (a - b).abs().max().item()
    assert err < 1e-4, f"logits differ by {err}: the two models are not the same function"
    return err


def our_step(model, opt, batch, amp, grad_clip):
    """One step of lmstack.train.loop.train (one micro-batch, one rank), with its functions:
    the loss SUM from next_token_loss, gradients scaled by 1/tokens, clip, AdamW."""
    with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss_sum, n = next_token_loss(model, batch)
    loss_sum.backward()
    scale = 1.0 / max(float(n), 1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum.item() * scale


def hf_step(model, opt, batch, amp, grad_clip):
    """The usual HF way: labels in, mean loss out (shift_labels: y is already shifted)."""
    x, y = batch
    with torch.autocast(DEVICE.type, dtype=amp or torch.float32, enabled=amp is not None):
        loss = model(input_ids=x, labels=y, shift_labels=y).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_shape(shape: str, dtypes: list[str], steps: int, warmup: int, peaks: dict, compile: bool,
              muon: bool = False, rows: int = 0) -> list[dict]:
    cfg, ours, hf = build_pair(shape)
    s = {**SHAPES[shape], **({"batch": rows} if rows else {})}
    tokens = torch.randint(0, s["vocab_size"], (s["batch"], s["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(1))
    batch = (tokens[:, :-1].contiguous().to(DEVICE), tokens[:, 1:].contiguous().to(DEVICE))
    ours, hf = ours.to(DEVICE), hf.to(DEVICE)
    if cfg.model.tie_embeddings:  # .to() on a GPU keeps the tie; say so rather than time an untied copy
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    err = check_logits(ours, hf, batch[0])
    flops_tok = ours.flops_per_token(s["seq_len"])
    ntok = s["batch"] * s["seq_len"]
    print(f"\n== {shape}: {ours.num_params() / 1e6:.1f}M params ({ours.num_params(False) / 1e6:.1f}M "
          f"non-embedding), batch {s['batch']} x {s['seq_len']}, {flops_tok / 1e6:.0f} MFLOP/token; "
          f"fp32 logits match HF (max |diff| {err:.1e})", flush=True)
    rows = []
    for dt in dtypes:
        amp = autocast_dtype(dt, DEVICE)
        # Fresh optimizers per dtype. A compiled model shares its module and optimizer with the
        # eager one: the weights drift with training either way, which does not change the work.
        opt_ours, opt_hf = build_optimizer(ours, cfg.optim, DEVICE), build_optimizer(hf, cfg.optim, DEVICE)
        runs = {"ours": (our_step, ours, opt_ours), "HF": (hf_step, hf, opt_hf)}
        if compile:
            runs["ours+compile"] = (our_step, torch.compile(ours), opt_ours)
            runs["HF+compile"] = (hf_step, torch.compile(hf), opt_hf)
            # What train.parallel=fsdp / activation checkpointing compile: each block on its own
            # (distributed.parallelize), on a copy, since compiling a block changes it in place.
            blocks = copy.deepcopy(ours)
            for block in blocks.layers:
                block.compile(dynamic=False)
            runs["ours+compile-blocks"] = (our_step, blocks, build_optimizer(blocks, cfg.optim, DEVICE))
        if muon:
            with_muon = copy.deepcopy(ours)
            runs["ours+muon"] = (our_step, with_muon, build_optimizer(
                with_muon, dataclasses.replace(cfg.optim, optimizer="muon"), DEVICE))
        times, faults = {name: [] for name in runs}, {name: [] for name in runs}
        for i in range(warmup + steps):
            if i == warmup:
                other = OtherLoad()
            for name, (step, model, opt) in runs.items():
                sync()
                f0, t0 = _faults(), CLOCK()
                step(model, opt, batch, amp, cfg.optim.grad_clip)
                sync()
                if i >= warmup:
                    times[name].append(CLOCK() - t0)
                    faults[name].append(_faults() - f0)
        tok_s = {name: ntok / statistics.median(t) for name, t in times.items()}
        peak = peaks["bf16" if amp is not None else "fp32"]
        sheet = peaks.get("datasheet_bf16") if amp is not None else None
        row = dict(shape=shape, dtype=dt, threads=torch.get_num_threads(), batch=s["batch"],
                   seq_len=s["seq_len"], steps=steps, peak_gflops=round(peak, 1),
                   tok_s={k: round(v, 1) for k, v in tok_s.items()},
                   mfu={k: round(flops_tok * v / (peak * 1e9), 4) for k, v in tok_s.items()},
                   ratio=round(tok_s["ours"] / tok_s["HF"], 3), loadavg=load(), device=str(DEVICE), other_cores=round(other.cores(), 2),
                   page_faults_per_step={k: int(statistics.median(v)) for k, v in faults.items()})
        line = (f"{shape:5s} {dt:4s} ours {tok_s['ours']:7.0f} tok/s  HF {tok_s['HF']:7.0f} tok/s  "
                f"ours/HF {row['ratio']:.2f}x  MFU ours {row['mfu']['ours']:.1%} HF {row['mfu']['HF']:.1%}")
        if compile:
            row["ratio_compiled"] = round(tok_s["ours+compile"] / tok_s["HF+compile"], 3)
            line += (f" | compiled: ours {tok_s['ours+compile']:7.0f}  HF {tok_s['HF+compile']:7.0f}  "
                     f"ours/HF {row['ratio_compiled']:.2f}x  MFU ours {row['mfu']['ours+compile']:.1%}"
                     f" | ours, blocks compiled {tok_s['ours+compile-blocks']:7.0f}")
        if muon:
            row["ratio_muon"] = round(tok_s["ours+muon"] / tok_s["ours"], 3)
            line += f" | ours with Muon {tok_s['ours+muon']:7.0f} tok/s, {row['ratio_muon']:.2f}x AdamW's"
        pf = row["page_faults_per_step"]
        if sheet:
            row["mfu_datasheet"] = {k: round(flops_tok * v / (sheet * 1e9), 4) for k, v in tok_s.items()}
            line += f" | of the datasheet's {sheet / 1e3:.0f} TFLOP/s: ours {row['mfu_datasheet']['ours']:.1%} HF {row['mfu_datasheet']['HF']:.1%}"
        print(f"{line} (of {peak:.0f} GFLOP/s) | page faults/step ours {pf['ours'] / 1e3:.0f}k HF "
              f"{pf['HF'] / 1e3:.0f}k | load {row['loadavg']}, other {row['other_cores']:.2f} cores", flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["small", "gpt2", "both"], default="both")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens there)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--muon", action="store_true", help="also time ours with optim.optimizer=muon")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (0 = the shape's own)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: the GPU when there is one (MFU against its datasheet peak too), else the CPU")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="time steps in wall seconds or in this process's CPU seconds (per CPU-second rates)")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global DEVICE, CLOCK
    DEVICE = pick_device(args.device)
    if args.clock == "cpu":
        if DEVICE.type == "cuda":
            raise SystemExit("--clock cpu times the CPU's work: add --device cpu on a machine with a GPU")
        CLOCK = time.process_time
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} "
          f"threads, {args.clock} clock, {platform.machine()}, {os.cpu_count()} CPUs, load {load()}", flush=True)
    other = OtherLoad()
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    peaks = {"fp32": matmul_peak(torch.float32), "fp32_medium": matmul_peak(torch.float32, "medium")}
    if "bf16" in dtypes:  # only when asked: a CPU without bf16 instructions takes minutes for this product
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    if DEVICE.type == "cuda" and peak_flops(DEVICE, bf16=True):  # the dense bf16 peak, GFLOP/s as above
        peaks["datasheet_bf16"] = peak_flops(DEVICE, bf16=True) / 1e9
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())
          + f" | load {load()}, other {other.cores():.2f} cores", flush=True)
    shapes = ["small", "gpt2"] if args.shape == "both" else [args.shape]
    rows = []
    for shape in shapes:
        rows += run_shape(shape, dtypes, args.steps, args.warmup, peaks, args.compile, args.muon, args.batch)
    result = dict(torch=torch.__version__, transformers=transformers.__version__,
                  threads=torch.get_num_threads(), device=str(DEVICE), clock=args.clock,
                  gpu=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
                  peaks_gflops={k: round(v, 1) for k, v in peaks.items() if v},
                  rows=rows)
    emit(result, args.json)


if __name__ == "__main__":
    main()
