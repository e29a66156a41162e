"""Objectives: (model, batch) -> (loss_sum, n_tokens).

Every objective returns the SUM of its per-token (or per-pair) losses and how many there
were, never a mean: the loop divides by the count over all micro-batches and all ranks, so
gradient accumulation and world size do not change the result (a mean of means would weight
a micro-batch with few unmasked tokens as much as a full one).
Later stages add their objectives here (reward model, DPO, ...) with the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a target with this id contributes no loss (prompt tokens in SFT, padding)
CE_CHUNK = 1 << 22  # logits per cross-entropy chunk (16 MB in fp32): fits in cache, few chunks


def token_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-token cross-entropy in nats, [B, T]; 0 where ignored (target == IGNORE_INDEX or mask == 0)."""
    if mask is not None:
        targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    # A chunk of rows at a time, recomputed in backward (checkpoint): the fp32 copy of the
    # logits and the [tokens, vocab] log-probabilities never exist whole, only a chunk's worth,
    # so the loss stops being a walk through memory (~3x faster at a 50k vocabulary on CPU).
    # Rows are independent, so the loss and its gradient are bit-identical to the unchunked one.
    rows = max(1, CE_CHUNK // logits.shape[-1])
    chunks = zip(logits.flatten(0, 1).split(rows), targets.flatten().split(rows))
    loss = torch.cat([checkpoint(_cross_entropy, x, t, use_reentrant=False) for x, t in chunks])
    return loss.view(targets.shape), targets != IGNORE_INDEX


def _cross_entropy(logits, targets):
    # fp32 logits: log-softmax over a large vocabulary in bf16 loses too much precision.
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")


def next_token_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy. batch = (x, y) or (x, y, mask); y is x shifted by one.

    Returns (sum of token losses in nats, number of counted tokens).
    """
    x, y = batch[0], batch[1]
    mask = batch[2] if len(batch) > 2 else None
    loss, counted = token_losses(model(x), y, mask)
    return loss.sum(), counted.sum()


def target_bytes(batch, token_bytes: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes of the counted target tokens of a (x, y[, mask]) batch, for bits-per-byte.

    token_bytes[i] is the byte length of token i (0 for special tokens), so bpb
    = sum of nats / (ln 2 * bytes) compares models with different tokenizers fairly.
    """
    y = batch[1]
    counted = y != IGNORE_INDEX
    if len(batch) > 2:
        counted &= batch[2] != 0
    return (token_bytes[y.clamp_min(0)] * counted).sum()
