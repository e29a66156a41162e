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

from lmstack.utils import UserError


def build(model_dir, api_key=None, db_path="feedback.sqlite", slots: int = 16, dtype: str = "auto",
          device: str = "auto", limits=None, label_prompts=None, name: str | None = None):
    """The FastAPI app for a model folder (not started)."""
    from lmstack import distributed
    from lmstack.engine import for_inference
    from lmstack.serve.api import Limits, Server, create_app
    from lmstack.serve.db import FeedbackDB
    from lmstack.tokenizer import Tokenizer
    from lmstack.train import checkpoint

    if slots < 1:
        raise UserError("--slots must be >= 1")
    net = checkpoint.load_model(model_dir, distributed.pick_device(device))
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size > net.cfg.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model only {net.cfg.vocab_size}")
    db = FeedbackDB(db_path) if db_path else None
    if db is not None and label_prompts:
        added = load_label_prompts(db, label_prompts)
        print(f"labelling queue: {added} new prompts from {label_prompts}")
    server = Server(for_inference(net, dtype), tok, name or Path(model_dir).resolve().name, api_key=api_key,
                    db=db, limits=limits or Limits(), slots=slots)
    return create_app(server)


def load_label_prompts(db, path) -> int:
    """Queue the prompts of a jsonl file ({"prompt": text} or {"messages": [...]}) for labelling;
    prompts already queued are skipped. Returns how many were added."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"--label-prompts {path}: {e.strerror}") from None
    have = {json.dumps(json.loads(r["messages"])) for r in db._q("SELECT messages FROM label_queue")}
    added = 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path} line {i} is not valid JSON") from None
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            msgs = row["messages"]
            if msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]  # an SFT row: its prompt is what comes before the reply
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise UserError(f"{path} line {i}: expected {{\"prompt\": text}} or {{\"messages\": [...]}}")
        if json.dumps(msgs) not in have:
            db.enqueue(msgs, "file")
            have.add(json.dumps(msgs))
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
    import torch
    import uvicorn

    # On a CPU, leave a core to the event loop (HTTP, tokenizing, streaming): measured on 2 cores
    # (bench/serve_throughput.py), torch on both cores fought the event loop for them and served
    # about half the tokens per CPU-second.
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
