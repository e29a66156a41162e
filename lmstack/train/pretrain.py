"""Pretraining = config + token shards + model + THE loop; and `sample` from a model folder.

    lmstack pretrain --preset small --data runs/data --out runs/base
    torchrun --standalone --nproc_per_node=2 -m lmstack pretrain --data ... --out ...
    lmstack sample --model runs/base --prompt "Once upon a time"
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from lmstack import distributed
from lmstack.config import load_config
from lmstack.data import TokenBatches, iter_eval_windows, load_manifest
from lmstack.model import GPT
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.train.loop import train
from lmstack.train.objectives import next_token_loss
from lmstack.utils import UserError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pretrain(preset: str, data: str, out: str, overrides: list[str] = (), resume: bool = False) -> dict:
    """Train a model from scratch on a data folder; returns the last metrics record."""
    manifest = load_manifest(data)  # UserError when missing
    cfg = load_config(preset, list(overrides), vocab_size=manifest["vocab_size"])
    cfg.data.dir = str(data)
    if cfg.model.vocab_size < manifest["vocab_size"]:
        raise UserError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's "
                        f"vocabulary ({manifest['vocab_size']})")
    out_dir = checkpoint.output_folder(out, resume)
    if resume:
        _check_same_model(out_dir, cfg.to_dict()["model"])
    tok = Tokenizer.load(data)

    info = distributed.init(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        model = GPT(cfg.model)
        tc = cfg.train
        batches = TokenBatches(data, cfg.data.train_split, batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                               seed=tc.seed, rank=info.rank, world_size=info.world_size)
        eval_batches = None
        if manifest["tokens"].get(cfg.data.val_split, 0) > tc.seq_len * info.world_size:
            def eval_batches():
                return iter_eval_windows(data, cfg.data.val_split, batch_size=tc.micro_batch_size,
                                         seq_len=tc.seq_len, max_batches=tc.eval_batches,
                                         rank=info.rank, world_size=info.world_size)
        elif distributed.is_main():
            print(f"pretrain: no {cfg.data.val_split} split big enough to evaluate on; skipping validation")
        return train(cfg, model, batches, next_token_loss, out_dir, eval_batches=eval_batches,
                     token_bytes=tok.token_bytes(), tokenizer_file=Path(data) / "tokenizer.json",
                     resume=resume)
    finally:
        distributed.cleanup()


def _check_same_model(out: Path, model_cfg: dict) -> None:
    import json

    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{out / 'config.json'} is missing or unreadable; cannot resume") from None
    diff = [f"model.{k}: {saved.get(k)!r} in the run, {v!r} now" for k, v in model_cfg.items()
            if saved.get(k) != v]
    if diff:
        raise UserError("--resume with a different model than the run was started with ("
                        + "; ".join(diff) + "); pass the same --preset and --set options")


def sample(model: str, prompt: str = "", max_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           num_samples: int = 1) -> list[str]:
    """Print `num_samples` continuations of `prompt` (each document starts with BOS)."""
    from lmstack.engine import generate

    if max_tokens < 1 or num_samples < 1:
        raise UserError("--max-tokens and --num-samples must be >= 1")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 1")
    device = distributed.pick_device("auto")
    net = checkpoint.load_model(model, device)
    tok = Tokenizer.load(model)
    ids = [tok.bos_id] + tok.encode(prompt)
    if len(ids) >= net.cfg.max_seq_len:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {net.cfg.max_seq_len}")
    texts = []
    for i in range(num_samples):
        new = generate(net, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed + i, stop_ids={tok.eos_id, tok.bos_id})
        text = tok.decode(ids + new, skip_special=True)
        texts.append(text)
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text, flush=True)
    return texts
