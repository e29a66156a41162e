"""Pretraining = config + token shards + model + THE loop.

    lmstack pretrain --preset small --data runs/data --out runs/base
    torchrun --standalone --nproc_per_node=2 -m lmstack pretrain --data ... --out ...
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from lmstack import distributed
from lmstack.config import load_config
from lmstack.device import check_fits, pick_device
from lmstack.data import (TokenBatches, copy_losses, copy_probe, icl_losses, icl_probe, iter_eval_windows,
                          load_manifest, ordinary_ids)
from lmstack.model import GPT
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.train.loop import seed_everything, train
from lmstack.train.objectives import next_token_loss
from lmstack.utils import UserError


def pretrain(preset: str, data: str, out: str, overrides: list[str] = (), resume: bool = False) -> dict:
    """Train a model from scratch on a data folder; returns the last metrics record."""
    manifest = load_manifest(data)  # UserError when missing
    cfg = load_config(preset, list(overrides), vocab_size=manifest["vocab_size"])
    cfg.data.dir = str(data)
    if cfg.model.vocab_size < manifest["vocab_size"]:
        raise UserError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                        f"vocabulary ({manifest['vocab_size']})")
    with torch.device("meta"):  # the shape alone: how much memory training it takes, before allocating any
        n_params = GPT(cfg.model).num_params()
    # FSDP keeps 1/world of the weights, gradients and AdamW state on each device.
    shards = distributed.launched_world_size() if cfg.train.parallel == "fsdp" else 1
    check_fits(16 * n_params // shards, pick_device(cfg.train.device),
               f"training a {n_params:,}-parameter model (fp32 weights, gradients and AdamW's two moments"
               + (f", sharded over {shards} ranks)" if shards > 1 else ")"))
    out_dir, resume = checkpoint.output_folder(out, resume)
    if resume:
        checkpoint.check_resume(out_dir, "pretraining", cfg.to_dict()["model"],
                                hint="; pass the same --preset and --set options")
    tok = Tokenizer.load(data)

    info = distributed.init(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        # Under FSDP the other ranks build the shapes alone (the meta device) and take rank 0's
        # values as they shard (distributed.parallelize): one copy of the model in host memory.
        shapes_only = cfg.train.parallel == "fsdp" and info.world_size > 1 and info.rank > 0
        with torch.device("meta") if shapes_only else contextlib.nullcontext():
            model = GPT(cfg.model)
        tc = cfg.train
        batches = TokenBatches(data, cfg.data.train_split, batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                               seed=tc.seed, rank=info.rank, world_size=info.world_size,
                               copy_fraction=cfg.data.copy_fraction, copy_ids=ordinary_ids(tok),
                               copy_text_share=cfg.data.copy_text_share, copy_steps=cfg.data.copy_steps,
                               copy_fraction_after=cfg.data.copy_fraction_after)
        eval_batches = None
        if manifest["tokens"].get(cfg.data.val_split, 0) > tc.seq_len * info.world_size:
            def eval_batches():
                return iter_eval_windows(data, cfg.data.val_split, batch_size=tc.micro_batch_size,
                                         seq_len=tc.seq_len, max_batches=tc.eval_batches,
                                         rank=info.rank, world_size=info.world_size)
        elif distributed.is_main():
            print(f"pretrain: no {cfg.data.val_split} split big enough to evaluate on; skipping validation")
        # Logged at every evaluation, so their onset shows over training: in-context copying, the
        # loss on a random sequence's second occurrence over its first (`lmstack eval`'s copy task,
        # on 16 sequences), and Olsson et al.'s in-context learning score (its icl task, 16 windows).
        probe = copy_probe(tok, tc.seq_len, 16, seed=1)
        windows = icl_probe(data, cfg.data.val_split, tok, tc.seq_len, 16) if eval_batches is not None else None

        def copy(m) -> float:
            first, second = copy_losses(m, probe)
            return float(second.mean() / first.mean())

        def icl(m) -> float:
            early, late = icl_losses(m, windows)
            return float(late.mean() - early.mean())

        probes = {}
        if (probe.shape[1] - 1) // 2 >= 8:  # a context too short for 8 + 8 tokens measures nothing
            probes["copy"] = copy
        if windows is not None:
            probes["icl"] = icl
        return train(cfg, model, batches, next_token_loss, out_dir, eval_batches=eval_batches,
                     token_bytes=tok.token_bytes(), tokenizer_file=Path(data) / "tokenizer.json",
                     resume=resume, probes=probes if eval_batches is not None and probes else None)
    finally:
        distributed.cleanup()
