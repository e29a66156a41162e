"""Distribution: torchrun env -> process group -> DDP or FSDP2 (with activation checkpointing
and per-block compile), and sharded checkpoints. The one file that imports torch.distributed;
the model never sees any of this.

    torchrun --standalone --nproc_per_node=N -m lmstack pretrain --data DIR --out DIR
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 ... --set train.parallel=fsdp

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (and the rendezvous address); without them
this is a single process and every helper here is a no-op. The backend is NCCL on CUDA and
gloo on CPU. Rank 0 alone logs and writes files.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
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


def launched_world_size() -> int:
    """The number of ranks torchrun launched (its WORLD_SIZE; 1 without torchrun), readable
    before `init` (a stage sizes its batches or its memory check by it)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init(device: str = "auto") -> DistInfo:
    """Read the torchrun env, pick the device, start the process group when WORLD_SIZE > 1."""
    global _info
    world = launched_world_size()
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


def parallelize(model: torch.nn.Module, parallel: str = "ddp", activation_checkpointing: bool = False,
                compile: bool = False, bf16: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Everything that wraps the model for training, in one place. Returns (the model to evaluate
    with, the model to train with); the parameters of `model` are the ones trained (sharded in
    place by FSDP, so build the optimizer after this).

    Without activation checkpointing or FSDP it is what it always was: torch.compile of the whole
    model when asked, then DDP under torchrun. Otherwise it follows torchtitan's
    parallelize_llama (torchtitan/models/llama3/infra/parallelize.py): activation checkpointing
    per block (apply_ac), then compile per block (apply_compile: the blocks are alike, so one
    compiled graph serves them all, and FSDP's hooks sit between blocks, outside the graphs), then
    FSDP2 (apply_fsdp: fully_shard each block, then the root, which takes the embedding, the
    final norm and the head). Blocks are compiled in place (nn.Module.compile) so the state
    dict's names stay the model's own."""
    fsdp = parallel == "fsdp" and is_distributed()
    if not (activation_checkpointing or fsdp):
        fwd_model = torch.compile(model) if compile else model
        return fwd_model, wrap(fwd_model)
    for name, block in model.layers.named_children():
        if activation_checkpointing:
            # Non-reentrant checkpointing (what torchtitan's apply_ac uses); the wrapper's
            # state-dict hooks keep the block's parameter names unchanged.
            block = checkpoint_wrapper(block, preserve_rng_state=False)
            model.layers.register_module(name, block)
        if compile:
            # Static shapes: a recompile per shape (training's micro-batch, evaluation's, the
            # probes') rather than dynamic shapes, under which SDPA's is_causal turns symbolic
            # and breaks the graph.
            block.compile(dynamic=False)
    if not fsdp:
        return model, wrap(model)
    # Rank 0's values, taken before sharding (the other ranks may have built the shapes alone, on
    # the meta device: then only one process holds the whole model in host memory).
    full = model.state_dict() if _info.rank == 0 else {}
    mesh = init_device_mesh(_info.device.type, (_info.world_size,))
    # bf16 compute copies of the parameters, gradients reduced in fp32 (torchtitan's default
    # mixed_precision_param / mixed_precision_reduce); the sharded master weights stay fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # Storage for each rank's shards on its device, filled from rank 0's values (torchtitan's
    # meta-device init, with rank 0's initialisation instead of one per shard, so the run starts
    # from the weights one process would), then the RoPE table, which is no parameter.
    model.to_empty(device=_info.device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.init_buffers()
    return model, model


def no_sync(model: torch.nn.Module, skip: bool):
    """Skip the gradient reduction on the non-final micro-steps of accumulation: DDP's no_sync;
    for FSDP, set_requires_gradient_sync(False) keeps accumulating unsharded local gradients and
    reduce-scatters them once, on the last micro-step (one reduction per optimizer step, like DDP;
    the price is a full-size gradient per rank while accumulating)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, its total norm as a plain tensor. With FSDP's sharded
    (DTensor) gradients, torch 2.13 reduces the shards' norms across ranks itself (checked: the
    norm and the clipped gradients equal the unsharded ones) and returns a replicated DTensor,
    made a local tensor here for logging (torchtitan's clip_grad_norm_ does the same)."""
    total = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return total.full_tensor() if isinstance(total, DTensor) else total


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors, on the CPU of rank 0 (FSDP: gathered from the shards, a
    collective every rank must call; the other ranks get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Model and optimizer state through torch.distributed.checkpoint: every rank writes its own
    shards into `path` (a folder all ranks see), rank 0 the metadata last. Called by every rank
    (in one process DCP writes the whole state, one shard). The names are the model's own, so any
    number of ranks, or one process without FSDP, can load it."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _one_process_is_meant():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path, no_dist=not is_distributed())


def load_sharded(path: Path, model: torch.nn.Module, optimizer) -> None:
    """Load what save_sharded wrote, resharded to this run's ranks (or to one whole model)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=not is_distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _one_process_is_meant():
    """DCP warns that it "assumes" one process whenever there is no process group, even when told
    so (no_dist): in one process that is what lmstack means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


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
