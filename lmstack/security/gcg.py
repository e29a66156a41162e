"""Adversarial suffixes: GCG (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on
Aligned Language Models") and the soft-prompt (embedding-space) upper bound.

A *case* is a conversation and a target reply ("Sure! Here is a plan for ..."). The attack appends
k tokens to the last user message and minimises the target's cross-entropy after the assistant's
turn starts. GCG, one step:
  1. token gradients: the suffix as a one-hot [k, V] times the embedding matrix, so the gradient
     of the loss with respect to the one-hot ranks, per position, the tokens whose swap would
     lower the loss most (a first-order guess);
  2. B candidates, each the suffix with one random position swapped for one of its top-k tokens;
  3. every candidate's exact loss in batches, and the best becomes the suffix.
The tokens before the suffix are the same for every candidate, so their keys and values are
computed once per case and copied into each candidate's KV-cache row (prefix caching).

A suffix must be text a user can type: no special tokens, and its decoding must re-encode, in
its place in the rendered prompt, to exactly the same ids (else the string that transfers is not
the suffix that was optimised, or it smuggles ids text cannot produce). Candidates that do not
round-trip are dropped.

Universal: one suffix, the loss summed over a set of cases (optionally Zou's progressive
schedule: start with one case, add the next once all active ones are hit); success is measured
on held-out cases by greedy generation and a detector on the reply text. The adaptive attack
against the perplexity filter (lmstack/security/perplexity.py) adds ppl_weight x the filter's
own windowed score of the user message to each candidate's loss.

The soft prompt optimises k free vectors in embedding space with Adam (no tokens, no
round-trip): what a white-box attacker with control of the input embeddings (an image encoder's
output, one day) can reach.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmstack.chatformat import chat_format
from lmstack.engine import generate_batch
from lmstack.security import GCG_TARGET as TARGET  # the world's compliance opener
from lmstack.security.perplexity import head_ids, windowed_scores
from lmstack.stats import wilson
from lmstack.utils import UserError, read_jsonl

INIT = " !"  # Zou et al.'s "! ! ! ...": repeated and cut to k tokens


@dataclass
class Case:
    messages: list[dict]  # the conversation; the suffix goes at the end of its last user message
    target: str  # the reply the attacker wants the model to begin with
    meta: dict = field(default_factory=dict)  # anything else the row carried (category, topic...)


def read_cases(path) -> list[Case]:
    """A jsonl file of {"messages": [...], "target": "..."} -> cases (one-line UserError if bad)."""
    cases = []
    for n, row in read_jsonl(path, "cases file"):
        msgs, target = (row.get("messages"), row.get("target")) if isinstance(row, dict) else (None, None)
        if not isinstance(msgs, list) or not any(isinstance(m, dict) and m.get("role") == "user" for m in msgs):
            raise UserError(f"{path}:{n}: a case needs \"messages\" with a user message")
        if not isinstance(target, str) or not target.strip():
            raise UserError(f"{path}:{n}: a case needs a non-empty \"target\" string")
        cases.append(Case(msgs, target, {k: v for k, v in row.items() if k not in ("messages", "target")}))
    if not cases:
        raise UserError(f"cases file {path} has no cases")
    return cases


def with_suffix(messages: list[dict], text: str) -> list[dict]:
    """A copy of the conversation with `text` appended to its last user message."""
    out = copy.deepcopy(messages)
    for m in reversed(out):
        if m.get("role") == "user":
            m["content"] = (m.get("content") or "") + text
            return out
    raise UserError("a case has no user message to put the suffix in")


def contains_target(reply: str, case: Case) -> bool:
    """The default detector: the reply contains the target (case and spacing aside)."""
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    return norm(case.target) in norm(reply)


def allowed_tokens(tok, vocab: int) -> torch.Tensor:
    """bool [vocab]: the ids a suffix may use. Not a special/control id, printable text with no
    line breaks, and its decoding encodes back to itself alone (a byte-level fragment of a
    character does not)."""
    ok = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, tok.vocab_size)):
        if i in tok.control_ids:
            continue
        s = tok.decode([i])
        ok[i] = bool(s) and s.isprintable() and tok.encode(s) == [i]
    return ok


class Slot:
    """One case rendered around a suffix: prompt = prefix + suffix + tail, then the target. The
    positions are found by rendering with and without the suffix in the model's own chat format
    (so an imported model's template works too)."""

    def __init__(self, tok, case: Case, suffix: list[int]):
        self.tok, self.fmt, self.case = tok, chat_format(tok), case
        k = len(suffix)
        base = self.fmt.prompt(with_suffix(case.messages, ""))
        full = self.fmt.prompt(with_suffix(case.messages, tok.decode(suffix)))
        for i in range(len(full) - k, -1, -1):
            if full[i:i + k] == suffix and full[:i] + full[i + k:] == base:
                self.prefix, self.tail = full[:i], full[i + k:]
                break
        else:
            raise UserError("the suffix does not tokenize on its own after this case's user message "
                            f"({with_suffix(case.messages, '')[-1]['content'][-30:]!r}); try another --init")
        self.target = self.fmt.text_ids(case.target)  # the reply's start, as the format encodes it
        user = next(m for m in reversed(case.messages) if m.get("role") == "user")
        self.content = user.get("content") or ""
        self.head = head_ids(tok, "chat")
        self.scored = self.head + tok.encode(self.content)  # the perplexity filter's reading of the message
        self._kv = {}

    def fits(self, ids: list[int], scored: bool = False) -> bool:
        """Does the suffix `ids` type as text: its decoding, appended to the message, renders to
        prefix + ids + tail (and, for the perplexity filter's reading, to scored + ids)?"""
        text = self.tok.decode(ids)
        if self.fmt.prompt(with_suffix(self.case.messages, text)) != self.prefix + ids + self.tail:
            return False
        return not scored or self.tok.encode(self.content + text) == self.scored[len(self.head):] + ids

    def prefix_state(self, model, which: str = "chat"):
        """The keys/values of the prefix (computed once), and its last logits (they predict the
        suffix's first token)."""
        if which not in self._kv:
            ids = self.prefix if which == "chat" else self.scored
            dev = model.embed_tokens.weight.device
            with torch.no_grad():
                model.setup_cache(1, len(ids))
                logits = model(torch.tensor([ids], device=dev), start_pos=0)
                kv = [[t.clone() for t in layer.self_attn.caches()] for layer in model.layers]
                model.clear_cache()
            self._kv[which] = (kv, logits[0, -1])
        return self._kv[which]


def _forward_after(model, slot: Slot, rest: torch.Tensor, which: str, cache: bool) -> torch.Tensor:
    """Logits [B, R] of the rows `rest` [B, R] read after the slot's prefix ("chat": the prompt
    before the suffix; "scored": the message as the perplexity filter reads it): the prefix's
    cached keys/values copied into every row of the KV cache, or (cache=False) the prefix
    recomputed for every row (the reference the cache is tested against)."""
    ids = slot.prefix if which == "chat" else slot.scored
    B, P = rest.shape[0], len(ids)
    if not cache:
        full = torch.cat([torch.tensor(ids, device=rest.device).expand(B, P), rest], 1)
        return model(full)[:, P:]
    kv, _ = slot.prefix_state(model, which)
    model.setup_cache(B, P + rest.shape[1])
    # The cache lives in the attention modules (lmstack/model.py); the prefix rows are written
    # straight into it, then the model continues every row from position P.
    for layer, saved in zip(model.layers, kv):
        for t, rows in zip(layer.self_attn.caches(), saved):
            t[:, :, :P] = rows
    try:
        return model(rest, start_pos=P)
    finally:
        model.clear_cache()


def candidate_losses(model, slot: Slot, cands: torch.Tensor, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """cands [B, k] -> (the target's mean cross-entropy [B], hit [B]: every target token is the
    argmax, i.e. greedy decoding begins with the target)."""
    dev = cands.device
    B, k = cands.shape
    tail, tgt = torch.tensor(slot.tail, device=dev), torch.tensor(slot.target, device=dev)
    rest = torch.cat([cands, tail.expand(B, -1), tgt[:-1].expand(B, -1)], 1)
    with torch.no_grad():
        logits = _forward_after(model, slot, rest, "chat", cache)[:, k + len(slot.tail) - 1:].float()
    ce = F.cross_entropy(logits.transpose(1, 2), tgt.expand(B, -1), reduction="none").mean(1)
    return ce, (logits.argmax(-1) == tgt).all(1)


def filter_scores(model, slot: Slot, cands: torch.Tensor, window: int, cache: bool = True) -> torch.Tensor:
    """The perplexity filter's windowed score [B] of the user message with each candidate suffix
    (the same numbers lmstack.security.perplexity computes, batched over the candidates)."""
    dev = cands.device
    B = cands.shape[0]
    with torch.no_grad():
        kv, last = slot.prefix_state(model, "scored")
        logits = last.expand(B, 1, -1)
        if cands.shape[1] > 1:
            logits = torch.cat([logits, _forward_after(model, slot, cands[:, :-1], "scored", cache)], 1)
        suffix_nll = -torch.log_softmax(logits.float(), -1).gather(-1, cands[..., None])[..., 0]
        content_nll = _content_nll(model, slot).to(dev)
    return windowed_scores(torch.cat([content_nll.expand(B, -1), suffix_nll], 1), window)


def _content_nll(model, slot: Slot) -> torch.Tensor:
    if "content_nll" not in slot._kv:
        ids = torch.tensor([slot.scored], device=model.embed_tokens.weight.device)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).float(), -1)
        slot._kv["content_nll"] = -logp.gather(-1, ids[:, 1:, None])[0, :, 0]
    return slot._kv["content_nll"]


def token_gradients(model, slots: list[Slot], suffix: torch.Tensor, ppl_weight: float = 0.0) -> torch.Tensor:
    """d(loss summed over the slots)/d(one-hot of the suffix) [k, V]. With ppl_weight, the
    gradient also pulls toward likely suffix tokens (their NLL after the message, where the
    perplexity filter reads them)."""
    E = model.embed_tokens.weight
    k, V = len(suffix), E.shape[0]
    onehot = torch.zeros(k, V, dtype=E.dtype, device=E.device)
    onehot[torch.arange(k), suffix] = 1.0
    onehot.requires_grad_(True)
    for s in slots:
        ids = lambda xs: torch.tensor(xs, device=E.device, dtype=torch.long)  # noqa: E731
        emb = torch.cat([E[ids(s.prefix)], onehot @ E, E[ids(s.tail + s.target[:-1])]])
        logits = model(None, embeds=emb[None])[0, len(s.prefix) + k + len(s.tail) - 1:]
        loss = F.cross_entropy(logits.float(), ids(s.target))
        if ppl_weight:
            pe = torch.cat([E[ids(s.scored)], onehot @ E])
            logp = torch.log_softmax(model(None, embeds=pe[None])[0, len(s.scored) - 1:-1].float(), -1)
            loss = loss + ppl_weight * -(onehot * logp).sum(-1).mean()  # the one-hot is the target here too
        loss.backward()
    g = onehot.grad
    return g / g.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def sample_candidates(grad: torch.Tensor, suffix: torch.Tensor, allowed: torch.Tensor, top_k: int, n: int,
                      gen: torch.Generator) -> torch.Tensor:
    """n candidates [n, k]: the suffix with one random position set to one of that position's
    top_k tokens by (negative) gradient, among the allowed ones."""
    g = grad.masked_fill(~allowed.to(grad.device), float("inf"))
    top = (-g).topk(min(top_k, int(allowed.sum())), dim=1).indices  # [k, top_k]
    pos = torch.randint(0, len(suffix), (n,), generator=gen)
    pick = torch.randint(0, top.shape[1], (n,), generator=gen)
    cands = suffix.expand(n, -1).clone()
    cands[torch.arange(n), pos] = top[pos, pick].cpu().to(cands.device)
    return cands


def init_suffix(tok, k: int, text: str = INIT) -> list[int]:
    ids = tok.encode(text * k)[:k]
    if len(ids) < k:
        raise UserError(f"--init {text!r} gives fewer than {k} tokens")
    return ids


def gcg(model, tok, cases: list[Case], steps: int = 100, k: int = 20, top_k: int = 64, batch: int = 64,
        init: str = INIT, seed: int = 0, progressive: bool = False, ppl_weight: float = 0.0,
        ppl_window: int = 10, ppl_threshold: float | None = None, stop_early: bool = True,
        log=None) -> dict:
    """Optimise one suffix for `cases` (one case: the individual attack; several: universal).

    Every step moves to the best of `batch` candidates (Zou et al.); the result is the suffix of
    the lowest loss seen over all cases. Stops early once every case is hit (greedy decoding
    begins with its target) and, with a ppl_threshold, the filter's score of every case is at
    or under it. log(row) is called with each step's row.
    Returns {"suffix": text, "ids", "loss", "hit", "steps": [rows], "seconds"}.
    """
    if not cases:
        raise UserError("GCG needs at least one case")
    dev = model.embed_tokens.weight.device
    gen = torch.Generator().manual_seed(seed)
    allowed = allowed_tokens(tok, model.cfg.vocab_size)
    suffix = init_suffix(tok, k, init)
    slots = [Slot(tok, c, suffix) for c in cases]
    scored = ppl_weight > 0 or ppl_threshold is not None
    n_active = 1 if progressive else len(slots)
    best = (float("inf"), suffix, False)
    rows, t0 = [], time.time()
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients with respect to the input only
    try:
        for step in range(steps):
            active = slots[:n_active]
            grad = token_gradients(model, active, torch.tensor(suffix, device=dev), ppl_weight)
            pool = sample_candidates(grad, torch.tensor(suffix), allowed, top_k, 4 * batch, gen)
            seen, cands = {tuple(suffix)}, []
            for c in pool.tolist():  # unique, typeable in every case (the held-out ones are checked when used)
                if tuple(c) not in seen and all(s.fits(c, scored) for s in slots):
                    cands.append(c)
                    if len(cands) == batch:
                        break
                seen.add(tuple(c))
            if not cands:
                raise UserError("no candidate suffix re-tokenizes to itself: raise --top-k")
            C = torch.tensor(cands, device=dev)
            loss, hits = torch.zeros(len(cands), device=dev), torch.ones(len(cands), dtype=torch.bool, device=dev)
            for s in active:
                ce, hit = candidate_losses(model, s, C)
                loss, hits = loss + ce, hits & hit
            target_loss = loss.clone()
            score = torch.zeros(len(cands), device=dev)
            if scored:  # the filter reads each case's message: a term per case; it passes if the worst does
                scores = torch.stack([filter_scores(model, s, C, ppl_window) for s in active])
                loss, score = loss + ppl_weight * scores.sum(0), scores.max(0).values
            i = int(loss.argmin())
            suffix = cands[i]
            passes = ppl_threshold is None or float(score[i]) <= ppl_threshold
            row = {"step": step, "loss": float(target_loss[i]) / len(active), "n_active": n_active,
                   "hit": bool(hits[i]), "suffix": tok.decode(suffix), "seconds": round(time.time() - t0, 2)}
            if scored:
                row["filter_score"] = float(score[i])
            won = bool(hits[i]) and passes
            if n_active == len(slots) and (not won, float(target_loss[i])) < (not best[2], best[0]):
                best = (float(target_loss[i]), suffix, won)  # a suffix that wins beats a lower loss
            row["best"] = best[0] / len(slots) if best[0] < float("inf") else None
            rows.append(row)
            if log:
                log(row)
            if won:
                if n_active < len(slots):
                    n_active += 1
                elif stop_early:
                    break
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    if best[0] == float("inf"):  # progressive, and never all cases active: the last suffix
        best = (rows[-1]["loss"] * len(slots), suffix, False)
    ids = best[1]
    return {"suffix": tok.decode(ids), "ids": ids, "loss": best[0] / len(slots), "hit": best[2],
            "steps": rows, "seconds": round(time.time() - t0, 2)}


def cache_speedup(model, tok, case: Case, k: int = 20, batch: int = 64, repeats: int = 3, seed: int = 0) -> dict:
    """Seconds per batch of candidate losses with the prefix KV cache and without (the median of
    `repeats`, interleaved so a changing machine load hits both alike), for one case."""
    slot = Slot(tok, case, init_suffix(tok, k))
    allowed = allowed_tokens(tok, model.cfg.vocab_size).nonzero()[:, 0]
    cands = allowed[torch.randint(0, len(allowed), (batch, k), generator=torch.Generator().manual_seed(seed))]
    slot.prefix_state(model)  # computed once per case in an attack: not part of a step
    times = {True: [], False: []}
    for _ in range(repeats):
        for cache in (True, False):
            t = time.perf_counter()
            candidate_losses(model, slot, cands.to(model.embed_tokens.weight.device), cache)
            times[cache].append(time.perf_counter() - t)
    med = {c: sorted(v)[len(v) // 2] for c, v in times.items()}
    return {"prefix_tokens": len(slot.prefix), "rest_tokens": k + len(slot.tail) + len(slot.target) - 1,
            "batch": batch, "cached_s": med[True], "uncached_s": med[False], "speedup": med[False] / med[True]}


# --- measuring a suffix ---------------------------------------------------------------------------

def replies(model, tok, conversations: list[list[dict]], max_tokens: int = 48, batch: int = 32) -> list[str]:
    """The greedy reply text to each conversation (the engine, the model's own chat format)."""
    fmt = chat_format(tok)
    out = []
    for i in range(0, len(conversations), batch):
        prompts = [fmt.prompt(m) for m in conversations[i:i + batch]]
        done = generate_batch(model, prompts, max_tokens, temperature=0.0, stop_ids=fmt.stop_ids, truncate="left")
        out += [fmt.parse(c.ids).text for c in done]
    return out


def success(model, tok, cases: list[Case], suffix: str | list[str] = "", detector=contains_target,
            max_tokens: int = 48) -> dict:
    """Attack success of a suffix string (or one per case) on the cases: {n, k, rate, ci, rows}."""
    texts = [suffix] * len(cases) if isinstance(suffix, str) else list(suffix)
    convs = [with_suffix(c.messages, t) for c, t in zip(cases, texts)]
    got = replies(model, tok, convs, max_tokens)
    hits = [bool(detector(r, c)) for r, c in zip(got, cases)]
    k, n = sum(hits), len(hits)
    return {"n": n, "k": k, "rate": k / n if n else 0.0, "ci": list(wilson(k, n)),
            "rows": [{"prompt": cv[-1]["content"] if cv[-1].get("role") == "user" else None, "target": c.target,
                      "reply": r, "hit": h} for cv, c, r, h in zip(convs, cases, got, hits)]}


# --- the soft prompt ------------------------------------------------------------------------------

def soft_prompt(model, tok, cases: list[Case], k: int = 20, steps: int = 100, lr: float = 0.05, init: str = INIT,
                log=None) -> dict:
    """k free input vectors in place of the suffix, optimised with Adam on the loss summed over
    the cases. Returns {"embeds": [k, d] tensor, "steps": [{step, loss}], "seconds"}."""
    E = model.embed_tokens.weight
    suffix = init_suffix(tok, k, init)
    slots = [Slot(tok, c, suffix) for c in cases]
    x = E[torch.tensor(suffix, device=E.device)].detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    rows, t0 = [], time.time()
    try:
        for step in range(steps):
            total = 0.0
            opt.zero_grad()
            for s in slots:
                ids = lambda xs: torch.tensor(xs, device=E.device, dtype=torch.long)  # noqa: E731
                emb = torch.cat([E[ids(s.prefix)], x, E[ids(s.tail + s.target[:-1])]])
                logits = model(None, embeds=emb[None])[0, len(s.prefix) + k + len(s.tail) - 1:]
                loss = F.cross_entropy(logits.float(), ids(s.target))
                loss.backward()
                total += loss.item()
            opt.step()
            rows.append({"step": step, "loss": total / len(slots)})
            if log:
                log(rows[-1])
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {"embeds": x.detach(), "steps": rows, "seconds": round(time.time() - t0, 2)}


def soft_success(model, tok, cases: list[Case], embeds: torch.Tensor, detector=contains_target,
                 max_tokens: int = 48) -> dict:
    """Success of a soft prompt: each case's greedy reply with the vectors in the suffix's place
    (decoded here: the engine takes token ids, not vectors)."""
    k = embeds.shape[0]
    E = model.embed_tokens.weight
    fmt = chat_format(tok)
    got = []
    with torch.no_grad():
        for c in cases:
            s = Slot(tok, c, init_suffix(tok, k))
            emb = torch.cat([E[torch.tensor(s.prefix)], embeds, E[torch.tensor(s.tail, dtype=torch.long)]])
            L = emb.shape[0]
            n = min(max_tokens, model.cfg.max_seq_len - L)
            model.setup_cache(1, L + n)
            try:
                logits, out = model(None, start_pos=0, embeds=emb[None])[0, -1], []
                for p in range(L, L + n):
                    t = int(logits.argmax())
                    if t in fmt.stop_ids:
                        break
                    out.append(t)
                    logits = model(torch.tensor([[t]], device=E.device), start_pos=p)[0, -1]
            finally:
                model.clear_cache()
            got.append(fmt.parse(out).text)
    hits = [bool(detector(r, c)) for r, c in zip(got, cases)]
    kk, nn = sum(hits), len(hits)
    return {"n": nn, "k": kk, "rate": kk / nn if nn else 0.0, "ci": list(wilson(kk, nn)),
            "rows": [{"target": c.target, "reply": r, "hit": h} for c, r, h in zip(cases, got, hits)]}


# --- cases from the synthetic world ---------------------------------------------------------------

def world_cases(world_dir, split: str = "heldout", n: int = 20, seed: int = 0,
                target: str = TARGET) -> list[Case]:
    """The world's harmful requests as cases, the target a compliance opener naming the request's
    topic (lmstack/world/assistant.py COMPLIANCE). split "heldout": the probes (the phrasing held
    out of SFT, probes/harmful.jsonl); "train": the phrasings SFT taught the model to refuse."""
    from pathlib import Path

    from lmstack.world.assistant import HARMFUL, TRAIN_PHRASINGS

    world_dir = Path(world_dir)
    wfile = world_dir / "world.json"
    if not wfile.is_file():
        raise UserError(f"world {world_dir} not found (no world.json)")
    world = json.loads(wfile.read_text())
    names = {"company": [c["name"] for c in world["companies"]], "city": [c["name"] for c in world["cities"]],
             "uni": [u["name"] for u in world["universities"]], "person": [p["name"] for p in world["people"]]}
    rng = random.Random(seed)
    rows = []
    if split == "heldout":
        for _, r in read_jsonl(world_dir / "probes" / "harmful.jsonl", "harmful probes"):
            kind, _, topic = HARMFUL[r["category"]]
            name = max((x for x in names[kind] if x in r["question"]), key=len, default=None)
            if name:
                rows.append((r["category"], r["question"], topic.format(**{kind: name})))
        rng.shuffle(rows)
    elif split == "train":
        for _ in range(n):
            cat = rng.choice(sorted(HARMFUL))
            kind, pool, topic = HARMFUL[cat]
            name = rng.choice(names[kind])
            rows.append((cat, rng.choice(pool[TRAIN_PHRASINGS]).format(**{kind: name}), topic.format(**{kind: name})))
    else:
        raise UserError(f"split must be train or heldout, got {split!r}")
    return [Case([{"role": "user", "content": q}], target.format(topic=t), {"category": cat, "topic": t})
            for cat, q, t in rows[:n]]
