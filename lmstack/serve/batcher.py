"""Continuous batching: one thread owns the model and decodes every running request together.

Requests arrive from the web server's event loop (`Batcher.submit`). Between two decode steps
the scheduler admits waiting requests into free KV-cache slots (a bounded queue holds the rest:
`submit` raises QueueFull when it is full, and the server answers 503), prefills their prompts
together (rows at the same offset in one forward, right-padded; at most `prefill_budget` tokens
per iteration, so a long prompt goes in chunks and the running rows wait for one chunk at most;
a prompt's cached prefix, `prefix_cache.py`, is copied in rather than prefilled), then feeds one
token to every decoding row in a single forward pass, each row at its own position (the model's
per-row positions), after sampling all of them at once (`sampling.py`). A row that finishes,
runs out of time, or whose client went away frees its slot at once: rows move so that the
decoding rows are always slots 0..d-1 and the prefilling ones d..n-1, and a step costs what d
rows cost. The KV cache is slots x context, allocated once: memory does not grow with clients.

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
from lmstack.serve.prefix_cache import PrefixCache
from lmstack.serve.sampling import sample_rows


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


class QueueFull(Exception):
    """The waiting queue is full: the server answers 503 and the client may retry later."""


class _Live:
    """A request in a cache slot: prefilling (`filled` prompt tokens in the cache so far), then
    decoding."""

    def __init__(self, req: GenRequest, tok, max_new: int, device):
        self.req, self.pos, self.filled = req, len(req.prompt), 0
        self.text = RowOutput(0, len(req.prompt), max_new, tok, tuple(s for s in req.stop_strings if s))
        self.gen = None
        if req.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(req.seed)
        self.prompt_logits = [] if req.prompt_logprobs is not None else None  # echo: every chunk's logits
        self.logits = None  # the next token's logits [V]
        self.token = None

    @property
    def sampling(self) -> tuple:
        return self.req.temperature, self.req.top_k, self.req.top_p


class Batcher:
    """The scheduler thread. `slots`: how many requests are in the KV cache together; `max_waiting`:
    how many more may wait (then `submit` raises QueueFull); `prefill_budget`: prompt tokens
    prefilled per scheduler iteration, between two decode steps (a long prompt is prefilled in
    chunks, so the running rows wait for one chunk at most); `prefix_cache_bytes`: the bound of
    the prefix cache (0: none)."""

    def __init__(self, model, tok, slots: int = 16, max_waiting: int = 256, prefill_budget: int = 512,
                 prefix_cache_bytes: int = 64 << 20, prefix_block: int = 16):
        if max_waiting < 1 or prefill_budget < 1:
            raise ValueError("max_waiting and prefill_budget must be >= 1")
        self.model, self.tok, self.slots = model, tok, slots
        self.ctx = model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self.pending: queue.Queue[GenRequest] = queue.Queue(maxsize=max_waiting)
        self.prefill_budget = prefill_budget
        self.prefix = PrefixCache(prefix_cache_bytes, prefix_block) if prefix_cache_bytes > 0 else None
        # Slot order: the decoding rows first (0..decoding-1: a decode step feeds exactly these,
        # through the model's per-row positions), then the rows still prefilling.
        self.live: list[_Live] = []
        self.decoding = 0
        self.stats = {"steps": 0, "tokens": 0, "prefill_tokens": 0, "prefill_forwards": 0, "max_live": 0,
                      "rejected": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmstack-batcher", daemon=True)

    def start(self) -> "Batcher":
        # One row more than the slots: the scratch row through which two rows swap.
        self.model.setup_cache(self.slots + 1, self.ctx)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.model.clear_cache()

    def submit(self, req: GenRequest) -> None:
        if len(req.prompt) >= self.ctx:
            raise ValueError(f"prompt of {len(req.prompt)} tokens does not fit the context of {self.ctx}")
        try:
            self.pending.put_nowait(req)
        except queue.Full:
            self.stats["rejected"] += 1
            raise QueueFull(f"the server is busy: {self.pending.maxsize} requests are waiting already") from None

    @property
    def load(self) -> dict:
        out = {"live": len(self.live), "prefilling": len(self.live) - self.decoding, "waiting": self.pending.qsize(),
               "max_waiting": self.pending.maxsize, "slots": self.slots, **self.stats}
        if self.prefix is not None:
            out["prefix_cache"] = self.prefix.load_stats
        return out

    # --- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                new = []
                if not self.live:  # idle: sleep until a request comes
                    try:
                        new.append(self.pending.get(timeout=0.2))
                    except queue.Empty:
                        continue
                while len(self.live) + len(new) < self.slots:  # fill free slots between two steps
                    try:
                        new.append(self.pending.get_nowait())
                    except queue.Empty:
                        break
                self._admit(new)
                if self.decoding < len(self.live):
                    self._prefill()
                if self.decoding:
                    self._step()
            except Exception as e:  # a failed batched forward must not kill the server: fail its rows
                for r in self.live:
                    _fail(r.req, e)
                self.live, self.decoding = [], 0

    @torch.inference_mode()
    def _admit(self, reqs: list[GenRequest]) -> None:
        """Waiting requests into the next free slots, each one's cached prefix (if any) copied in.
        They take their slots in the order of their cached lengths, so that rows at the same
        offset sit side by side and are prefilled in one forward."""
        rows = []
        for req in reqs:
            if req.cancelled:
                continue
            if req.deadline is not None and time.monotonic() > req.deadline:  # timed out while waiting
                req.on_event(RowOutput(0, len(req.prompt), 0, self.tok, ()).finish("timeout"))
                continue
            try:  # everything about this one request: its failure (a bad seed) is its own
                row = _Live(req, self.tok, min(req.max_tokens, self.ctx - len(req.prompt)), self.device)
                # an echo needs every prompt logit: no cached prefix for it
                found = self.prefix.match(req.prompt) if self.prefix is not None and req.prompt_logprobs is None else []
            except Exception as e:
                _fail(req, e)
                continue
            rows.append((len(found), row, found))
        for _, row, found in sorted(rows, key=lambda x: x[0]):
            try:
                if self.prefix is not None and row.prompt_logits is None:
                    row.filled = self.prefix.load(self.model, row.req.prompt, len(self.live), found)
            except Exception as e:
                _fail(row.req, e)
                continue
            self.live.append(row)
        self.stats["max_live"] = max(self.stats["max_live"], len(self.live))

    @torch.inference_mode()
    def _prefill(self) -> None:
        """Prefill the waiting prompts, up to `prefill_budget` tokens (padding included) in all.
        Neighbouring rows at the same offset go through one forward, right-padded to the longest
        chunk: a row's pad keys land past its prompt, where its decode writes position p before
        any query reads it, and causal attention keeps them from the row's real tokens."""
        budget, i = self.prefill_budget, self.decoding
        while budget > 0 and i < len(self.live):
            off = self.live[i].filled
            group, T = [], 0
            for r in self.live[i:]:
                if r.filled != off:
                    break
                t = min(max(T, len(r.req.prompt) - off), budget)
                if group and (len(group) + 1) * t > budget:
                    break
                group.append(r)
                T = t
            self._prefill_group(i, group, off, T)
            budget -= len(group) * T
            i += len(group)
        self._promote()

    def _prefill_group(self, slot: int, group: list[_Live], off: int, T: int) -> None:
        pad = self.tok.bos_id if getattr(self.tok, "bos_id", None) is not None else 0
        takes = [min(T, len(r.req.prompt) - off) for r in group]
        idx = torch.tensor([r.req.prompt[off:off + n] + [pad] * (T - n) for r, n in zip(group, takes)],
                           device=self.device)
        try:
            # The head only where logits are read: each finished prompt's last position (and
            # every position of an echo's prompt).
            h = self.model.hidden(idx, start_pos=off, slot=slot)
            ends = [b for b, (r, n) in enumerate(zip(group, takes)) if r.filled + n == len(r.req.prompt)]
            if ends:
                last = self.model.lm_head(h[ends, [takes[b] - 1 for b in ends]])
                for b, logits in zip(ends, last):
                    group[b].logits = logits
            for b, (r, n) in enumerate(zip(group, takes)):
                if r.prompt_logits is not None:
                    r.prompt_logits.append(self.model.lm_head(h[b, :n]))
                r.filled += n
        except Exception as e:  # the group's failure is the group's own (e.g. out of memory)
            for r in group:
                _fail(r.req, e)
                r.req.cancelled = True  # freed by _promote
            return
        self.stats["prefill_tokens"] += sum(takes)
        self.stats["prefill_forwards"] += 1

    def _promote(self) -> None:
        """Rows whose prompt is in the cache join the decoding rows; cancelled ones leave."""
        s = self.decoding
        while s < len(self.live):
            r = self.live[s]
            if r.req.cancelled:
                self._free(s)
                continue
            if r.req.deadline is not None and time.monotonic() > r.req.deadline:
                r.req.on_event(r.text.finish("timeout"))
                self._free(s)
                continue
            if r.filled < len(r.req.prompt):
                s += 1
                continue
            try:
                if self.prefix is not None:
                    self.prefix.store(self.model, r.req.prompt, s)
                if r.prompt_logits is not None:
                    logits = torch.cat(r.prompt_logits)
                    r.prompt_logits = None
                    r.req.on_event(("prompt", _prompt_logprobs(logits, r.req.prompt, r.req.prompt_logprobs)))
                if r.text.max_new <= 0:  # nothing to generate (echo-only scoring) or no room
                    r.req.on_event(r.text.finish("length"))
                    self._free(s)
                    continue
            except Exception as e:
                _fail(r.req, e)
                self._free(s)
                continue
            self._swap(s, self.decoding)
            self.decoding += 1
            s += 1

    # --- slots --------------------------------------------------------------------------------

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        scratch = self.slots
        self.model.move_cache_row(a, scratch)
        self.model.move_cache_row(b, a)
        self.model.move_cache_row(scratch, b)
        self.live[a], self.live[b] = self.live[b], self.live[a]

    def _free(self, s: int) -> None:
        """Free slot s; the rows stay contiguous, the decoding ones first."""
        if s < self.decoding:  # the last decoding row fills the hole, the last row fills its place
            last = self.decoding - 1
            self._move(last, s)
            self.decoding -= 1
            s = last
        self._move(len(self.live) - 1, s)
        self.live.pop()

    def _move(self, src: int, dst: int) -> None:
        if src != dst:
            self.model.move_cache_row(src, dst)
            self.live[dst] = self.live[src]

    @torch.inference_mode()
    def _step(self) -> None:
        now = time.monotonic()
        rows = self.live[:self.decoding]
        done, going = [], []
        for b, r in enumerate(rows):
            req = r.req
            if req.cancelled:
                done.append(b)
            elif req.deadline is not None and now > req.deadline:
                req.on_event(r.text.finish("timeout"))
                done.append(b)
            else:
                going.append(b)
        tokens = self._sample([rows[b] for b in going])
        for b, t in zip(going, tokens):
            r, req = rows[b], rows[b].req
            try:  # one row's sampling, text and callback: a failure ends that row alone
                if t is None:
                    t = self._sample_alone(r)
                delta = self._push(r, t)
                self.stats["tokens"] += 1  # max_new <= ctx - prompt: the row ends before the cache does
                req.on_event(delta)
            except Exception as e:
                _fail(req, e)
                done.append(b)
                continue
            if delta.finish_reason is not None:
                done.append(b)
        for b in sorted(done, reverse=True):  # free the slots: the rows after move in
            self._free(b)
        if not self.decoding:
            return
        live = self.live[:self.decoding]
        tokens = torch.tensor([[r.token] for r in live], device=self.device)
        pos = torch.tensor([r.pos for r in live], device=self.device)
        # Keys up to the furthest row only: attention over the whole cache would cost as if
        # every row were at the end of the context.
        keys = torch.arange(int(pos.max()) + 1, device=self.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]  # each row sees its own keys
        logits = self.model(tokens, start_pos=pos, attn_mask=mask)[:, 0]
        for b, r in enumerate(live):
            r.logits, r.pos = logits[b], r.pos + 1
        self.stats["steps"] += 1

    def _sample(self, rows: list[_Live]) -> list:
        """The rows' next tokens, all at once (None for every row if that fails: each is then
        sampled alone, so a failure stays with its row)."""
        if not rows:
            return []
        try:
            return sample_rows(torch.stack([r.logits for r in rows]), [r.sampling for r in rows],
                               [r.gen for r in rows])
        except Exception:  # noqa: BLE001 - retried row by row below, where the culprit fails alone
            return [None] * len(rows)

    def _sample_alone(self, r: _Live) -> int:
        req = r.req
        return int(sample_logits(r.logits[None], req.temperature, req.top_k, req.top_p,
                                 None if r.gen is None else [r.gen])[0])

    def _push(self, r: _Live, t: int):
        """A live row's sampled token -> its Delta (text, log-probs, finish)."""
        req = r.req
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
