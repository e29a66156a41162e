"""The hardware policy, in one place: which device, which autocast dtype, what peak FLOP/s.

Training (the loop's bf16 autocast and MFU), inference (the engine's "auto" dtype) and RL
rollouts all ask here, so a model trains and runs in the same precision on the same hardware.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from lmstack.utils import UserError, available_memory

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets, matched against
# torch.cuda.get_device_name(); first match wins, so specific names come first.
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10", 125e12), ("V100", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]


def pick_device(preference: str = "auto") -> torch.device:
    """"auto" (a GPU when there is one), "cpu", "cuda" (this rank's GPU) or "cuda:N"."""
    if preference not in ("auto", "cpu", "cuda") and not (preference.startswith("cuda:") and preference[5:].isdigit()):
        raise UserError(f"unknown device {preference!r} (auto | cpu | cuda | cuda:N)")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {preference} asked for but no CUDA GPU is available")
    if preference.startswith("cuda:"):
        n = torch.cuda.device_count()
        if int(preference[5:]) >= n:
            raise UserError(f"device {preference} asked for but this machine has {n} CUDA GPU(s): "
                            f"cuda:0 to cuda:{n - 1}")
        return torch.device(preference)
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def free_memory(device: torch.device) -> int | None:
    """Bytes this device can still allocate: a GPU's free memory, or the machine's available
    memory; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def check_fits(need: int, device: torch.device, what: str) -> None:
    """Refuse, in one line, to allocate more than the device has: `need` bytes for `what`."""
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"{what} needs about {need / 2 ** 30:,.1f} GiB of memory; {device} has "
                        f"{free / 2 ** 30:,.1f} GiB free")


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first CPU's entries in /proc/cpuinfo ("model name", "cpu MHz", "flags", ...), read
    once; {} where there is no such file."""
    info = {}
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if not line.strip():  # the end of the first CPU's block
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX)? Then bf16 autocast is about twice
    as fast as fp32 (bench/README.md); without them it is emulated and slower, so "auto" stays
    fp32."""
    return bool(set(cpu_info().get("flags", "").split()) & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. bf16 autocast keeps fp32 master weights and optimizer state.
    "auto" = bf16 where the hardware does bf16 natively (CUDA with bf16, or a bf16 CPU)."""
    if dtype == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if dtype == "bf16" else None


def peak_flops(device: torch.device, configured: float = 0.0, bf16: bool = False) -> float | None:
    """Peak FLOP/s of one device, for MFU. `train.peak_flops` wins when set.

    GPU: the table above (None for an unknown GPU: MFU is then not reported).
    CPU: a nominal estimate, threads x clock x FLOP/cycle/core, with 64 fp32 FLOP/cycle when
    the CPU has AVX-512 (two 512-bit FMA units) and 32 otherwise (two 256-bit FMAs); the clock
    is /proc/cpuinfo's "cpu MHz" (else 2.5 GHz). It is a yardstick, not a datasheet number
    (turbo clocks and half-width AVX-512 units make it off by up to ~2x): set train.peak_flops
    for your CPU. With bf16 on a CPU that has AVX512-BF16 the figure doubles (VDPBF16PS does
    twice the multiply-adds of an fp32 FMA per instruction).
    """
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)
    ghz = 2.5
    with contextlib.suppress(KeyError, ValueError):
        ghz = float(cpu_info()["cpu MHz"]) / 1000
    flags = cpu_info().get("flags", "").split()
    per_cycle = 64 if "avx512f" in flags else 32
    if bf16 and "avx512_bf16" in flags:
        per_cycle *= 2
    return torch.get_num_threads() * ghz * 1e9 * per_cycle
