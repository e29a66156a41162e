"""Inference: prefill + decode over the model's static KV cache, sampling, batching, streaming.

Plain functions in the gpt-fast style: `prefill` runs the prompts once and fills the cache,
`decode_one_token` feeds one token per row at position p. `stream` strings them together for a
batch of prompts and yields what each row produced at every step; `generate_batch` collects
that into one `Completion` per row; `generate` is the one-sequence convenience
(`lmstack sample`). Tool calls live above the engine: the chat format's tool loop
(lmstack/chatformat.py) runs them for the chat, evaluation and RL rollouts.

Batching: prompts of different lengths are left-padded to the longest, and an attention mask
hides the pad keys. RoPE only sees relative positions, so a padded row computes what it would
alone (up to float rounding). Every row shares the cache position, so the room left for new
tokens is set by the longest prompt. Rows finish on their own (stop id, stop string, their own
max_tokens); a finished row is still fed through the batch (static shapes) but yields nothing.

The context policy: a prompt must leave room for at least one new token, else
`ContextLengthError` (a UserError) says so. Generation stops at the context's end with
finish_reason "length". `truncate="left"` instead keeps the first token (BOS) and the most
recent tokens: the prompt is cut to max(context - max_tokens, context // 2) tokens, so the reply
gets its max_tokens unless that would leave the prompt less than half the context.

Speed: batch-1 decode reads every weight once per token, so it is bound by memory bandwidth.
The engine decodes in the dtype of the model's weights, with the cache in the same dtype;
`for_inference(model, "bf16")` casts a model to bf16 (half the bytes per token), fuses each
block's q/k/v and gate/up into one matrix each (`GPT.fuse`: fewer, larger products) and, on a
CPU, packs its Linear weights for oneDNN (`PackedLinear`: faster matrix-vector products).
bench/decode_throughput.py measures it against Hugging Face `generate`.

One generation at a time per model: the KV cache lives in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from lmstack.device import autocast_dtype
from lmstack.model import GPT
from lmstack.quant import QUANTIZED, quantize
from lmstack.utils import UserError


class ContextLengthError(UserError, ValueError):
    """The prompt does not fit in the model's context (and no truncation was asked for)."""


@dataclass
class Delta:
    """What one row produced at one step of `stream`."""
    row: int  # index of the prompt in the batch
    token: int | None  # the new token id; None when the row stopped on a stop id (not returned)
    text: str = ""  # new text ("" while held back: an incomplete UTF-8 character or a possible stop string)
    logprob: float | None = None  # log p(token) under the model (see `stream`)
    top_logprobs: list[tuple[int, float]] | None = None  # the most likely (id, logprob) pairs
    finish_reason: str | None = None  # None while running, then "stop" or "length"
    stop: int | str | None = None  # the stop id or stop string that ended the row


@dataclass
class Completion:
    """One row's result. `ids` excludes a stop id; after a stop string, `ids` still holds the
    tokens that spelled it but `text` is cut before it."""
    ids: list[int]
    text: str | None  # None when no tokenizer was given
    finish_reason: str  # "stop" | "length"
    stop: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_tokens: int = 0  # after truncation


def for_inference(model: GPT, dtype: str | torch.dtype = "fp32", pack: bool | None = None,
                  fuse: bool = True) -> GPT:
    """Eval mode and the weights in `dtype` ("fp32" | "bf16" | "int8" | "int4" | "auto" | a torch
    dtype), in place. bf16 halves the bytes read per decoded token; RMSNorm still normalises in fp32.
    "auto" = bf16 where the hardware does bf16 natively (a CUDA GPU with bf16, AVX512-BF16/AMX).
    "int8" / "int4": weight-only quantized Linear layers (lmstack/quant.py), the rest in bf16.
    pack (default: on a CPU with oneDNN): swap the Linear layers for `PackedLinear`.
    fuse (default on): q/k/v and gate/up of each block as one matrix each (`GPT.fuse`: fewer,
    larger products per token). A packed, fused or quantized model is for inference only: it no
    longer trains or saves."""
    device = next(model.parameters()).device
    if dtype in QUANTIZED:
        if fuse and isinstance(model, GPT):
            model.fuse()
        return quantize(model.eval(), dtype).to(torch.bfloat16)  # scales from the fp32 weights
    if dtype == "auto":
        dtype = autocast_dtype("auto", device) or torch.float32
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype, dtype)
    if not isinstance(dt, torch.dtype):
        raise UserError(f"unknown dtype {dtype!r} (fp32 | bf16 | int8 | int4 | auto)")
    model = model.to(dt).eval()
    if fuse and isinstance(model, GPT):
        model.fuse()
    if pack is None:
        pack = PackedLinear.supported(device, dt)
    if pack:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if type(child) is torch.nn.Linear and child.bias is None:
                    setattr(module, name, PackedLinear(child))
    return model


class PackedLinear(torch.nn.Module):
    """A bias-free nn.Linear for CPU inference whose weight is pre-packed in oneDNN's blocked
    layout (what torch.compile's weight freezing does). Decode is a chain of matrix-vector
    products that stream the weights from memory; packed, they stream faster (bench/README.md
    has by how much). bf16 results are bit-identical to F.linear's, fp32 ones differ in the last
    bits (another summation order). The tied head gets its own packed copy of the embedding (the
    lookup keeps the original)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)

    @staticmethod
    def supported(device, dtype=torch.bfloat16) -> bool:
        """oneDNN on a CPU (for bf16: with native bf16 instructions; emulated bf16 is slower)."""
        return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and (dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())))

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def fit_prompt(ids: list[int], ctx: int, max_tokens: int, truncate: str | None = None) -> list[int]:
    """Check a prompt against the context of `ctx` positions; apply the truncation policy."""
    if not ids:
        raise ValueError("a prompt needs at least one token (e.g. the BOS id)")
    if truncate not in (None, "left"):
        raise UserError(f"truncate must be None or 'left' (got {truncate!r})")
    if truncate == "left":
        keep = max(ctx - max_tokens, ctx // 2)
        return ids if len(ids) <= keep else ids[:1] + ids[len(ids) - keep + 1:]
    if len(ids) >= ctx:
        raise ContextLengthError(f"prompt is {len(ids)} tokens; the model's context is {ctx} "
                                 "(shorten it, or ask for truncate='left')")
    return ids


# --- sampling ---------------------------------------------------------------------------------

def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator=None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 = greedy (argmax).

    `generator`: None (torch's global RNG), one torch.Generator for the batch, or a list with
    one per row (a row's sample then does not depend on what it is batched with).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    index = None  # where the candidates come from, when they are a subset of the vocabulary
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        logits, index = torch.topk(logits, top_k, dim=-1)  # sorted: top-p below needs no sort
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0 < top_p < 1:
        # Nucleus: keep the smallest set of most likely tokens whose mass reaches top_p.
        if index is None:  # the full sort only happens here; plain sampling never sorts
            probs, index = probs.sort(dim=-1, descending=True)
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    if isinstance(generator, (list, tuple)):
        choice = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generator)])
    else:
        choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return choice if index is None else index.gather(-1, choice[:, None]).squeeze(-1)


# --- the two model calls ----------------------------------------------------------------------

def prefill(model: GPT, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompts [B, T] from position 0, filling the cache; returns the last logits [B, V]."""
    return model(idx, start_pos=0, attn_mask=attn_mask, last_only=True)[:, -1]


def decode_one_token(model: GPT, token: torch.Tensor, pos: int, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed tokens [B] at position `pos`; returns the next logits [B, V]."""
    return model(token[:, None], start_pos=pos, attn_mask=attn_mask)[:, -1]


def decode_one_token_static(model: GPT, token: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`decode_one_token` with static shapes, for a compiler that captures the step once (a CUDA
    graph: torch.compile(..., mode="reduce-overhead")): positions as a tensor [B] and the mask
    [B, 1, 1, cache length] over the whole cache, so no shape changes from step to step."""
    return model(token[:, None], start_pos=pos, attn_mask=mask)[:, -1]


def _full_mask(key_ok: torch.Tensor, T: int) -> torch.Tensor:
    """[B, 1, T, T]: causal, pad keys hidden. A pad query still sees itself: a row of all-False
    would make softmax NaN, and the NaN would reach real rows through the cached values."""
    causal = torch.ones(T, T, dtype=torch.bool, device=key_ok.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=key_ok.device)
    return ((causal & key_ok[:, None, None, :T]) | eye)


# --- streaming text: incremental UTF-8 and stop strings ------------------------------------------

class RowOutput:
    """One row's output so far, token by token: ids, log-probs, and the text with what is safe
    to show. `push(token)` takes the next sampled id and returns its `Delta`; `finish(reason)`
    ends the row (e.g. a server's timeout). `stream` keeps one per prompt; the server's
    batcher keeps one per request."""

    def __init__(self, index: int, prompt_tokens: int, max_new: int, tokenizer, stop_strings: tuple[str, ...]):
        self.index, self.prompt_tokens, self.max_new = index, prompt_tokens, max_new
        self.tok, self.stop_strings = tokenizer, stop_strings
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.text, self.sent = "", 0  # decoded text; how much of it was yielded
        self.pending: list[int] = []  # ids whose bytes do not yet end on a whole character
        self.finish_reason: str | None = None  # None while running
        self.stop: int | str | None = None

    def push(self, token: int, stop_ids, logprob=None, top=None) -> Delta:
        if token in stop_ids:
            return self.finish("stop", token, None)
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top.append(top)
        delta = Delta(self.index, token, logprob=logprob, top_logprobs=top)
        if self.tok is not None:
            old = len(self.text)
            self.pending.append(token)
            piece = self.tok.decode(self.pending, skip_special=True)
            # A byte-level token can end inside a multi-byte character, which decodes as U+FFFD
            # until the rest arrives; a character has at most 4 bytes, so never wait longer.
            if not piece.endswith("\ufffd") or len(self.pending) > 4:
                self.text += piece
                self.pending = []
            hit = self._find_stop(old)
            if hit is not None:
                self.text = self.text[:hit[0]]
                return self.finish("stop", hit[1], delta)
            safe = len(self.text) - self._held_back()
            delta.text, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        if len(self.ids) >= self.max_new:
            return self.finish("length", None, delta)
        return delta

    def _find_stop(self, old: int):
        """Earliest stop string in the text that ends in the new part: (start, string) or None."""
        best = None
        for s in self.stop_strings:
            k = self.text.find(s, max(0, old - len(s) + 1))
            if k >= 0 and (best is None or k < best[0]):
                best = (k, s)
        return best

    def _held_back(self) -> int:
        """Length of the longest end of the text that could be the start of a stop string."""
        n = 0
        for s in self.stop_strings:
            for m in range(min(len(s) - 1, len(self.text)), n, -1):
                if self.text.endswith(s[:m]):
                    n = m
                    break
        return n

    def finish(self, reason: str, stop=None, delta: Delta | None = None) -> Delta:
        self.finish_reason, self.stop = reason, stop
        if self.pending:  # undecodable to the end: show what there is (with U+FFFD)
            self.text += self.tok.decode(self.pending, skip_special=True)
            self.pending = []
        delta = delta or Delta(self.index, None)
        if self.tok is not None:
            delta.text, self.sent = delta.text + self.text[self.sent:], len(self.text)
        delta.finish_reason, delta.stop = reason, stop
        return delta

    def completion(self, logprobs: bool, top: bool) -> Completion:
        return Completion(self.ids, self.text if self.tok is not None else None, self.finish_reason or "length",
                          self.stop, self.logprobs if logprobs else None, self.top if top else None,
                          self.prompt_tokens)


# --- generation -------------------------------------------------------------------------------

def stream(model: GPT, prompts: list[list[int]], max_tokens: int | list[int] = 256, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           stop_ids=(), stop_strings=(), tokenizer=None, logprobs: bool = False, top_logprobs: int = 0,
           truncate: str | None = None, use_cache: bool = True, decode_step=decode_one_token,
           _results: list | None = None,
           ) -> Iterator[list[Delta]]:
    """Generate for a batch of prompts (lists of token ids), yielding at every step the list of
    `Delta`s of the rows still running (a row's last delta carries its finish_reason).

    max_tokens: one limit, or one per row. seed: row i samples from its own generator seeded
    `seed + i`, so a row gets the same sample batched or alone; None = torch's global RNG.
    stop_ids end a row and are not returned. stop_strings (needs `tokenizer`) end a row when its
    decoded text contains one; the text is cut before it. Text is decoded incrementally:
    a delta's text holds back the bytes of an incomplete UTF-8 character and any ending that
    could be the start of a stop string, so the deltas concatenate to exactly the final text.
    Special tokens decode to nothing (their ids are in the deltas).
    logprobs: the log-probability of each returned token under the model's own distribution
    (log-softmax of the raw logits: before temperature, top-k and top-p, as OpenAI reports it);
    top_logprobs=n adds the n most likely (id, logprob) at each step.
    use_cache=False recomputes everything each step (the reference the cache is tested against).
    decode_step: the function that runs one step (`decode_one_token`'s signature), e.g.
    `torch.compile(decode_one_token, dynamic=True)` on an unpacked model
    (`for_inference(model, dtype, pack=False)`: inductor cannot trace packed weights). On a CPU
    that pays for small models only, after the first call's compilation (bench/README.md).
    """
    if not isinstance(prompts, (list, tuple)) or not prompts or isinstance(prompts[0], int):
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (to decode the text)")
    B, ctx, vocab = len(prompts), model.cfg.max_seq_len, model.cfg.vocab_size
    limits = [max_tokens] * B if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != B:
        raise ValueError(f"{len(limits)} max_tokens for {B} prompts")
    prompts = [fit_prompt(list(p), ctx, m, truncate) for p, m in zip(prompts, limits)]
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"token id {max(p) if max(p) >= vocab else min(p)} is outside the vocabulary (0..{vocab - 1})")
    L = max(len(p) for p in prompts)
    limits = [min(m, ctx - L) for m in limits]  # all rows share positions: the longest prompt sets the room
    steps = max(limits)
    rows = [RowOutput(i, len(p), m, tokenizer, tuple(s for s in stop_strings if s))
            for i, (p, m) in enumerate(zip(prompts, limits))]
    for r in rows:
        if r.max_new <= 0:  # no room at all: done before it starts
            r.finish_reason = "length"
    if _results is not None:
        _results.extend(rows)
    if steps <= 0:
        return

    device = next(model.parameters()).device
    pads = torch.tensor([L - len(p) for p in prompts], device=device)
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    # Masks only when some row is padded: without one, SDPA takes its plain causal fast path.
    key_ok = (torch.arange(L + steps, device=device)[None, :] >= pads[:, None]) if int(pads.max()) else None
    gens = None
    if seed is not None:
        gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(B)]
    stop_ids = frozenset(stop_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if use_cache:
                model.setup_cache(B, L + steps)
                logits = prefill(model, idx, None if key_ok is None else _full_mask(key_ok, L))
            else:
                logits = model(idx, attn_mask=None if key_ok is None else _full_mask(key_ok, L))[:, -1]
        pos = L
        for _ in range(steps):
            with torch.inference_mode():
                token = sample_logits(logits, temperature, top_k, top_p, gens)
                lp = top = None
                if logprobs or top_logprobs:
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    lp = logp.gather(-1, token[:, None])[:, 0].tolist()
                    if top_logprobs:
                        tv, ti = logp.topk(top_logprobs, dim=-1)
                        top = [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
            ids = token.tolist()
            deltas = [r.push(ids[r.index], stop_ids, lp and lp[r.index], top and top[r.index])
                      for r in rows if r.finish_reason is None]
            yield deltas
            if all(r.finish_reason is not None for r in rows):
                break
            with torch.inference_mode():
                if use_cache:
                    mask = None if key_ok is None else key_ok[:, None, None, :pos + 1]
                    logits = decode_step(model, token, pos, mask)
                else:
                    idx = torch.cat([idx, token[:, None]], dim=1)
                    mask = None if key_ok is None else _full_mask(key_ok, pos + 1)
                    logits = model(idx, attn_mask=mask)[:, -1]
            pos += 1
    finally:
        if use_cache:
            model.clear_cache()
        model.train(was_training)


def generate_batch(model: GPT, prompts: list[list[int]], max_tokens: int | list[int] = 256, **kw) -> list[Completion]:
    """`stream` run to the end: one Completion per prompt (same options as `stream`)."""
    rows: list[RowOutput] = []
    for _ in stream(model, prompts, max_tokens, _results=rows, **kw):
        pass
    return [r.completion(kw.get("logprobs", False), bool(kw.get("top_logprobs"))) for r in rows]


def generate(model: GPT, prompt_ids: list[int], max_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids=(), use_cache: bool = True, decode_step=decode_one_token) -> list[int]:
    """Continue one prompt; returns the new token ids. Unlike `stream`, a stop token that ended
    the sequence is included (the caller sees why it stopped). Generation also stops when the
    context (model.cfg.max_seq_len) is full."""
    fit_prompt(prompt_ids, model.cfg.max_seq_len, max_tokens)  # the clear error, even for max_tokens 0
    if max_tokens <= 0:
        return []
    c = generate_batch(model, [prompt_ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       seed=seed, stop_ids=stop_ids, use_cache=use_cache, decode_step=decode_step)[0]
    return c.ids + ([c.stop] if isinstance(c.stop, int) else [])
