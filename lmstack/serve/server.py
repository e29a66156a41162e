"""`lmstack serve`: load a model folder, build the API + web app, run it with uvicorn.

    lmstack serve --model runs/speedrun/chat                 # http://127.0.0.1:8000/app
    lmstack serve --model M --host 0.0.0.0 --api-key KEY     # reachable from other machines
    lmstack serve --model M --db feedback.sqlite --label-prompts prompts.jsonl

It binds the loopback address unless --host says otherwise; with --api-key (or the
LMSTACK_API_KEY environment variable) every endpoint but /health and the app's page needs
`Authorization: Bearer KEY`.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path

import torch
import uvicorn

from lmstack.chatformat import ChatFormatError, row_prompt
from lmstack.device import pick_device
from lmstack.engine import for_inference
from lmstack.modelio import load_model_and_tokenizer
from lmstack.serve.api import create_app
from lmstack.serve.db import FeedbackDB
from lmstack.serve.generation import Server
from lmstack.serve.protocol import Limits
from lmstack.serve.webapp import add_webapp
from lmstack.utils import UserError, read_jsonl


def build(model_dir, api_key=None, db_path="feedback.sqlite", slots: int = 16, dtype: str = "auto",
          device: str = "auto", limits=None, label_prompts=None, name: str | None = None, db_timeout: float = 5.0):
    """The FastAPI app for a model folder (not started): the API and the web app. db_path: the
    feedback database (created if missing; None or "" for none); db_timeout: seconds a write
    waits for another writer's lock before its request gets a 503."""
    if slots < 1:
        raise UserError("--slots must be >= 1")
    if label_prompts and not db_path:
        raise UserError("--label-prompts needs a feedback database (--db FILE)")
    net, tok = load_model_and_tokenizer(model_dir, pick_device(device))
    db = None
    if db_path:
        path = Path(db_path).resolve()
        existed = path.exists()
        db = FeedbackDB(path, timeout=db_timeout)
        print(f"feedback database: {path}" + ("" if existed else " (new)"), flush=True)
    if label_prompts:
        added = load_label_prompts(db, label_prompts)
        print(f"labelling queue: {added} new prompts from {label_prompts}")
    server = Server(for_inference(net, dtype), tok, name or Path(model_dir).resolve().name, api_key=api_key,
                    db=db, limits=limits or Limits(), slots=slots)
    app = create_app(server)
    add_webapp(app, server)
    return app


def load_label_prompts(db, path) -> int:
    """Queue the prompts of a jsonl file ({"prompt"}, {"messages"}: an SFT row's reply is left
    out, {"question"}) for labelling; prompts already queued are skipped. Returns how many
    were added."""
    have = {json.dumps(m) for m in db.queued_prompts()}
    added = 0
    for n, row in read_jsonl(path, "--label-prompts file"):
        try:
            msgs = row_prompt(row)
        except ChatFormatError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        key = json.dumps(msgs)
        if key not in have:
            db.enqueue(msgs, "file")
            have.add(key)
            added += 1
    return added


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_dir, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          db_path: str | None = "feedback.sqlite", slots: int = 16, dtype: str = "auto", device: str = "auto",
          label_prompts=None, limits=None, threads: int | None = None) -> None:
    # On a CPU, leave a core to the event loop (HTTP, tokenizing, streaming): torch threads on
    # every core fight it for them and serve fewer tokens per CPU-second (bench/README.md).
    if threads is None and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) - 1)
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(threads)

    api_key = api_key or os.environ.get("LMSTACK_API_KEY") or None
    if not 0 < port < 65536:
        raise UserError(f"--port must be 1..65535, got {port}")
    app = build(model_dir, api_key, db_path, slots, dtype, device, limits, label_prompts)
    if not is_loopback(host) and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use it")
    print(f"lmstack serve: {app.state.server.name} on http://{host}:{port}  (web app: /app, OpenAI API: /v1)",
          flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
