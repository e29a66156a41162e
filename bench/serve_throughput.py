"""Serving throughput: `lmstack serve` under 16 concurrent clients vs the same 16 requests in turn.

    .venv/bin/python bench/serve_throughput.py [--model runs/small/chat] [--requests 16]
        [--max-tokens 64] [--repeats 3] [--slots 16] [--endpoint chat|completions|both]
        [--threads N] [--dtype auto] [--no-stream] [--no-peer] [--json FILE]

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
  `engine-seq` is the same engine on one prompt at a time (the peer of `sequential`).

Workload: `--requests` different prompts (world questions and arithmetic for chat; plain-text
openings for completions), temperature 1.0 (the API's default), `max_tokens` fixed, and request
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

from common import emit, load, running_server  # bench/common.py (this script's folder is on sys.path)

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
SEED = 1000


# --- machine and process state -----------------------------------------------------------------

def _busy() -> float:
    """CPU seconds used machine-wide: all but idle and iowait (steal counts: it is lost to us)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _own() -> float:
    t = os.times()
    return t.user + t.system


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
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy(), _own()
        self.srv0 = proc_cpu(server_pid) if server_pid else 0.0

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own = _own() - self.own0
        srv = (proc_cpu(self.pid) - self.srv0) if self.pid else 0.0
        other = max(0.0, (_busy() - self.busy0) - own - srv) / wall
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
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


async def one_request(client: httpx.AsyncClient, endpoint: str, body: dict) -> dict:
    """Send one request; (latency s, TTFT s or None, completion tokens, finish_reason)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
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

    if endpoint == "chat":
        fmt = chat_format(tok)
        ids = [fmt.render([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
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
    if ttft:
        out.update(ttft_p50_ms=round(pct(ttft, 50) * 1e3, 1), ttft_p99_ms=round(pct(ttft, 99) * 1e3, 1))
    return out


def bench_endpoint(base: str, pid: int, model_name: str, endpoint: str, args, engine) -> dict:
    prompts = (CHAT_PROMPTS if endpoint == "chat" else TEXT_PROMPTS)
    prompts = [prompts[i % len(prompts)] for i in range(args.requests)]
    modes = {"sequential": (False, False), "concurrent": (True, False)}
    if args.stream:
        modes.update({"seq-stream": (False, True), "conc-stream": (True, True)})
    peer = None
    if engine is not None:
        model, tok, _ = engine
        ids, stops = engine_prompts(tok, endpoint, prompts)
        peer = {"static-batch": True, "engine-seq": False}

    def server_mode(concurrent: bool, stream: bool) -> dict:
        bodies = [request_body(endpoint, model_name, p, i, args.max_tokens, stream) for i, p in enumerate(prompts)]
        return asyncio.run(server_run(base, pid, endpoint, bodies, concurrent))

    # Warm-up: every mode once (the server's first requests, the engine's first batch).
    for conc, stream in modes.values():
        server_mode(conc, stream)
    if peer:
        for batched in peer.values():
            engine_run(model, tok, ids, stops, args.max_tokens, batched)
    runs = {k: [] for k in [*modes, *(peer or {})]}
    for rep in range(args.repeats):
        for k, (conc, stream) in modes.items():
            runs[k].append(server_mode(conc, stream))
        for k, batched in (peer or {}).items():
            runs[k].append(engine_run(model, tok, ids, stops, args.max_tokens, batched))
        print(f"  [{endpoint}] repeat {rep + 1}/{args.repeats}: "
              + ", ".join(f"{k} {sum(x['tokens'] for x in v[-1]['results']) / v[-1]['wall']:.0f}"
                          for k, v in runs.items()) + f" tok/s | load {load()}", flush=True)
    res = {k: summarize(v) for k, v in runs.items()}
    ratios = {"concurrent/sequential": res["concurrent"]["tok_s"] / res["sequential"]["tok_s"]}
    if args.stream:
        ratios["conc-stream/seq-stream"] = res["conc-stream"]["tok_s"] / res["seq-stream"]["tok_s"]
    if peer:
        ratios["concurrent/static-batch"] = res["concurrent"]["tok_s"] / res["static-batch"]["tok_s"]
        ratios["sequential/engine-seq"] = res["sequential"]["tok_s"] / res["engine-seq"]["tok_s"]
        ratios["static-batch/engine-seq"] = res["static-batch"]["tok_s"] / res["engine-seq"]["tok_s"]
    ratios = {k: round(v, 2) for k, v in ratios.items()}

    print(f"\n== {endpoint}: {args.requests} requests x max_tokens {args.max_tokens}, temperature 1.0, seeds "
          f"{SEED}.., slots {args.slots}; median of {args.repeats} (latencies pooled) | load {load()}")
    print(f"{'mode':13s} {'tok/s':>8s} {'tokens':>7s} {'early':>5s} {'wall s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'TTFT p50/p99 ms':>16s} {'tok/srvCPU-s':>12s} {'cli CPU s':>9s} {'other':>6s} {'live':>4s} {'wait':>4s}")
    for k, r in res.items():
        tt = f"{r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f}" if "ttft_p50_ms" in r else "-"
        per_cpu = f"{r['tok_per_server_cpu_s']:.0f}" if r["tok_per_server_cpu_s"] else "-"
        print(f"{k:13s} {r['tok_s']:8.1f} {r['tokens']:7d} {r['stopped_early']:5d} {r['wall_s']:7.2f} "
              f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {tt:>16s} {per_cpu:>12s} {r['client_cpu_s']:9.2f} "
              f"{r['other_cores']:6.2f} {r['max_live']:4d} {r['max_waiting']:4d}")
    shown = ("sequential", "concurrent", "static-batch")
    print("tokens per request (median repeat): "
          + "; ".join(f"{k} {r['tokens_per_request']}" for k, r in res.items() if k in shown))
    steps = {k: r for k, r in res.items() if "decode_steps" in r}
    if steps:
        print("batcher (/health counters): " + "; ".join(
            f"{k} {r['decode_steps']} steps, {r['mean_rows_per_step']} rows/step" for k, r in steps.items()))
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()), flush=True)
    return dict(endpoint=endpoint, modes=res, ratios=ratios, loadavg=load())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/small/chat")
    ap.add_argument("--requests", type=int, default=16, help="requests per mode (= concurrent clients)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--slots", type=int, default=16, help="passed to `lmstack serve --slots`")
    ap.add_argument("--endpoint", choices=["chat", "completions", "both"], default="both")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads, server (OMP_NUM_THREADS) and in-process peer (0 = torch's default)")
    ap.add_argument("--dtype", default="auto", help="passed to `lmstack serve --dtype` (and used by the peer)")
    ap.add_argument("--no-stream", dest="stream", action="store_false", help="skip the streaming (TTFT) modes")
    ap.add_argument("--no-peer", dest="peer", action="store_false", help="skip the in-process engine peer")
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
    engine = load_engine(args.model, args.dtype) if args.peer else None
    if engine is not None:
        m = engine[0]
        print(f"model {args.model}: {engine[2] / 1e6:.1f}M params, context {m.cfg.max_seq_len}, "
              f"{next(m.parameters()).dtype}", flush=True)
    out = []
    server_args = ["--slots", args.slots, "--dtype", args.dtype]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None  # torch's intra-op threads
    with running_server(args.model, server_args, env=threads) as server:
        model_name = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for ep in (["completions", "chat"] if args.endpoint == "both" else [args.endpoint]):
            out.append(bench_endpoint(server.url, server.proc.pid, model_name, ep, args, engine))
    emit(dict(bench="serve_throughput", model=args.model, requests=args.requests,
              max_tokens=args.max_tokens, repeats=args.repeats, slots=args.slots, dtype=args.dtype,
              torch=torch.__version__, threads=torch.get_num_threads(),
              server_threads=args.threads or "default", cpus=os.cpu_count(), results=out,
              loadavg=load()), args.json)


if __name__ == "__main__":
    main()
