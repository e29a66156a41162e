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

IGNORE_INDEX = -100  # a target with this id contributes no loss (prompt tokens in SFT, padding)


def token_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-token cross-entropy in nats, [B, T]; 0 where ignored (target == IGNORE_INDEX or mask == 0)."""
    if mask is not None:
        targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    # fp32 logits: log-softmax over a large vocabulary in bf16 loses too much precision.
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")
    return loss.view(targets.shape), targets != IGNORE_INDEX


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
