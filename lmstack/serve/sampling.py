"""The batcher's sampling: every live row's next token in a few vectorised calls.

`engine.sample_logits` takes one setting for a whole batch and, with one generator per row,
calls torch.multinomial once per row. Here the rows are grouped by their settings (temperature,
top-k, top-p: most requests share the defaults) and each group is sampled at once with the
exponential race that torch.multinomial itself runs for one sample: token = argmax(p / q), q ~
Exp(1). A seeded row draws its q from its own generator, exactly as multinomial would draw it,
so a request with a seed gets the same tokens alone, in a batch, and as with `sample_logits`
(tests/test_serve_scale.py checks all three). Unseeded rows owe no particular draw: they take
one uniform number each against the cumulative probabilities (inverse-CDF sampling), since
the race's one random number per vocabulary entry is most of its cost.
"""

from __future__ import annotations

import torch


def sample_rows(logits: torch.Tensor, settings: list[tuple], generators: list) -> list[int]:
    """logits [B, V]; settings[b] = (temperature, top_k, top_p) of row b (temperature <= 0:
    greedy); generators[b]: row b's torch.Generator or None. Returns B token ids."""
    out = [0] * len(settings)
    groups: dict[tuple, list[int]] = {}
    for b, s in enumerate(settings):
        groups.setdefault(s, []).append(b)
    for (temperature, top_k, top_p), rows in groups.items():
        x = logits[rows] if len(rows) < logits.shape[0] else logits
        for b, t in zip(rows, _sample_group(x, temperature, top_k, top_p, [generators[b] for b in rows])):
            out[b] = t
    return out


def _sample_group(logits: torch.Tensor, temperature: float, top_k, top_p, generators: list) -> list[int]:
    """One setting's rows: `engine.sample_logits`'s filtering, then the exponential race."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    logits = logits.float() / temperature
    index = None
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        logits, index = torch.topk(logits, top_k, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        if index is None:
            probs, index = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if seeded:  # the exponential race, one draw of q per row from its own generator
        p = probs[seeded] if unseeded else probs
        q = torch.empty_like(p)
        for j, i in enumerate(seeded):
            q[j].exponential_(1, generator=generators[i])  # what multinomial(probs[i], 1, generator=g) draws
        choice[seeded] = (p / q).argmax(dim=-1)
    if unseeded:
        # Rows without a seed owe no particular draw: one uniform number per row against the
        # cumulative mass (the race draws one per vocabulary entry, most of its cost).
        p = probs[unseeded] if seeded else probs
        mass = p.cumsum(dim=-1)
        u = torch.rand(len(unseeded), 1, device=p.device) * mass[:, -1:]
        # right=True: a token of zero probability (cut by top-p) adds no width, so it is never hit
        choice[unseeded] = torch.searchsorted(mass, u, right=True)[:, 0].clamp_(max=p.shape[-1] - 1)
    return (choice if index is None else index.gather(-1, choice[:, None])[:, 0]).tolist()
