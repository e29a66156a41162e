"""Serving throughput: `lmstack serve` under 16 concurrent clients vs the same 16 requests in turn.

    .venv/bin/python bench/serve_throughput.py [--model runs/small/chat] [--requests 16]
        [--max-tokens 64] [--repeats 3] [--slots 16] [--endpoint chat|completions|assistant|both]
        [--threads N] [--dtype auto] [--no-stream] [--no-peer] [--prefix-cache-mb 64,0] [--json FILE]

The server runs as a subprocess (`python -m lmstack serve --model M --port FREE --db TMP`,
bench/common.py's `running_server`), is waited for on /health, and is always stopped at the end
(error or Ctrl-C included). Then, for
each endpoint:

- `sequential`: one client sends the requests one after another (each waits for the last);
- `concurrent`: one client per request, all sent at once (asyncio + httpx, one connection each);
- the same two with `stream: true`, which adds time to first token (TTFT: the first chunk that
  carries text; chat's opening role-only chunk does not count);
- the peer, in-process, no HTTP: `static-batch` is `lmstack.engine.generate_batch` on all the
  prompts at once (the ideal static batch: what concurrency could reach at best), and
  `engine-seq` is the same engine on one prompt at a time (the peer of `sequential`);
  `batcher-burst` / `batcher-seq` are the server's scheduler (`serve/batcher.py`) fed the same
  requests all at once / one after another, with TTFT at the first token's event: what the
  scheduler costs without HTTP, JSON and the event loop.

Workload: `--requests` prompts (world questions and arithmetic for chat; plain-text openings for
completions; `assistant`: the chat questions after one long system prompt, the same for every
request, as an assistant's instructions and knowledge are: what prefix caching is for; past 16
requests the prompts repeat, with other seeds), temperature 1.0 (the API's default), `max_tokens` fixed, and request
i seeded with 1000 + i, so every mode samples the same tokens for a request (the engine seeds
row i of a batch with seed + i, the server request i with its own seed). A request may still
stop before max_tokens (chat replies end with <|end|>; a text may reach <|eos|>), so every rate
counts the tokens actually generated: `usage.completion_tokens` from the server, the lengths of
the Completions from the engine. The counts per mode are printed side by side: they agree up to
the rare sample that batching's float rounding flips. tok/s = completion tokens / wall time
of the whole mode (first request sent to last response). Latencies are per request, pooled over
the timed repeats (p99 of 48 samples is close to the max). The modes alternate within each
repeat, so a burst of load elsewhere hits all of them; the median repeat is reported.

Next to the wall-clock rates: tokens per CPU-second of the server process (user + system, all
its threads, from /proc/PID/stat: what the work cost even when other jobs took the cores away),
the client's own CPU, `other` (cores used by every process but the server and this one, from
/proc/stat) and the load average; and the batcher's load seen by polling /health every 50 ms
during each run (most live rows and most waiting requests).

`--prefix-cache-mb 64,0`: one server per value (`lmstack serve --prefix-cache-mb V`); `--src
A,B`: one server per lmstack checkout (its PYTHONPATH; the in-process peers run the lmstack this
script imports). All the servers are up at once and every repeat runs every mode on each in
turn, so before/after and cache/no-cache are measured under the same load; the ratios compare
each server with the first. Without `--prefix-cache-mb` the flag is not passed (a checkout from
before it existed runs too).

A benchmark, not a test: it prints figures and ratios and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import time
from pathlib import Path

import httpx
import torch

from common import busy_cpu_seconds, emit, load, own_cpu_seconds, running_server  # bench/common.py

CHAT_PROMPTS = [
    "Which city was Chaisor Tochinros born in?",
    "What is the hometown of Wumara Zoard?",
    "Who is Thithora Jeigertwick's employer?",
    "Which subject did Blailena Vebiadal major in?",
    "Can you tell me who Tas Shableartley's father is?",
    "On what date was Theakette Zeiprosell born?",
    "Which university did Draiwoulara Briasheison attend?",
    "For which company does Dorim Stouwell work?",
    "Compute 8663 + 3691.",
    "Compute 452 - 178.",
    "Compute 37 * 12.",
    "Compute 9051 + 877.",
    "Ceitho buys 4 boxes with 5 pencils in each box. How many pencils is that in total?",
    "Pora has 23 apples and gives away 9. How many apples are left?",
    "Compute 6120 - 2543.",
    "Compute 15 * 7.",
]
TEXT_PROMPTS = [
    "On a windy summer morning, Steshurin Thiasov took the train to",
    "Sine Lahenberg's parents welcomed her on June 1, 1960. She has a son named",
    "Chaisor Tochinros was born in",
    "Thithora Jeigertwick works for",
    "The city was busy, as always, and everyone talked about",
    "Blailena Vebiadal studied nursing at",
    "Tas Shableartley's father is",
    "Dorim Stouwell is an employee of",
    "8663 + 3691 =",
    "Ceitho buys 4 boxes with 5 pencils in each box, so",
    "Theakette Zeiprosell was born on 6 January 1992 in",
    "By the river he met Pora Thianonski, who works for",
    "Draiwoulara Briasheison graduated from",
    "Wumara Zoard grew up in",
    "452 - 178 =",
    "When the sun went down, Homan Flogertov promised to",
]
SYSTEM = ("You are the help desk of the city library. Answer in one short sentence, and say so when you do not "
          "know. Facts you may use: Chaisor Tochinros was born in Lonvale and works for Brightwell. Wumara Zoard "
          "grew up in Tessford. Thithora Jeigertwick works for Ostrin Mills. Blailena Vebiadal studied nursing at "
          "Harrow University. Tas Shableartley's father is Oren Shableartley. Dorim Stouwell is an employee of "
          "Kelvar Foods. For arithmetic, compute step by step and give the number.")
SEED = 1000


def messages(endpoint: str, prompt: str) -> list[dict]:
    """A chat request's messages: the question, after the shared system prompt for `assistant`."""
    system = [{"role": "system", "content": SYSTEM}] if endpoint == "assistant" else []
    return system + [{"role": "user", "content": prompt}]


# --- machine and process state -----------------------------------------------------------------

def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) of process `pid`; NaN without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Wall time, the server's and this process's CPU, and the other processes' cores."""

    def __init__(self, server_pid: int | None):
        self.pid = server_pid
        self.t0, self.busy0, self.own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
        self.srv0 = proc_cpu(server_pid) if server_pid else 0.0

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own = own_cpu_seconds() - self.own0
        srv = (proc_cpu(self.pid) - self.srv0) if self.pid else 0.0
        other = max(0.0, (busy_cpu_seconds() - self.busy0) - own - srv) / wall
        return dict(wall=wall, client_cpu=own, server_cpu=srv, other_cores=other)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation between closest ranks, as numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # a SIGTERM to the benchmark still runs the finally that stops the server


# --- the clients -------------------------------------------------------------------------------

def request_body(endpoint: str, model_name: str, prompt: str, i: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": model_name, "max_tokens": max_tokens, "temperature": 1.0, "seed": SEED + i}
    if endpoint != "completions":
        body["messages"] = messages(endpoint, prompt)
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(client: httpx.AsyncClient, endpoint: str, body: dict) -> dict:
    """Send one request; (latency s, TTFT s or None, completion tokens, finish_reason)."""
    path = "/v1/completions" if endpoint == "completions" else "/v1/chat/completions"
    t0 = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:300]}")
        j = r.json()
        return dict(latency=time.perf_counter() - t0, ttft=None, tokens=j["usage"]["completion_tokens"],
                    finish=j["choices"][0]["finish_reason"])
    ttft, tokens, finish = None, None, None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{path}: {obj['error']}")
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            for c in obj.get("choices", []):
                text = c.get("text") if endpoint == "completions" else (c.get("delta") or {}).get("content")
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                finish = c.get("finish_reason") or finish
    if tokens is None:
        raise RuntimeError(f"{path}: the stream ended without usage")
    return dict(latency=time.perf_counter() - t0, ttft=ttft, tokens=tokens, finish=finish)


async def poll_health(client: httpx.AsyncClient, seen: dict, stop: asyncio.Event, every: float = 0.05) -> None:
    while not stop.is_set():
        try:
            h = (await client.get("/health")).json()
            seen["max_live"] = max(seen["max_live"], h.get("live", 0))
            seen["max_waiting"] = max(seen["max_waiting"], h.get("waiting", 0))
        except httpx.HTTPError:
            pass
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def server_run(base: str, pid: int, endpoint: str, bodies: list[dict], concurrent: bool) -> dict:
    """All the requests, in turn or all at once; the wall time covers the whole mode."""
    n = len(bodies)
    limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client, \
            httpx.AsyncClient(base_url=base, timeout=10) as health:
        # Open the connections before the clock starts (a client keeps its connection).
        await asyncio.gather(*(client.get("/health") for _ in range(n)))
        seen, stop = {"max_live": 0, "max_waiting": 0}, asyncio.Event()
        h0 = (await health.get("/health")).json()
        poller = asyncio.create_task(poll_health(health, seen, stop))
        m = Meter(pid)
        if concurrent:
            res = await asyncio.gather(*(one_request(client, endpoint, b) for b in bodies))
        else:
            res = [await one_request(client, endpoint, b) for b in bodies]
        meter = m.stop()
        stop.set()
        await poller
        h1 = (await health.get("/health")).json()
    if isinstance(h0.get("steps"), int) and isinstance(h1.get("tokens"), int):
        # Where /health reports the batcher's counters: decode steps and tokens in this run.
        seen["steps"], seen["step_tokens"] = h1["steps"] - h0["steps"], h1["tokens"] - h0["tokens"]
        if "prefill_forwards" in h1:  # batched prefill: forwards per prompt
            seen["prefill_forwards"] = h1["prefill_forwards"] - h0["prefill_forwards"]
    return dict(results=res, **meter, **seen)


def load_engine(model_dir: str, dtype: str, device: str = "auto"):
    """The model and tokenizer as the server loads them (load_model_and_tokenizer + for_inference)."""
    from lmstack.device import pick_device
    from lmstack.engine import for_inference
    from lmstack.modelio import load_model_and_tokenizer

    net, tok = load_model_and_tokenizer(model_dir, pick_device(device))
    params = net.num_params()  # before packing (packed weights are no longer parameters)
    return for_inference(net, dtype), tok, params


def engine_prompts(tok, endpoint: str, prompts: list[str]) -> tuple[list[list[int]], frozenset]:
    """Token ids and stop ids exactly as the server builds them for this endpoint."""
    from lmstack.chatformat import chat_format

    if endpoint != "completions":
        fmt = chat_format(tok)
        ids = [fmt.render(messages(endpoint, p), add_generation_prompt=True)[0] for p in prompts]
        return ids, fmt.stop_ids
    return [[tok.bos_id] + tok.encode(p) for p in prompts], frozenset({tok.eos_id, tok.bos_id})


def engine_run(model, tok, ids: list[list[int]], stops, max_tokens: int, batched: bool) -> dict:
    from lmstack.engine import generate_batch

    kw = dict(temperature=1.0, stop_ids=stops, tokenizer=tok)
    m = Meter(None)
    if batched:
        t0 = time.perf_counter()
        comps = generate_batch(model, ids, max_tokens, seed=SEED, **kw)
        lat = [time.perf_counter() - t0] * len(ids)  # every row returns when the batch ends
    else:
        comps, lat = [], []
        for i, p in enumerate(ids):
            t0 = time.perf_counter()
            comps += generate_batch(model, [p], max_tokens, seed=SEED + i, **kw)
            lat.append(time.perf_counter() - t0)
    meter = m.stop()
    res = [dict(latency=l, ttft=None, tokens=len(c.ids), finish=c.finish_reason) for c, l in zip(comps, lat)]
    # In-process: this process's CPU is the engine's.
    return dict(results=res, wall=meter["wall"], client_cpu=0.0, server_cpu=meter["client_cpu"],
                other_cores=meter["other_cores"], max_live=len(ids) if batched else 1, max_waiting=0)


def batcher_run(b, ids: list[list[int]], stops, max_tokens: int, concurrent: bool) -> dict:
    """The server's scheduler in-process, no HTTP: a started lmstack.serve.batcher.Batcher `b`
    (its own copy of the model: it keeps its KV cache, and its prefix cache, from run to run, as
    the server does) fed the same requests, all at once or one after another; TTFT = the first
    token's event."""
    import threading

    from lmstack.serve.batcher import GenRequest

    def submit(i: int, p: list[int]) -> dict:
        rec = dict(t0=time.perf_counter(), ttft=None, tokens=0, finish=None, done=threading.Event())

        def on_event(e):
            if isinstance(e, tuple):  # ("prompt", ...) is never asked for here: an error
                rec.update(finish="error", latency=time.perf_counter() - rec["t0"])
                rec["done"].set()
                return
            if e.token is not None:
                rec["tokens"] += 1
                if rec["ttft"] is None:
                    rec["ttft"] = time.perf_counter() - rec["t0"]
            if e.finish_reason is not None:
                rec.update(finish=e.finish_reason, latency=time.perf_counter() - rec["t0"])
                rec["done"].set()
        b.submit(GenRequest(prompt=p, max_tokens=max_tokens, temperature=1.0, seed=SEED + i, stop_ids=stops,
                            on_event=on_event))
        return rec

    m = Meter(None)
    if concurrent:
        recs = [submit(i, p) for i, p in enumerate(ids)]
        for r in recs:
            r["done"].wait()
    else:
        recs = []
        for i, p in enumerate(ids):
            recs.append(submit(i, p))
            recs[-1]["done"].wait()
    meter = m.stop()
    if any(r["finish"] == "error" for r in recs):
        raise RuntimeError("a request failed in the in-process batcher")
    res = [dict(latency=r["latency"], ttft=r["ttft"], tokens=r["tokens"], finish=r["finish"]) for r in recs]
    return dict(results=res, wall=meter["wall"], client_cpu=0.0, server_cpu=meter["client_cpu"],
                other_cores=meter["other_cores"], max_live=min(len(ids), b.slots) if concurrent else 1, max_waiting=0)


# --- the benchmark -----------------------------------------------------------------------------

def summarize(runs: list[dict]) -> dict:
    """Median repeat by tok/s; latencies pooled over the repeats."""
    for r in runs:
        r["tokens"] = sum(x["tokens"] for x in r["results"])
        r["tok_s"] = r["tokens"] / r["wall"]
    med = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
    lat = [x["latency"] for r in runs for x in r["results"]]
    ttft = [x["ttft"] for r in runs for x in r["results"] if x["ttft"] is not None]
    out = dict(tok_s=round(statistics.median(r["tok_s"] for r in runs), 1),
               tok_s_runs=[round(r["tok_s"], 1) for r in runs],
               tokens=med["tokens"], tokens_per_request=[x["tokens"] for x in med["results"]],
               stopped_early=sum(x["finish"] != "length" for x in med["results"]),
               wall_s=round(med["wall"], 3),
               p50_ms=round(pct(lat, 50) * 1e3, 1), p99_ms=round(pct(lat, 99) * 1e3, 1),
               server_cpu_s=round(med["server_cpu"], 3), client_cpu_s=round(med["client_cpu"], 3),
               tok_per_server_cpu_s=round(med["tokens"] / med["server_cpu"], 1) if med["server_cpu"] > 0 else None,
               other_cores=round(med["other_cores"], 2), max_live=max(r["max_live"] for r in runs),
               max_waiting=max(r["max_waiting"] for r in runs))
    if med.get("steps"):
        out.update(decode_steps=med["steps"], mean_rows_per_step=round(med["step_tokens"] / med["steps"], 2))
        if "prefill_forwards" in med:
            out["prefill_forwards"] = med["prefill_forwards"]
    if ttft:
        out.update(ttft_p50_ms=round(pct(ttft, 50) * 1e3, 1), ttft_p99_ms=round(pct(ttft, 99) * 1e3, 1))
    return out


def bench_endpoint(servers: list[dict], endpoint: str, args, engine) -> dict:
    """Every mode on every server (and the in-process peers), alternating within each repeat, so
    a burst of load elsewhere hits all of them alike. `servers`: dicts of label, url, pid, name."""
    prompts = (TEXT_PROMPTS if endpoint == "completions" else CHAT_PROMPTS)
    prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
    modes = {"sequential": (False, False), "concurrent": (True, False)}
    if args.stream:
        modes.update({"seq-stream": (False, True), "conc-stream": (True, True)})
    peer, ids = None, None
    with contextlib.ExitStack() as stack:
        if engine is not None:
            from lmstack.serve.batcher import Batcher

            model, tok, _, model2 = engine
            ids, stops = engine_prompts(tok, endpoint, prompts)
            b = Batcher(model2, tok, args.slots).start()
            stack.callback(b.close)
            peer = {"static-batch": lambda: engine_run(model, tok, ids, stops, args.max_tokens, True),
                    "engine-seq": lambda: engine_run(model, tok, ids, stops, args.max_tokens, False),
                    "batcher-seq": lambda: batcher_run(b, ids, stops, args.max_tokens, False),
                    "batcher-burst": lambda: batcher_run(b, ids, stops, args.max_tokens, True)}
        return _bench_endpoint(servers, endpoint, args, prompts, modes, peer, ids)


def _bench_endpoint(servers, endpoint, args, prompts, modes, peer, ids) -> dict:

    def server_mode(sv: dict, concurrent: bool, stream: bool) -> dict:
        bodies = [request_body(endpoint, sv["name"], p, i, args.max_tokens, stream) for i, p in enumerate(prompts)]
        return asyncio.run(server_run(sv["url"], sv["pid"], endpoint, bodies, concurrent))

    def key(sv: dict, mode: str) -> str:
        return f"{sv['label']} {mode}" if sv["label"] else mode

    pc0 = {sv["label"]: httpx.get(sv["url"] + "/health", timeout=10).json().get("prefix_cache") for sv in servers}
    # Warm-up: every mode once (the server's first requests, the engine's first batch).
    for sv in servers:
        for conc, stream in modes.values():
            server_mode(sv, conc, stream)
    for run in (peer or {}).values():
        run()
    runs = {k: [] for k in [*(key(sv, m) for sv in servers for m in modes), *(peer or {})]}
    for rep in range(args.repeats):
        for sv in servers:
            for m, (conc, stream) in modes.items():
                runs[key(sv, m)].append(server_mode(sv, conc, stream))
        for k, run in (peer or {}).items():
            runs[k].append(run())
        print(f"  [{endpoint}] repeat {rep + 1}/{args.repeats}: "
              + ", ".join(f"{k} {sum(x['tokens'] for x in v[-1]['results']) / v[-1]['wall']:.0f}"
                          for k, v in runs.items()) + f" tok/s | load {load()}", flush=True)
    res = {k: summarize(v) for k, v in runs.items()}
    ratios = {}
    for sv in servers:
        c, q = res[key(sv, "concurrent")], res[key(sv, "sequential")]
        ratios[key(sv, "concurrent/sequential")] = c["tok_s"] / q["tok_s"]
        if c["tok_per_server_cpu_s"] and q["tok_per_server_cpu_s"]:
            ratios[key(sv, "per server CPU-s concurrent/sequential")] = c["tok_per_server_cpu_s"] / q["tok_per_server_cpu_s"]
        if args.stream:
            cs, qs = res[key(sv, "conc-stream")], res[key(sv, "seq-stream")]
            ratios[key(sv, "conc-stream/seq-stream")] = cs["tok_s"] / qs["tok_s"]
            # the TTFT aim: under N clients (p99) against a lone request's (p50 of the sequential ones)
            ratios[key(sv, "TTFT conc p99/seq p50")] = cs["ttft_p99_ms"] / qs["ttft_p50_ms"]
    for sv in servers[1:]:  # each server against the first, mode by mode
        for m in modes:
            ratios[f"{key(sv, m)}/{key(servers[0], m)}"] = res[key(sv, m)]["tok_s"] / res[key(servers[0], m)]["tok_s"]
    if peer:
        first = servers[0]
        ratios[key(first, "concurrent") + "/static-batch"] = res[key(first, "concurrent")]["tok_s"] / res["static-batch"]["tok_s"]
        ratios["static-batch/engine-seq"] = res["static-batch"]["tok_s"] / res["engine-seq"]["tok_s"]
        ratios["batcher-burst/batcher-seq"] = res["batcher-burst"]["tok_s"] / res["batcher-seq"]["tok_s"]
        ratios["TTFT batcher-burst p99/batcher-seq p50"] = (res["batcher-burst"]["ttft_p99_ms"]
                                                         / res["batcher-seq"]["ttft_p50_ms"])
    ratios = {k: round(v, 2) for k, v in ratios.items()}

    sizes = f"; prompts {min(map(len, ids))}-{max(map(len, ids))} tokens" if ids else ""
    print(f"\n== {endpoint}: {args.requests} requests x max_tokens {args.max_tokens}, temperature 1.0, seeds "
          f"{SEED}.., slots {args.slots}{sizes}; median of {args.repeats} (latencies pooled) | load {load()}")
    w = max(13, *map(len, res))
    print(f"{'mode':{w}s} {'tok/s':>8s} {'tokens':>7s} {'early':>5s} {'wall s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'TTFT p50/p99 ms':>16s} {'tok/srvCPU-s':>12s} {'cli CPU s':>9s} {'other':>6s} {'live':>4s} {'wait':>4s}")
    for k, r in res.items():
        tt = f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        per_cpu = f"{r['tok_per_server_cpu_s']:.0f}" if r["tok_per_server_cpu_s"] else "-"
        print(f"{k:{w}s} {r['tok_s']:8.1f} {r['tokens']:7d} {r['stopped_early']:5d} {r['wall_s']:7.2f} "
              f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {tt:>16s} {per_cpu:>12s} {r['client_cpu_s']:9.2f} "
              f"{r['other_cores']:6.2f} {r['max_live']:4d} {r['max_waiting']:4d}")
    shown = {key(servers[0], "sequential"), key(servers[0], "concurrent"), "static-batch"}
    print("tokens per request (median repeat): "
          + "; ".join(f"{k} {r['tokens_per_request']}" for k, r in res.items() if k in shown))
    steps = {k: r for k, r in res.items() if "decode_steps" in r}
    if steps:
        print("batcher (/health counters): " + "; ".join(
            f"{k} {r['decode_steps']} steps, {r['mean_rows_per_step']} rows/step"
            + (f", {r['prefill_forwards']} prefill forwards" if "prefill_forwards" in r else "")
            for k, r in steps.items()))
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
    for sv in servers:
        pc = httpx.get(sv["url"] + "/health", timeout=10).json().get("prefix_cache")
        if isinstance(pc, dict) and pc0[sv["label"]]:
            d = {k: pc[k] - pc0[sv["label"]][k] for k in ("hits", "lookups", "hit_tokens")}
            print(f"{sv['label'] or 'server'}: prefix cache (/health, this endpoint, warm-up included): {d['hits']} "
                  f"hits in {d['lookups']} lookups, {d['hit_tokens']} prompt tokens copied instead of prefilled; "
                  f"{pc['blocks']} blocks, {pc['bytes'] / 2**20:.2f} MiB held", flush=True)
    return dict(endpoint=endpoint, modes=res, ratios=ratios, loadavg=load())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/small/chat")
    ap.add_argument("--requests", type=int, default=16, help="requests per mode (= concurrent clients)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--slots", type=int, default=16, help="passed to `lmstack serve --slots`")
    ap.add_argument("--endpoint", choices=["chat", "completions", "assistant", "both"], default="both",
                    help="both = completions and chat; assistant = chat after a shared long system prompt")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads, server (OMP_NUM_THREADS) and in-process peer (0 = torch's default)")
    ap.add_argument("--dtype", default="auto", help="passed to `lmstack serve --dtype` (and used by the peer)")
    ap.add_argument("--no-stream", dest="stream", action="store_false", help="skip the streaming (TTFT) modes")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip the in-process engine peer")
    ap.add_argument("--prefix-cache-mb", default="",
                    help="comma-separated values: one server per value, with `--prefix-cache-mb V` (default: none)")
    ap.add_argument("--src", default="",
                    help="comma-separated lmstack checkouts: one server from each (PYTHONPATH), interleaved; "
                         "e.g. --src /work/main,. for before and after (default: the lmstack this runs)")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        ap.error(f"--model {args.model}: no such folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _sigterm)
    import fastapi
    import uvicorn

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads (server: "
          f"{args.threads or 'default'}), fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, httpx "
          f"{httpx.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, load {load()}", flush=True)
    # the engine's model, and a copy for the in-process batcher (each keeps its own KV cache)
    engine = (*load_engine(args.model, args.dtype), load_engine(args.model, args.dtype)[0]) if args.peer else None
    if engine is not None:
        m = engine[0]
        print(f"model {args.model}: {engine[2] / 1e6:.1f}M params, context {m.cfg.max_seq_len}, "
              f"{next(m.parameters()).dtype}", flush=True)
    out = []
    server_args = ["--slots", args.slots, "--dtype", args.dtype]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None  # torch's intra-op threads
    # one server per checkout (--src) and per prefix-cache size, all up at once (an idle server
    # sleeps), so that every repeat runs every mode on each
    configs = [(src, ["--prefix-cache-mb", v] if v else []) for src in (args.src.split(",") if args.src else [None])
               for v in (args.prefix_cache_mb.split(",") if args.prefix_cache_mb else [None])]
    with contextlib.ExitStack() as stack:
        servers = []
        for src, extra in configs:
            server = stack.enter_context(running_server(args.model, server_args + extra, src=src, env=threads))
            label = " ".join(x for x in ((f"[{Path(src).resolve().name}]" if src and len(configs) > 1 else ""),
                                         (f"[cache {extra[1]} MiB]" if extra and args.prefix_cache_mb.count(",") else ""))
                             if x)
            servers.append(dict(label=label, url=server.url, pid=server.proc.pid,
                                name=httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]))
        for ep in (["completions", "chat"] if args.endpoint == "both" else [args.endpoint]):
            out.append(bench_endpoint(servers, ep, args, engine))
    emit(dict(bench="serve_throughput", model=args.model, requests=args.requests,
              max_tokens=args.max_tokens, repeats=args.repeats, slots=args.slots, dtype=args.dtype,
              torch=torch.__version__, threads=torch.get_num_threads(),
              server_threads=args.threads or "default", cpus=os.cpu_count(), results=out,
              loadavg=load()), args.json)


if __name__ == "__main__":
    main()
