"""Objectives: (model, batch) -> (loss_sum, n_tokens).

Every objective returns the SUM of its per-token (or per-pair) losses and how many there
were, never a mean: the loop divides by the count over all micro-batches and all ranks, so
gradient accumulation and world size do not change the result (a mean of means would weight
a micro-batch with few unmasked tokens as much as a full one).
The preference and RL losses at the end are the math those stages build their objectives from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmstack.data import IGNORE_INDEX

CE_CHUNK = 1 << 22  # logits per cross-entropy chunk (16 MB in fp32): fits in cache, few chunks


def token_losses(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Per-token cross-entropy in nats, [B, T]; 0 where ignored (target == IGNORE_INDEX or mask == 0)."""
    if mask is not None:
        targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
    # A chunk of rows at a time, recomputed in backward (checkpoint): the fp32 copy of the
    # logits and the [tokens, vocab] log-probabilities never exist whole, only a chunk's worth,
    # so the loss stops being a walk through memory (much faster at a large vocabulary on CPU).
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


# --- preferences and reinforcement learning: the math, on tensors -----------------------------
# Pure functions of log-probabilities, rewards and values, so each is tested against numbers
# computed by hand (tests/test_objectives.py). The stages (reward model, DPO, PPO, GRPO) build
# their (model, batch) objectives from these.

def token_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y_t | x_<=t) for every position, [B, T] (fp32; -inf never: y must be real ids
    where it is used; pass y clamped to >= 0 and mask the rest)."""
    logits = model(x).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, y.clamp_min(0)[..., None])[..., 0]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair reward-model loss -log sigmoid(r_chosen - r_rejected): the Bradley-Terry model's
    negative log-likelihood of the human's choice."""
    return -F.logsigmoid(r_chosen - r_rejected)


def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """Direct preference optimisation (Rafailov et al. 2023), per pair, from the summed
    log-probs of each answer under the policy and the frozen reference. Returns (loss,
    chosen_reward, rejected_reward) with reward = beta * (log pi - log pi_ref): the implicit
    reward whose Bradley-Terry likelihood DPO maximises."""
    chosen = beta * (pol_chosen - ref_chosen)
    rejected = beta * (pol_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def kl_estimates(logp: torch.Tensor, ref_logp: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL
    divergence"): k1 = log r (unbiased, noisy, can be negative), k2 = (log r)^2 / 2 (biased, low
    variance), k3 = (r' - 1) - log r' with r' = pi_ref / pi (unbiased, always >= 0)."""
    log_ratio = logp - ref_logp
    return {"k1": log_ratio, "k2": 0.5 * log_ratio ** 2, "k3": torch.expm1(-log_ratio) + log_ratio}


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation over response tokens. rewards, values, mask: [B, T]
    (mask 1 on the response's tokens, which are contiguous; the value after the last one is 0).
    Returns (advantages, returns = advantages + values), 0 where masked."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_adv = torch.where(m > 0, a, next_adv)  # past the end (masked): carry nothing back
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, (adv + values) * mask


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2):
    """PPO's clipped surrogate, per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A).
    Returns (loss, clipped: 1 where the clipped term was the smaller)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip, 1 + clip) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(unclipped.dtype)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float = 0.2):
    """Clipped value loss, per token: 0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)


def group_advantages(rewards: torch.Tensor, method: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """rewards [G, k]: k samples of each of G prompts -> one advantage per sample.
    grpo: (r - mean of its group) / (std of its group + eps) (Shao et al. 2024);
    rloo: r - mean of the OTHER k-1 samples of its group (Ahmadian et al. 2024).
    A group whose samples all scored the same teaches nothing: its advantages are 0."""
    k = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)
    if method == "grpo":
        return (rewards - mean) / (rewards.std(dim=1, keepdim=True, unbiased=False) + eps)
    if method == "rloo":
        if k < 2:
            raise ValueError("rloo needs at least 2 samples per prompt")
        return (rewards - mean) * k / (k - 1)  # r - (sum - r)/(k-1), rearranged
    raise ValueError(f"unknown method {method!r} (grpo | rloo)")
