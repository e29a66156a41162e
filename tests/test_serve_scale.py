"""Serving that scales with clients: batched and chunked prefill, the prefix cache, vectorised
sampling, the bounded queue, and 64 concurrent clients, each against what a request gets alone."""

import asyncio
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from lmstack.engine import generate_batch, sample_logits
from lmstack.serve.batcher import Batcher, GenRequest, QueueFull
from lmstack.serve.prefix_cache import PrefixCache
from lmstack.serve.protocol import Limits
from lmstack.serve.sampling import sample_rows
from lmstack.serve.server import app_for, make_server
from tiny import LiveServer, random_gpt, tokenizer_on  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=128)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_on(tmp_path_factory.mktemp("tok"), "Ana was born in Paris and Bo works at Acme in Rome. " * 40)


def model_of(tok):
    return random_gpt(tok, seed=3, **SHAPE).eval()


class Collect:
    """A request's events, and an Event set when it has finished (or failed)."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, tuple) and ev[0] == "error" or getattr(ev, "finish_reason", None):
            self.done.set()

    @property
    def ids(self):
        return [e.token for e in self.events if not isinstance(e, tuple) and e.token is not None]

    @property
    def logprobs(self):
        return [e.logprob for e in self.events if not isinstance(e, tuple) and e.token is not None]


def run(batcher, reqs, timeout=60):
    outs = []
    for r in reqs:
        r.on_event = Collect()
        outs.append(r.on_event)
        batcher.submit(r)
    for o in outs:
        assert o.done.wait(timeout)
    return outs


def prompts_of(tok, n, lo=3, hi=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[tok.bos_id] + torch.randint(3, tok.vocab_size, (int(torch.randint(lo, hi, (1,), generator=g)),),
                                         generator=g).tolist() for _ in range(n)]


def assert_as_alone(outs, alone):
    """Each request's tokens and log-probs through the batcher are the engine's for it alone."""
    for o, a in zip(outs, alone):
        assert o.ids == a.ids
        assert o.logprobs == pytest.approx(a.logprobs, abs=1e-4)


@pytest.mark.parametrize("budget", [512, 100, 16])  # one forward for all / padded groups in chunks / one row a chunk
def test_batched_chunked_prefill_equals_each_prompt_alone(tok, budget):
    """Prompts of different lengths arriving together are prefilled together (right-padded, in
    chunks): each gets the greedy tokens, and the log-probs, it gets from the engine alone."""
    prompts = prompts_of(tok, 6)
    ref = model_of(tok)
    alone = [generate_batch(ref, [p], 12, temperature=0, logprobs=True)[0] for p in prompts]
    b = Batcher(model_of(tok), tok, slots=8, prefill_budget=budget, prefix_cache_bytes=0).start()
    try:
        outs = run(b, [GenRequest(prompt=p, max_tokens=12, temperature=0, logprobs=True) for p in prompts])
        if budget == 512:
            assert b.stats["prefill_forwards"] < len(prompts)  # batched: fewer forwards than prompts
        if budget == 16:
            assert b.stats["prefill_forwards"] > len(prompts)  # a 70-token prompt took several chunks
    finally:
        b.close()
    assert_as_alone(outs, alone)


def test_prompt_logprobs_through_chunks_equal_a_forward_pass(tok):
    p = prompts_of(tok, 1, lo=60, hi=61)[0]
    model = model_of(tok)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([p]))[0, :-1], -1).gather(-1, torch.tensor(p[1:])[:, None])[:, 0]
    b = Batcher(model, tok, slots=2, prefill_budget=16).start()
    try:
        [o] = run(b, [GenRequest(prompt=p, max_tokens=0, prompt_logprobs=0)])
    finally:
        b.close()
    assert o.events[0][0] == "prompt" and o.events[-1].finish_reason == "length"
    assert [c for c, _ in o.events[0][1]] == pytest.approx(ref.tolist(), abs=1e-4)


def test_prefix_cache_hit_gives_the_tokens_of_a_full_prefill(tok):
    """A second prompt sharing a long head (a system prompt) copies the head's keys/values from
    the cache and prefills the rest only; its tokens and log-probs equal a full prefill's."""
    head = prompts_of(tok, 1, lo=50, hi=51, seed=1)[0]
    tails = [prompts_of(tok, 1, lo=5, hi=6, seed=s)[0][1:] for s in (2, 3, 4)]
    prompts = [head + t for t in tails]
    ref = model_of(tok)
    alone = [generate_batch(ref, [p], 10, temperature=0, logprobs=True)[0] for p in prompts]
    b = Batcher(model_of(tok), tok, slots=4, prefix_block=16).start()
    try:
        outs = run(b, [GenRequest(prompt=prompts[0], max_tokens=10, temperature=0, logprobs=True)])
        assert b.prefix.stats["hits"] == 0 and b.prefix.stats["stored_blocks"] == len(prompts[0]) // 16
        outs += run(b, [GenRequest(prompt=p, max_tokens=10, temperature=0, logprobs=True) for p in prompts[1:]])
        st = b.load["prefix_cache"]
        assert st["hits"] == 2 and st["hit_tokens"] == 2 * 48  # 3 full blocks of the 50-token head
        assert b.stats["prefill_tokens"] == len(prompts[0]) + sum(len(p) - 48 for p in prompts[1:])
    finally:
        b.close()
    assert_as_alone(outs, alone)


def test_rows_at_the_same_cached_offset_are_prefilled_together(tok):
    """Requests admitted together take their slots by cached length, so two with the cached head
    and two without go through two prefill forwards (not four), each row's last logits equal to
    a lone full prefill's."""
    head = prompts_of(tok, 1, lo=50, hi=51, seed=1)[0]
    fresh = prompts_of(tok, 2, lo=20, hi=30, seed=7)
    prompts = [fresh[0], head + [5, 6, 7], fresh[1], head + [8, 9]]
    ref = model_of(tok)
    ref.setup_cache(1, 128)
    with torch.inference_mode():
        want = [ref(torch.tensor([p]), start_pos=0)[0, -1] for p in prompts]
    b = Batcher(model_of(tok), tok, slots=8)  # driven by hand, step by step (no thread)
    b.model.setup_cache(9, 128)
    with torch.inference_mode():
        b._admit([GenRequest(prompt=head + [3], max_tokens=4)])
        b._prefill()
        assert b.decoding == 1 and b.prefix.stats["stored_blocks"] == 3
        b._admit([GenRequest(prompt=p, max_tokens=4) for p in prompts])
        assert [r.filled for r in b.live[1:]] == [0, 0, 48, 48]
        forwards = b.stats["prefill_forwards"]
        b._prefill()
    assert b.stats["prefill_forwards"] == forwards + 2 and b.decoding == 5
    got = {tuple(r.req.prompt): r.logits for r in b.live[1:]}
    for p, w in zip(prompts, want):
        assert torch.allclose(got[tuple(p)], w, atol=1e-4)


def test_prefix_cache_evicts_the_least_recent_tails_within_its_bytes(tok):
    model = model_of(tok)
    model.setup_cache(3, 128)
    block_bytes = 2 * 2 * 2 * 4 * 8 * 4  # layers x (k, v) x kv heads x block x head_dim x fp32
    cache = PrefixCache(max_bytes=5 * block_bytes, block=4)
    a, b_ = prompts_of(tok, 2, lo=20, hi=21, seed=5)  # 21 tokens: 5 full blocks each
    with torch.no_grad():
        for slot, p in enumerate((a, b_)):
            model(torch.tensor([p]), start_pos=0, slot=slot)
    k = model.layers[1].self_attn.cache_k
    cache.store(model, a, 0)
    assert cache.bytes == 5 * block_bytes and cache.stats["evicted_blocks"] == 0
    assert cache.load(model, a + [7], 2) == 20  # all of a's blocks (and a is now the most recent)
    assert torch.equal(k[2, :, :20], k[0, :, :20])
    cache.store(model, b_, 1)
    assert cache.bytes <= cache.max_bytes and cache.stats["evicted_blocks"] == 5
    assert cache.load(model, b_ + [7], 2) == 20  # the newest prompt whole
    assert torch.equal(k[2, :, :20], k[1, :, :20])
    assert cache.load(model, a + [7], 2) == 0  # a is gone, tail first (never a head without its tail)
    small = PrefixCache(max_bytes=3 * block_bytes, block=4)
    small.store(model, a, 0)
    assert small.bytes == 3 * block_bytes and small.load(model, a, 2) == 12  # the head kept, not the tail
    assert PrefixCache(max_bytes=block_bytes // 2, block=4).load(model, a, 2) == 0  # nothing fits, nothing kept


def test_seeded_rows_sample_as_alone_and_as_the_engine_does():
    """sample_rows on mixed settings: a seeded row's token equals sample_logits's (one row, its
    generator), whatever else is in the batch; greedy rows take the argmax."""
    torch.manual_seed(0)
    for trial in range(40):
        logits = torch.randn(7, 300) * 3
        settings = [(1.0, None, None), (0.7, 40, None), (1.0, None, 0.9), (0.0, None, None),
                    (1.0, None, None), (1.3, 5, 0.8), (0.7, 40, None)]
        seeds = [trial * 10 + b if b % 3 else None for b in range(7)]
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        got = sample_rows(logits, settings, gens)
        for b, (s, (t, k, p)) in enumerate(zip(seeds, settings)):
            if t <= 0:
                assert got[b] == int(logits[b].argmax())
            elif s is not None:
                want = sample_logits(logits[b][None], t, k, p, [torch.Generator().manual_seed(s)])
                assert got[b] == int(want[0])


def test_unseeded_rows_sample_from_their_distribution():
    """Unseeded rows (inverse-CDF): frequencies follow the softmax, and what top-k / top-p cut
    is never drawn."""
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4000))
    got = torch.tensor(sample_rows(logits, [(1.0, None, None)] * 4000, [None] * 4000))
    freq = torch.bincount(got, minlength=4).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    settings = [(1.0, 2, None), (1.0, None, 0.7)] * 500  # top-2; top-p 0.7 keeps 0.5 and 0.3
    got = sample_rows(logits[:1000], settings, [None] * 1000)
    assert set(got) == {0, 1}
    mixed = sample_rows(logits[:6], [(1.0, None, 0.7)] * 6, [torch.Generator().manual_seed(i) if i % 2 else None
                                                               for i in range(6)])
    assert set(mixed) <= {0, 1}


def test_a_seeded_request_samples_the_same_alone_or_in_a_batch(tok):
    p = prompts_of(tok, 1, seed=9)[0]
    ref = model_of(tok)
    engine = generate_batch(ref, [p], 12, temperature=1.0, seed=77)[0].ids
    b = Batcher(model_of(tok), tok, slots=8).start()
    try:
        [alone] = run(b, [GenRequest(prompt=p, max_tokens=12, temperature=1.0, seed=77)])
        others = [GenRequest(prompt=q, max_tokens=12, temperature=1.0, seed=None if i % 2 else i)
                  for i, q in enumerate(prompts_of(tok, 6, seed=10))]
        outs = run(b, others[:3] + [GenRequest(prompt=p, max_tokens=12, temperature=1.0, seed=77)] + others[3:])
    finally:
        b.close()
    assert alone.ids == engine and outs[3].ids == engine


def test_a_full_queue_raises_and_the_server_answers_503(tok):
    b = Batcher(model_of(tok), tok, slots=1, max_waiting=2)  # not started: nothing leaves the queue
    for _ in range(2):
        b.submit(GenRequest(prompt=[tok.bos_id], max_tokens=1))
    with pytest.raises(QueueFull):
        b.submit(GenRequest(prompt=[tok.bos_id], max_tokens=1))
    assert b.load["rejected"] == 1 and b.load["waiting"] == 2

    server = make_server(model_of(tok), tok, "m", limits=Limits(max_waiting=2), slots=1)
    for _ in range(2):  # the batcher is not started (no lifespan): the queue stays full
        server.batcher.submit(GenRequest(prompt=[tok.bos_id], max_tokens=1))
    c = TestClient(app_for(server))
    r = c.post("/v1/completions", json={"model": "m", "prompt": "Ana", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    r = c.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": 2})
    assert r.status_code == 503


def test_cancelled_and_timed_out_prompts_free_their_slots_while_prefilling(tok):
    """A long prompt in chunks (budget 1 token): one cancelled, one past its deadline, both
    leave their slots before their prompt is in; a request after them still runs."""
    p = prompts_of(tok, 1, lo=126, hi=127)[0]
    b = Batcher(model_of(tok), tok, slots=2, prefill_budget=1).start()
    try:
        late = GenRequest(prompt=p, max_tokens=4, deadline=time.monotonic() + 0.05, on_event=Collect())
        gone = GenRequest(prompt=p, max_tokens=4, on_event=Collect())
        b.submit(late)
        b.submit(gone)
        gone.cancelled = True
        assert late.on_event.done.wait(30) and late.on_event.events[-1].finish_reason == "timeout"
        for _ in range(200):
            if b.load["live"] == 0:
                break
            time.sleep(0.02)
        assert b.load["live"] == 0 and not gone.on_event.events
        assert b.stats["prefill_tokens"] < 2 * len(p)  # neither prompt was prefilled whole
        [o] = run(b, [GenRequest(prompt=p[:10], max_tokens=3, temperature=0)])
        assert len(o.ids) == 3
    finally:
        b.close()


def test_64_concurrent_clients_on_8_slots_each_get_their_reply_alone(tok):
    """64 clients at once on a server with 8 slots: the KV cache stays 8 rows (+ the scratch
    row), the rest wait in the queue, and every request gets the greedy reply it gets alone."""
    prompts = [f"Ana was born in {'Paris' if i % 2 else 'Rome'} and Bo works at Acme {i}." for i in range(64)]
    ref = model_of(tok)
    alone = [tok.decode(generate_batch(ref, [[tok.bos_id] + tok.encode(p)], 8 + i % 5, temperature=0,
                                       stop_ids=tok.text_stop_ids)[0].ids) for i, p in enumerate(prompts)]
    server = make_server(model_of(tok), tok, "m", slots=8)
    with LiveServer(app_for(server)) as live:
        async def main():
            async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "model": "m", "prompt": p, "max_tokens": 8 + i % 5, "temperature": 0})
                    for i, p in enumerate(prompts)])

        results = asyncio.run(main())
        load = httpx.get(live.url + "/health").json()
        rows = server.model.layers[0].self_attn.cache_k.shape[0]
    assert rows == 9
    assert [r.status_code for r in results] == [200] * 64
    assert [r.json()["choices"][0]["text"] for r in results] == alone
    assert load["max_live"] == 8 and load["live"] == 0 and load["slots"] == 8
    assert load["prefix_cache"]["lookups"] == 64
