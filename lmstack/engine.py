"""Inference: prefill + decode over the model's static KV cache, and sampling.

Plain functions in the gpt-fast style: `prefill` runs the prompt once and fills the cache,
`decode_one_token` feeds one token at position p. `generate` strings them together with
temperature / top-k / top-p sampling, a seed, max_tokens and stop tokens.
(A first version: one sequence at a time; batching and streaming come later.)
"""

from __future__ import annotations

import torch

from lmstack.model import GPT


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Run the prompt [B, T] from position 0, filling the cache; returns the last logits [B, V]."""
    return model(idx, start_pos=0)[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, pos: int) -> torch.Tensor:
    """Feed tokens [B] at position `pos`; returns the next logits [B, V]."""
    return model(token[:, None], start_pos=pos)[:, -1]


@torch.no_grad()
def generate(model: GPT, prompt_ids: list[int], max_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids=(), use_cache: bool = True) -> list[int]:
    """Continue `prompt_ids`; returns the new token ids (a stop token is included, then it stops).

    Generation also stops when the context (model.cfg.max_seq_len) is full.
    use_cache=False recomputes the whole sequence every step (the reference the cache is tested
    against).
    """
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token (e.g. the BOS id)")
    ctx = model.cfg.max_seq_len
    if len(prompt_ids) >= ctx:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens; the model's context is {ctx}")
    max_tokens = min(max_tokens, ctx - len(prompt_ids))
    if max_tokens <= 0:
        return []
    device = model.embed_tokens.weight.device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    stop = set(stop_ids)
    was_training = model.training
    model.eval()
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    try:
        if use_cache:
            model.setup_cache(1, len(prompt_ids) + max_tokens)
            logits = prefill(model, idx)
        else:
            logits = model(idx)[:, -1]
        pos = len(prompt_ids)
        while True:
            token = sample_logits(logits, temperature, top_k, top_p, gen)
            out.append(int(token))
            if out[-1] in stop or len(out) >= max_tokens:
                break
            if use_cache:
                logits = decode_one_token(model, token, pos)
            else:
                idx = torch.cat([idx, token[:, None]], dim=1)
                logits = model(idx)[:, -1]
            pos += 1
    finally:
        if use_cache:
            model.clear_cache()
        model.train(was_training)
    return out
