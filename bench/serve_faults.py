"""What a fault costs the server: a locked feedback database, a request with an out-of-range seed,
and eight concurrent ~1 MB prompts, each against a live `lmstack serve` (a subprocess, with the
defaults a user gets: 5 s busy timeout, 1 MiB body limit).

    cd bench && ../.venv/bin/python serve_faults.py [--model runs/small/chat] [--json FILE] [--src DIR]

- database lock: another connection holds SQLite's write lock for 7 s (past the busy timeout);
  meanwhile a web-app write (POST /api/conversations), 8 chat completions and /health are sent.
  Printed: each one's status and latency, /health's database state, and a write after the lock.
- seed: 18 ordinary chat completions sent together with one whose seed is 2**64. Printed: the
  bad one's status, how many of the 18 succeeded.
- huge prompts: 8 concurrent chat requests of ~1 MB each (all to be refused: the context is
  far shorter), while /health is polled. Printed: their statuses and /health's latency (p50, max).

Without --model, a tiny random model is made in a temporary folder (the faults do not depend on
what the model says). --src DIR runs the server from another checkout of lmstack (the peer: e.g.
`git worktree add /tmp/before 1ccb017`, the code before the hardening) with the same probe.
A measurement, not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import emit, load  # bench/common.py (scripts run from bench/)

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODEL = "m"  # the served model's name: set from /v1/models


def chat_body(content: str, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


async def timed(coro):
    t0 = time.monotonic()
    r = await coro
    return r.status_code, round(1000 * (time.monotonic() - t0), 1)


async def database_lock(client: httpx.AsyncClient, db: Path) -> dict:
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    t_lock = time.monotonic()
    try:
        write = asyncio.create_task(timed(client.post("/api/conversations", json={"messages": [
            {"role": "user", "content": "Hi"}]})))
        chats = [asyncio.create_task(timed(client.post("/v1/chat/completions", json=chat_body("Hi"))))
                 for _ in range(8)]
        chat_results = await asyncio.gather(*chats)
        health = await timed(client.get("/health"))
        write_result = await write
        state = (await client.get("/health")).json()
        await asyncio.sleep(max(0.0, 7 - (time.monotonic() - t_lock)))
    finally:
        other.execute("ROLLBACK")
        other.close()
    after = await timed(client.post("/api/conversations", json={"messages": [{"role": "user", "content": "Hi"}]}))
    return {"write_during_lock": write_result, "chats_during_lock": chat_results, "health_during_lock": health,
            "health_status": state["status"], "health_database": state["database"], "write_after_lock": after}


async def bad_seed(client: httpx.AsyncClient) -> dict:
    good = [asyncio.create_task(client.post("/v1/chat/completions", json=chat_body("Hello", seed=i)))
            for i in range(18)]
    bad = await client.post("/v1/chat/completions", json=chat_body("Hello", seed=2 ** 64))
    codes = [r.status_code for r in await asyncio.gather(*good)]
    return {"bad_seed_status": bad.status_code, "bad_seed_param": bad.json()["error"]["param"],
            "innocent_ok": sum(c == 200 for c in codes), "innocent": len(codes)}


async def huge_prompts(client: httpx.AsyncClient) -> dict:
    body = chat_body("word " * 200_000)  # ~1 MB of JSON, under the 1 MiB body limit
    big = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(8)]
    health = []
    while not all(t.done() for t in big):
        health.append((await timed(client.get("/health")))[1])
    codes = [t.result().status_code for t in big]
    return {"huge_prompt_statuses": codes, "health_ms_p50": statistics.median(health) if health else None,
            "health_ms_max": max(health) if health else None, "health_polls": len(health)}


async def probe(url: str, db: Path) -> dict:
    global MODEL
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        MODEL = (await client.get("/v1/models")).json()["data"][0]["id"]
        return {**await database_lock(client, db), **await bad_seed(client), **await huge_prompts(client)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: a tiny random one)")
    ap.add_argument("--json", help="append the result line to this file")
    ap.add_argument("--src", help="run the server from this lmstack checkout (default: this one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(a.model) if a.model else tiny_model(tmp)
        db, port = tmp / "feedback.sqlite", free_port()
        env = {**os.environ, "PYTHONPATH": str(Path(a.src).resolve())} if a.src else None
        server = subprocess.Popen([sys.executable, "-m", "lmstack", "serve", "--model", str(model), "--port", str(port),
                                   "--db", str(db)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            result = asyncio.run(probe(url, db))
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
                stopped = True
            except subprocess.TimeoutExpired:
                server.kill()
                stopped = False
    result.update(model=str(a.model or "tiny random"), server_src=a.src or "this checkout", stopped_on_sigterm=stopped, load=load())
    for k, v in result.items():
        print(f"{k:24s} {v}")
    emit(result, a.json)


if __name__ == "__main__":
    main()
