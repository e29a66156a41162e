"""What a fault costs the server: a locked feedback database, a request with an out-of-range seed,
and eight concurrent ~1 MB prompts, each against a fresh live `lmstack serve` (a subprocess, with
the defaults a user gets: 5 s busy timeout, 1 MiB body limit), stopped with SIGTERM after it
(printed: whether it stopped within 20 s). A request unanswered in 30 s counts as "timeout".

    .venv/bin/python bench/serve_faults.py [--model runs/small/chat] [--json FILE] [--src DIR]

- database lock: another connection holds SQLite's write lock for 7 s (past the busy timeout);
  meanwhile a web-app write (POST /api/conversations), 8 chat completions and /health are sent.
  Printed: each one's status and latency, /health's database state, and a write after the lock.
- seed: 18 ordinary chat completions (64 tokens each) and, while they decode, one whose seed is
  2**64. Printed: the bad one's status, how many of the 18 succeeded.
- huge prompts: 8 concurrent chat requests of ~1 MB each (all to be refused: the context is
  far shorter), while /health is polled. Printed: their statuses and /health's latency (p50, max),
  and its p50 on the quiet server before them.

Without --model, a tiny random model is made in a temporary folder (the faults do not depend on
what the model says). --src DIR runs the server from another checkout of lmstack (the peer: e.g.
`git worktree add /tmp/before 1ccb017`, the code before the hardening) with the same probe.
A measurement, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import emit, load, running_server  # bench/common.py (this script's folder is on sys.path)

from lmstack.config import ModelConfig
from lmstack.model import GPT
from lmstack.modelio import save_weights
from lmstack.tokenizer import train_tokenizer
from lmstack.utils import atomic_write_json


def tiny_model(folder: Path) -> Path:
    (folder / "a.txt").write_text("Ana was born in Paris and Bo works at Acme in Rome. Hello there.\n" * 40)
    tok = train_tokenizer([folder / "a.txt"], vocab_size=300, out=folder / "tok", progress=False)
    model_dir = folder / "m"
    model_dir.mkdir()
    tok.save(model_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=256)
    torch.manual_seed(0)
    save_weights(GPT(cfg), model_dir / "model.safetensors")
    atomic_write_json(model_dir / "config.json", dataclasses.asdict(cfg))
    return model_dir


TIMEOUT = 30.0  # seconds a probe request may take; past it the request is recorded as "timeout"


def chat_body(model: str, content: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


async def timed(coro) -> tuple:
    """(status, ms, response); status "timeout" (no answer in TIMEOUT s) or "error" (connection)."""
    t0 = time.monotonic()
    try:
        r = await coro
        status = r.status_code
    except httpx.TimeoutException:
        r, status = None, "timeout"
    except httpx.HTTPError:
        r, status = None, "error"
    return status, round(1000 * (time.monotonic() - t0), 1), r


# Each phase: (the client of a fresh server, the served model's name, its database) -> figures.

async def database_lock(client: httpx.AsyncClient, model: str, db: Path) -> dict:
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    t_lock = time.monotonic()
    try:
        write = asyncio.create_task(timed(client.post("/api/conversations", json={"messages": [
            {"role": "user", "content": "Hi"}]})))
        chats = [asyncio.create_task(timed(client.post("/v1/chat/completions", json=chat_body(model, "Hi"))))
                 for _ in range(8)]
        chat_results = [c[:2] for c in await asyncio.gather(*chats)]
        health = await timed(client.get("/health"))
        write_result = (await write)[:2]
        state = await timed(client.get("/health"))  # after the failed write
        await asyncio.sleep(max(0.0, 7 - (time.monotonic() - t_lock)))
    finally:
        other.execute("ROLLBACK")
        other.close()
    after = await timed(client.post("/api/conversations", json={"messages": [{"role": "user", "content": "Hi"}]}))
    state = state[2].json() if state[2] is not None else {}
    return {"write_during_lock": write_result, "chats_during_lock": chat_results, "health_during_lock": health[:2],
            "health_status": state.get("status"), "health_database": state.get("database"),
            "write_after_lock": after[:2]}


async def bad_seed(client: httpx.AsyncClient, model: str, db: Path) -> dict:
    bodies = [chat_body(model, "Hello", seed=i, max_tokens=64) for i in range(18)]
    good = [asyncio.create_task(timed(client.post("/v1/chat/completions", json=b))) for b in bodies]
    await asyncio.sleep(0.2)  # the 18 are decoding when the bad one comes
    bad = await timed(client.post("/v1/chat/completions", json=chat_body(model, "Hello", seed=2 ** 64)))
    codes = [c[0] for c in await asyncio.gather(*good)]
    param = bad[2].json().get("error", {}).get("param") if bad[2] is not None and bad[0] < 500 else None
    return {"bad_seed": bad[:2], "bad_seed_param": param, "innocent_ok": sum(c == 200 for c in codes),
            "innocent": len(codes), "innocent_statuses": sorted(map(str, codes))}


async def huge_prompts(client: httpx.AsyncClient, model: str, db: Path) -> dict:
    quiet = [(await timed(client.get("/health")))[1] for _ in range(20)]
    body = chat_body(model, "word " * 200_000)  # ~1 MB of JSON, under the 1 MiB body limit
    big = [asyncio.create_task(timed(client.post("/v1/chat/completions", json=body))) for _ in range(8)]
    health = []
    while not all(t.done() for t in big):
        health.append((await timed(client.get("/health")))[1])
    return {"huge_prompt_statuses": [t.result()[0] for t in big],
            "health_ms_quiet_p50": round(statistics.median(quiet), 1),
            "health_ms_p50": round(statistics.median(health), 1) if health else None,
            "health_ms_max": max(health) if health else None, "health_polls": len(health)}


def serve(model: Path, folder: Path, src: str | None, phase) -> dict:
    """Start `lmstack serve` on a fresh database, run one phase against it, stop it with SIGTERM."""
    db = folder / f"{phase.__name__}.sqlite"
    with running_server(model, db=db, src=src) as server:
        name = httpx.get(server.url + "/v1/models", timeout=5).json()["data"][0]["id"]

        async def run() -> dict:
            async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
                return await phase(client, name, db)
        result = asyncio.run(run())
    return {**result, f"{phase.__name__}_stopped_on_sigterm": server.stopped_on_sigterm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: a tiny random one)")
    ap.add_argument("--json", help="append the result line to this file")
    ap.add_argument("--src", help="run the server from this lmstack checkout (default: this one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(a.model) if a.model else tiny_model(tmp)
        result = {}
        for phase in (database_lock, bad_seed, huge_prompts):
            result.update(serve(model, tmp, a.src, phase))
    result.update(model=str(a.model or "tiny random"), server_src=a.src or "this checkout", load=load())
    for k, v in result.items():
        print(f"{k:32s} {v}")
    emit(result, a.json)


if __name__ == "__main__":
    main()
