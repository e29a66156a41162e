"""The perplexity filter: a defence against adversarial suffixes (Jain et al. 2023, "Baseline
Defenses for Adversarial Attacks Against Aligned Language Models").

A GCG suffix is token soup ("! describing.\\ + similarlyNow"), far less likely under a language
model than anything a person types, so a prompt whose perplexity is above a threshold is refused
before the model answers. The score of a text is the mean negative log-likelihood (nats per
token, log-perplexity) of its tokens under a model, read where the model reads a user's message
(after its chat format's opening of a user turn; or as plain text after BOS, for a base or
reference model): the attacked model itself or any reference model (another tokenizer: the text
is re-tokenized). *Windowed* perplexity is the maximum over contiguous
windows of w tokens (a shorter remainder joins the last): a short suffix after a long, plain
request is diluted in the whole text's mean but not in its own window. The windows partition the text, so
the windowed score is never below the whole one (the mean is a weighted mean of the windows).

The threshold is fitted on benign prompts: the score that lets `quantile` (99%) of them through;
its false-positive rate is then measured on *other* benign prompts. The adaptive attack
(GCG with this score in its loss) lives in lmstack/security/gcg.py, which calls
`windowed_scores` on the same numbers.
"""

from __future__ import annotations

import math

import torch

from lmstack.chatformat import chat_format
from lmstack.utils import UserError

WINDOW = 10  # tokens per window (Jain et al. use 10)


def windowed_scores(nll: torch.Tensor, window: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """nll [B, T] (per-token NLL; rows shorter than T padded, `lengths` [B] their lengths) ->
    the windowed score [B]: max over the chunks [0, w), [w, 2w), ... of each chunk's mean. A
    remainder shorter than w joins the last chunk (a 1-token window would be noise), so every
    chunk of a text of at least w tokens has w to 2w-1 tokens."""
    B, T = nll.shape
    lengths = torch.full((B,), T, device=nll.device) if lengths is None else lengths.to(nll.device)
    n_chunks = (lengths // window).clamp(min=1)  # [B]
    pos = torch.arange(T, device=nll.device)[None]
    chunk = torch.minimum(pos // window, n_chunks[:, None] - 1)  # [B, T]
    valid = (pos < lengths[:, None]).to(nll.dtype)
    M = max(1, T // window)
    sums = torch.zeros(B, M, dtype=nll.dtype, device=nll.device).scatter_add_(1, chunk, nll * valid)
    counts = torch.zeros(B, M, dtype=nll.dtype, device=nll.device).scatter_add_(1, chunk, valid)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))
    return means.max(-1).values


def head_ids(tok, context: str = "chat") -> list[int]:
    """The ids a scored text follows. "chat": the model's chat format up to a user message's
    text (where a chat model reads a prompt: after BOS it expects a role token, so every plain
    first token would look absurd); "plain": the scoring head (BOS), for a base or reference
    model. The chat head is the common start of two one-message renderings, so an imported
    template's own preamble (a default system prompt) is part of it."""
    if context == "plain":
        return list(tok.scoring_head)
    if context != "chat":
        raise UserError(f"perplexity context must be chat or plain, got {context!r}")
    fmt = chat_format(tok)
    a, b = (fmt.prompt([{"role": "user", "content": t}]) for t in ("x", "y"))
    n = next(i for i, (u, v) in enumerate(zip(a, b)) if u != v)
    return a[:n]


def token_nll(model, tok, texts: list[str], batch: int = 32, context: str = "chat") -> list[torch.Tensor]:
    """The NLL (nats) of every token of each text after `head_ids(tok, context)`. Rows are
    right-padded: causal attention, so padding never changes the real tokens."""
    head = head_ids(tok, context)
    seqs = [head + tok.encode(t) for t in texts]
    ctx = model.cfg.max_seq_len
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = [s[:ctx] for s in seqs[i:i + batch]]
            L = max(len(s) for s in chunk)
            idx = torch.tensor([s + [0] * (L - len(s)) for s in chunk], device=model.embed_tokens.weight.device)
            logp = torch.log_softmax(model(idx[:, :-1]).float(), -1)
            nll = -logp.gather(-1, idx[:, 1:, None])[..., 0]
            out += [nll[j, :len(s) - 1].cpu() for j, s in enumerate(chunk)]
    return out


def scores(model, tok, texts: list[str], window: int = WINDOW, context: str = "chat") -> list[dict]:
    """{"whole": mean NLL, "windowed": max window mean} per text (nats per token). An empty text
    scores 0 (nothing surprising in it)."""
    out = []
    for nll in token_nll(model, tok, texts, context=context):
        if len(nll) == 0:
            out.append({"whole": 0.0, "windowed": 0.0})
            continue
        out.append({"whole": float(nll.mean()), "windowed": float(windowed_scores(nll[None], window)[0])})
    return out


def quantile(xs: list[float], q: float) -> float:
    """The smallest value that at least a fraction q of xs is <= to (so q of them pass)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def fit_filter(model, tok, benign: list[str], window: int = WINDOW, q: float = 0.99, context: str = "chat") -> dict:
    """The thresholds (whole and windowed) that let a fraction q of the benign prompts through."""
    if not benign:
        raise UserError("the perplexity filter needs benign prompts to fit its threshold")
    sc = scores(model, tok, benign, window, context)
    return {"window": window, "quantile": q, "n_fit": len(benign), "context": context,
            "whole": quantile([s["whole"] for s in sc], q), "windowed": quantile([s["windowed"] for s in sc], q)}


def flags(model, tok, texts: list[str], filt: dict) -> list[dict]:
    """Per text: its scores and whether each filter (whole, windowed) refuses it."""
    out = []
    for s in scores(model, tok, texts, filt["window"], filt.get("context", "chat")):
        out.append({**s, "flag_whole": s["whole"] > filt["whole"], "flag_windowed": s["windowed"] > filt["windowed"]})
    return out
