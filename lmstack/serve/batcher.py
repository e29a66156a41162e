"""Continuous batching: one thread owns the model and decodes every running request together.

Requests arrive from the web server's event loop (`Batcher.submit`). Between two decode steps
the scheduler admits waiting requests into free KV-cache slots (each prompt prefilled on its
own, into its slot), then feeds one token for every live row in a single forward pass, each
row at its own position (the model's per-row positions). A row that finishes, runs out of
time, or whose client went away frees its slot at once: the last live row moves into it, so
the live rows are always slots 0..n-1 and a step costs what n rows cost.

Each request gets its events through a callback (called on the scheduler thread; the server
hands them to its event loop): `("prompt", logprobs)` first when prompt log-probs were asked
for, then one `Delta` per token (the engine's), the last with its finish_reason; or
`("error", message)`. Whatever concerns one request alone (its seed, its prefill, its sampling,
its callback) fails that request alone; only a failed batched forward fails every live row.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmstack.engine import RowOutput, sample_logits


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    logprobs: bool = False  # log-prob of each generated token
    top_logprobs: int = 0  # and the n most likely alternatives
    prompt_logprobs: int | None = None  # echo: log-probs of the prompt tokens (n alternatives)
    deadline: float | None = None  # time.monotonic() after which the row ends ("timeout")
    on_event: Callable = print
    cancelled: bool = False  # set by the client side (disconnect): the slot is freed
    submitted: float = field(default_factory=time.monotonic)


class _Live:
    """A request in a cache slot."""

    def __init__(self, req: GenRequest, tok, max_new: int, device):
        self.req, self.pos = req, len(req.prompt)
        self.text = RowOutput(0, len(req.prompt), max_new, tok, tuple(s for s in req.stop_strings if s))
        self.gen = None
        if req.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(req.seed)
        self.logits = None  # the next token's logits [V]
        self.token = None


class Batcher:
    """The scheduler thread. `slots`: how many requests decode together (KV-cache rows)."""

    def __init__(self, model, tok, slots: int = 16):
        self.model, self.tok, self.slots = model, tok, slots
        self.ctx = model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self.pending: queue.Queue[GenRequest] = queue.Queue()
        self.live: list[_Live] = []
        self.stats = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "max_live": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmstack-batcher", daemon=True)

    def start(self) -> "Batcher":
        self.model.setup_cache(self.slots, self.ctx)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.model.clear_cache()

    def submit(self, req: GenRequest) -> None:
        if len(req.prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(req.prompt)} tokens does not fit the context of {self.ctx}")
        self.pending.put(req)

    @property
    def load(self) -> dict:
        return {"live": len(self.live), "waiting": self.pending.qsize(), "slots": self.slots, **self.stats}

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.live:  # idle: sleep until a request comes
                    try:
                        req = self.pending.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    self._admit(req)
                while len(self.live) < self.slots:  # fill free slots between two steps
                    try:
                        self._admit(self.pending.get_nowait())
                    except queue.Empty:
                        break
                if self.live:
                    self._step()
            except Exception as e:  # a failed batched forward must not kill the server: fail its rows
                for r in self.live:
                    _fail(r.req, e)
                self.live = []

    @torch.inference_mode()
    def _admit(self, req: GenRequest) -> None:
        if req.cancelled:
            return
        if req.deadline is not None and time.monotonic() > req.deadline:  # timed out while waiting
            req.on_event(RowOutput(0, len(req.prompt), 0, self.tok, ()).finish("timeout"))
            return
        slot = len(self.live)
        try:  # everything about this one request: its failure (a bad seed, out of memory) is its own
            logits = self.model(torch.tensor([req.prompt], device=self.device), start_pos=0, slot=slot)[0]
            self.stats["prefill_tokens"] += len(req.prompt)
            if req.prompt_logprobs is not None:
                req.on_event(("prompt", _prompt_logprobs(logits, req.prompt, req.prompt_logprobs)))
            row = _Live(req, self.tok, min(req.max_tokens, self.ctx - len(req.prompt)), self.device)
            row.logits = logits[-1]
            if row.text.max_new <= 0:  # nothing to generate (echo-only scoring) or no room
                req.on_event(row.text.finish("length"))
                return
        except Exception as e:
            _fail(req, e)
            return
        self.live.append(row)
        self.stats["max_live"] = max(self.stats["max_live"], len(self.live))

    @torch.inference_mode()
    def _step(self) -> None:
        now = time.monotonic()
        done = []
        for b, r in enumerate(self.live):
            req = r.req
            if req.cancelled:
                done.append(b)
                continue
            if req.deadline is not None and now > req.deadline:
                req.on_event(r.text.finish("timeout"))
                done.append(b)
                continue
            try:  # one row's sampling, text and callback: a failure ends that row alone
                delta = self._next_token(r)
                self.stats["tokens"] += 1  # max_new <= ctx - prompt: the row ends before the cache does
                req.on_event(delta)
            except Exception as e:
                _fail(req, e)
                done.append(b)
                continue
            if delta.finish_reason is not None:
                done.append(b)
        for b in reversed(done):  # free the slots: the last live row moves into each
            last = len(self.live) - 1
            if b != last:
                self.model.move_cache_row(last, b)
                self.live[b] = self.live[last]
            self.live.pop()
        if not self.live:
            return
        tokens = torch.tensor([[r.token] for r in self.live], device=self.device)
        pos = torch.tensor([r.pos for r in self.live], device=self.device)
        # Keys up to the furthest row only: attention over the whole cache would cost as if
        # every row were at the end of the context.
        keys = torch.arange(int(pos.max()) + 1, device=self.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # each row sees its own keys
        logits = self.model(tokens, start_pos=pos, attn_mask=mask)[:, 0]
        for b, r in enumerate(self.live):
            r.logits, r.pos = logits[b], r.pos + 1
        self.stats["steps"] += 1

    def _next_token(self, r: _Live):
        """Sample a live row's next token from its logits: its Delta (text, log-probs, finish)."""
        req = r.req
        token = sample_logits(r.logits[None], req.temperature, req.top_k, req.top_p, None if r.gen is None else [r.gen])
        t = int(token[0])
        lp = top = None
        if req.logprobs or req.top_logprobs:
            logp = torch.log_softmax(r.logits.float(), dim=-1)
            lp = float(logp[t])
            if req.top_logprobs:
                v, i = logp.topk(req.top_logprobs)
                top = list(zip(i.tolist(), v.tolist()))
        r.token = t
        return r.text.push(t, req.stop_ids, lp, top)


def _fail(req: GenRequest, e: Exception) -> None:
    """End one request with an error event (its client gets a 500 naming it); the batch goes on."""
    try:
        req.on_event(("error", f"{type(e).__name__}: {e}"))
    except Exception:  # noqa: BLE001 - a broken callback must not reach the other requests either
        pass


def _prompt_logprobs(logits: torch.Tensor, prompt: list[int], top: int) -> list[tuple]:
    """(log p(token_i | tokens before it), [top alternatives]) for prompt tokens 1..n-1."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    ids = torch.tensor(prompt[1:], device=logits.device)
    chosen = logp.gather(-1, ids[:, None])[:, 0].tolist()
    alts = [[]] * len(chosen)
    if top:
        v, i = logp.topk(top, dim=-1)
        alts = [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
    return list(zip(chosen, alts))
