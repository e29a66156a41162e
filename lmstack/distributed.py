"""Distribution: torchrun env -> process group -> DDP. The one file that imports
torch.distributed; the model never sees any of this.

    torchrun --standalone --nproc_per_node=N -m lmstack pretrain --data DIR --out DIR

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous address); without them
this is a single process and every helper here is a no-op. The backend is NCCL on CUDA and
gloo on CPU. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from lmstack.device import pick_device


@dataclass
class DistInfo:
    rank: int = 0  # global rank of this process
    local_rank: int = 0  # rank on this machine (picks the GPU)
    world_size: int = 1  # processes in the job
    device: torch.device = torch.device("cpu")  # where this rank computes


_info = DistInfo()


def info() -> DistInfo:
    return _info


def is_main() -> bool:
    return _info.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto") -> DistInfo:
    """Read the torchrun env, pick the device, start the process group when WORLD_SIZE > 1."""
    global _info
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device)
    if world > 1 and not is_distributed():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    if dev.type == "cpu" and world > 1:
        # N processes on one machine share its cores; oversubscription is much slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    _info = DistInfo(rank, local_rank, world, dev)
    return _info


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP around the model when distributed (gradients are averaged across ranks in backward)."""
    if not is_distributed():
        return model
    dev = _info.device
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip DDP's gradient all-reduce (non-final micro-steps of accumulation)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place; returns it (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    global _info
    if is_distributed():
        dist.destroy_process_group()
    _info = DistInfo()
