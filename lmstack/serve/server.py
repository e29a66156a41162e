"""`lmstack serve`: load a model folder, build the API + web app, run it with uvicorn.

    lmstack serve --model runs/speedrun/chat                 # http://127.0.0.1:8000/app
    lmstack serve --model M --host 0.0.0.0 --api-key KEY     # reachable from other machines
    lmstack serve --model M --db feedback.sqlite --label-prompts prompts.jsonl
    lmstack serve --model assistants/helper                  # an assistant (and its model)
    lmstack serve --model M --assistant A1 --assistant A2 --tools calculator,search

--model is a model folder or an assistant folder (lmstack/assistant.py); each assistant (that one,
and every --assistant, all on the same model folder: they share its weights and its batcher) is
served as its own model id beside the model's. --tools names the tools the server may run: the web
app's tool route, and each assistant's tool loop (default: all of them).

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

from lmstack.assistant import Assistant, is_assistant
from lmstack.assistant import load as load_assistant
from lmstack.chatformat import ChatFormatError, chat_format, row_prompt
from lmstack.device import pick_device
from lmstack.engine import for_inference
from lmstack.modelio import load_model_and_tokenizer
from lmstack.serve.api import create_app
from lmstack.serve.db import FeedbackDB
from lmstack.serve.generation import Server, ServedAssistant
from lmstack.serve.protocol import Limits
from lmstack.serve.webapp import add_webapp
from lmstack.tools import default_registry
from lmstack.utils import UserError, read_jsonl

SEARCH = "search"  # an assistant's search over its knowledge (not in the default registry: it needs an index)


def build(model_dir, api_key=None, db_path="feedback.sqlite", slots: int = 16, dtype: str = "auto",
          device: str = "auto", limits=None, label_prompts=None, name: str | None = None, db_timeout: float = 5.0,
          assistants=(), tools: str | None = None, guard=None, prefix_cache_mb: float = 64):
    """The FastAPI app for a model folder or an assistant folder (not started): the API and the
    web app. db_path: the feedback database (created if missing; None or "" for none);
    db_timeout: seconds a write waits for another writer's lock before its request gets a 503;
    assistants: assistant folders served beside the model (on the same model folder); tools:
    the tools the server may run, comma-separated (None: all); guard: a defence of untrusted text
    (Server's); prefix_cache_mb: the bound of the prefix cache (0: none)."""
    if slots < 1:
        raise UserError("--slots must be >= 1")
    if label_prompts and not db_path:
        raise UserError("--label-prompts needs a feedback database (--db FILE)")
    allowed = tool_names(tools)
    opens = is_assistant(model_dir)  # --model ASSISTANT: the web app opens with it
    model_dir, served = load_assistants(model_dir, assistants)
    name = name or Path(model_dir).resolve().name
    ids = [name] + [a.name for a in served]
    taken = sorted({i for i in ids if ids.count(i) > 1})
    if taken:
        raise UserError(f"model id {taken[0]!r} is served twice (the model folder's name and each assistant's "
                        "name are model ids; rename an assistant with lmstack assistant create --name)")
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
    server = make_server(for_inference(net, dtype), tok, name, served, allowed, served[0].name if opens else None,
                         api_key=api_key, db=db, limits=limits or Limits(), slots=slots, guard=guard,
                         prefix_cache_mb=prefix_cache_mb)
    return app_for(server)


def make_server(net, tok, name: str, assistants=(), tools=None, default: str | None = None, **kw) -> Server:
    """The Server of a loaded model: the web app may run the tools named in `tools` (None: all),
    each assistant (loaded, on this model) its own within them; `default`: the id the web app
    starts with (None: the model's); `kw`: the rest of Server's settings."""
    tools = tool_names(None) if tools is None else list(tools)
    fmt = chat_format(tok)
    return Server(net, tok, name, tools=default_registry().subset([t for t in tools if t != SEARCH]),
                  assistants=[ServedAssistant.of(a, tools, fmt) for a in assistants], default=default, **kw)


def app_for(server: Server):
    """The FastAPI app of a server: the API and the web app beside it."""
    app = create_app(server)
    add_webapp(app, server)
    return app


def tool_names(spec: str | None) -> list[str]:
    """--tools: comma-separated tool names -> the names (None: every tool; '' none); an unknown
    name is a one-line error."""
    known = default_registry().names() + [SEARCH]
    if spec is None:
        return known
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if unknown:
        raise UserError(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    return names


def load_assistants(model_dir, folders=()) -> tuple[Path, list[Assistant]]:
    """--model (a model folder, or an assistant folder: then its model is served, and it beside)
    and --assistant folders -> (the model folder, the assistants); each assistant must run on
    that model folder (one server holds one model's weights)."""
    folders = list(folders)
    if is_assistant(model_dir):
        folders.insert(0, model_dir)
        model_dir = load_assistant(model_dir).model
    model = Path(model_dir).resolve()
    out = []
    for f in folders:
        a = load_assistant(f)
        if a.model.resolve() != model:
            raise UserError(f"--assistant {f} runs on the model {a.model}, not on {model}: the assistants of one "
                            "server share its model (serve the other model on another port)")
        out.append(a)
    return Path(model_dir), out


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
          label_prompts=None, limits=None, threads: int | None = None, assistants=(), tools: str | None = None,
          guard=None, prefix_cache_mb: float = 64) -> None:
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
    app = build(model_dir, api_key, db_path, slots, dtype, device, limits, label_prompts, assistants=assistants,
                tools=tools, guard=guard, prefix_cache_mb=prefix_cache_mb)
    if not is_loopback(host) and not api_key:
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use it")
    server = app.state.server
    print(f"lmstack serve: {server.name} on http://{host}:{port}  (web app: /app, OpenAI API: /v1; "
          f"tools: {', '.join(server.tools.names()) or 'none'}"
          f"{'; untrusted text guarded by ' + type(guard).__name__ if guard is not None else ''})", flush=True)
    for a in server.assistants.values():
        print(f"  assistant {a.name} (tools: {', '.join(a.tools.names()) if a.tools else 'none'}; knowledge: "
              f"{'looked up for every user message' if a.finder else 'none'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
