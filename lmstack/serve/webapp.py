"""The web app (chat, label, monitor) and its JSON API, mounted on the API's FastAPI app.

    GET  /                   -> redirect to /app
    GET  /app                the single page (lmstack/serve/static/index.html; no build step, no CDN)
    GET  /static/...         its script and style sheet
    GET  /api/info           {model, models, default, max_model_len, database, label_max_tokens,
                             tools}: what the page needs to start (tools: the OpenAI specs of the
                             tools it may send with the model; models: [{id, assistant, tools}],
                             the model and each assistant served on it, for the picker; default:
                             the id it starts with, the assistant of `serve --model ASSISTANT`)
    POST /api/tools/{name}   {arguments: JSON string or object} -> {content}: run one of the
                             server's tools (`lmstack serve --tools`; default calculator, python)
                             for a tool call the model wrote; a failing call is a result "error: ..."
                             (an assistant's tools are run by the server itself, not through here)
    POST /api/conversations  {id?, model?, system?, messages} -> {id}   save (or update) a chat;
                             the messages as OpenAI has them, tool rounds included (assistant
                             messages with tool_calls, tool messages with tool_call_id); model: the
                             id it was held with (an assistant's: its instructions are saved as
                             the system message, with the page's after them, as the model saw it)
    POST /api/feedback       {conversation_id, message_index, rating: 1 | -1, comment?} -> {id}
                             thumbs down flags the conversation and queues its prompt for labelling
    GET  /api/label/next     [?after=ID: the next item after ID (skip)] -> {item: null} or
                             {item: {id, messages, source}, answers: [a, b], guide, remaining}:
                             two answers sampled from the model (temperature 1, two seeds)
    POST /api/label          {item_id, answer_a, answer_b, choice: a|b|tie|both_bad, ideal?,
                             comment?, labeller?} -> {id}
    POST /api/label/queue    {messages} or {prompt} -> {id}           add a prompt to label
    GET  /api/monitor        the database's counts, the recent flagged conversations
                             (flagged_conversations) and the batcher's load
    GET  /api/guide          {guide}: the labelling instructions (Markdown)

The page and /static load without a key; everything under /api needs the API key when the
server has one (the API's middleware checks it; the page asks for the key once and keeps it in
the browser's localStorage). Without a database (`--db ''`) the chat still works and the
feedback endpoints answer 503. Errors have OpenAI's shape, like the rest of the API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from lmstack.serve.generation import Server, sample_answers
from lmstack.serve.protocol import INT64_MAX, APIError, Nested, errors
from lmstack.serve.protocol import Body as _Body
from lmstack.world.labeller import GUIDE

STATIC = Path(__file__).parent / "static"
CHOICES = ("a", "b", "tie", "both_bad")
MAX_COMMENT = 2000  # characters in a feedback or labelling comment
MAX_TEXT = 50_000  # characters in one message, answer or ideal answer
MAX_SYSTEM = 10_000
MAX_ARGUMENTS = 10_000  # characters in a tool call's arguments (JSON)
MAX_TOOL_CALLS = 16  # per assistant message
LABEL_MAX_TOKENS = 128  # per sampled answer on the label tab
LABEL_TEMPERATURE = 1.0

# The page's security policy: everything from this server, nothing inline, no framing.
# An id or index as JSON spells it (not "5", not 5.0) and SQLite stores it (int64): else a 400.
INT64 = Annotated[int, Field(strict=True, le=INT64_MAX)]

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --- request bodies (pydantic: wrong types or unknown fields -> the API's 400) ---------------

class ToolFunction(Nested):
    name: str = Field(min_length=1, max_length=100)
    arguments: str = Field(max_length=MAX_ARGUMENTS)  # JSON, as OpenAI sends it


class ToolCall(Nested):
    id: str = Field(min_length=1, max_length=100)
    type: Literal["function"] = "function"
    function: ToolFunction


class Message(Nested):
    role: Literal["system", "user", "assistant", "tool"]  # the chat template's roles
    content: str | None = Field(max_length=MAX_TEXT)  # required; null only beside tool_calls
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)  # assistant messages
    tool_call_id: str | None = Field(None, max_length=100)  # tool messages: the call answered


class ToolBody(_Body):
    arguments: str | dict[str, Any] | None = None


class ConversationBody(_Body):
    id: INT64 | None = Field(None, ge=1)
    model: str | None = Field(None, max_length=200)  # the id the chat was held with (default: the model's)
    system: str | None = Field(None, max_length=MAX_SYSTEM)
    messages: list[Message] = Field(min_length=1)


class FeedbackBody(_Body):
    conversation_id: INT64 = Field(ge=1)
    message_index: INT64 = Field(ge=0)
    rating: int = Field(strict=True)
    comment: str | None = Field(None, max_length=MAX_COMMENT)


class LabelBody(_Body):
    item_id: INT64 = Field(ge=1)
    answer_a: str = Field(max_length=MAX_TEXT)
    answer_b: str = Field(max_length=MAX_TEXT)
    choice: str
    ideal: str | None = Field(None, max_length=MAX_TEXT)
    comment: str | None = Field(None, max_length=MAX_COMMENT)
    labeller: str | None = Field(None, max_length=100)


class QueueBody(_Body):
    messages: list[Message] | None = None
    prompt: str | None = Field(None, max_length=MAX_TEXT)


# --- helpers -------------------------------------------------------------------------------

def _db(server):
    if server.db is None:
        raise APIError(503, "this server has no feedback database (start it with `lmstack serve --db FILE`); "
                       "the chat works without one", "server_error", code="no_database")
    return server.db


async def _call(fn, *args, **kw):
    """A blocking database call in a worker thread; its KeyError -> 404, ValueError -> 400."""
    try:
        return await run_in_threadpool(fn, *args, **kw)
    except KeyError as e:
        raise APIError(404, str(e.args[0]) if e.args else "not found", code="not_found") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _messages(server, msgs: list[Message]) -> list[dict]:
    """The messages as plain dicts (fields left out stay out; content null -> ""), 400 for none
    or too many, or a tool call or a tool_call_id on the wrong role."""
    server.check_messages(msgs)
    out = []
    for i, m in enumerate(msgs):
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages carry tool_calls", param=f"messages[{i}]")
        if m.tool_call_id is not None and m.role != "tool":
            raise APIError(400, f"messages[{i}]: only tool messages carry tool_call_id", param=f"messages[{i}]")
        if m.content is None and not m.tool_calls:
            raise APIError(400, f"messages[{i}]: content must be a string (null only beside tool_calls)",
                           param=f"messages[{i}].content")
        d = m.model_dump(exclude_none=True)
        d["content"] = m.content or ""
        if not m.tool_calls:
            d.pop("tool_calls", None)
        out.append({"role": d.pop("role"), "content": d.pop("content"), **d})
    return out


def _next_item(db, after: int | None) -> tuple[dict | None, int]:
    """The first item waiting to be labelled (after `after`, wrapping round), and how many wait."""
    item = db.next_to_label(after) if after is not None else None
    return item or db.next_to_label(), db.waiting_to_label()


def _clean(text: str | None) -> str | None:
    text = (text or "").strip()
    return text or None


# --- the routes ----------------------------------------------------------------------------

def add_webapp(app: FastAPI, server: Server) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    tools = server.tools  # the tools the page may run (`lmstack serve --tools`)

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/app", status_code=307)

    @app.get("/app", include_in_schema=False)
    @app.get("/app/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @app.get("/api/info", responses=errors(401, 500))
    async def info():
        models = [{"id": server.name, "assistant": False, "tools": tools.names()}]
        models += [{"id": a.name, "assistant": True, "tools": a.tools.names() if a.tools else []}
                   for a in server.assistants.values()]
        return {"model": server.name, "models": models, "default": server.default, "max_model_len": server.ctx,
                "database": server.db is not None, "label_max_tokens": LABEL_MAX_TOKENS, "tools": tools.specs()}

    @app.post("/api/tools/{name}", responses=errors(400, 401, 404, 413, 500))
    async def run_tool(name: str, body: ToolBody):
        """Run a tool call the model wrote (the page does this, as OpenAI's protocol leaves it to
        the caller). The tool bounds its own time; it runs in a worker thread."""
        if name not in tools:
            raise APIError(404, f"no tool {name!r} on this server (tools: {', '.join(tools.names()) or 'none'})",
                           param="name", code="tool_not_found")
        args = body.arguments
        size = len(args) if isinstance(args, str) else len(json.dumps(args, ensure_ascii=False)) if args else 0
        if size > MAX_ARGUMENTS:
            raise APIError(400, f"the arguments are {size} characters; at most {MAX_ARGUMENTS}", param="arguments")
        return {"content": await run_in_threadpool(tools.call, name, args)}

    @app.get("/api/guide", responses=errors(401, 500))
    async def guide():
        return {"guide": GUIDE}

    @app.post("/api/conversations", responses=errors(400, 401, 404, 413, 500, 503))
    async def save_conversation(body: ConversationBody):
        db = _db(server)
        served = server.check_model(body.model or server.name)
        msgs = _messages(server, body.messages)
        system = _clean(body.system) if served is None else served.assistant.system(body.system)
        cid = await _call(db.save_conversation, msgs, body.model or server.name, system, body.id)
        return {"id": cid}

    @app.post("/api/feedback", responses=errors(400, 401, 404, 413, 500, 503))
    async def feedback(body: FeedbackBody):
        db = _db(server)
        if body.rating not in (1, -1):
            raise APIError(400, f"rating must be 1 (thumbs up) or -1 (thumbs down), got {body.rating}", param="rating")
        rid = await _call(db.rate, body.conversation_id, body.message_index, body.rating, _clean(body.comment))
        return {"id": rid}

    @app.get("/api/label/next", responses=errors(400, 401, 408, 500, 503))
    async def label_next(request: Request, after: int | None = Query(None, ge=0, le=INT64_MAX)):
        db = _db(server)
        item, remaining = await _call(_next_item, db, after)
        if item is None:
            return {"item": None, "answers": None, "guide": GUIDE, "remaining": 0}
        out = {"item": item, "answers": None, "guide": GUIDE, "remaining": remaining}
        try:
            out["answers"] = await sample_answers(server, item["messages"], max_tokens=LABEL_MAX_TOKENS,
                                                  temperature=LABEL_TEMPERATURE, disconnected=request.is_disconnected)
        except APIError as e:  # a prompt that cannot be answered (too long for the context, malformed)
            if e.status >= 500:
                raise
            out["error"] = f"cannot sample answers for this prompt: {e.message}. Skip it, or write the ideal answer."
        return out

    @app.post("/api/label", responses=errors(400, 401, 404, 413, 500, 503))
    async def label(body: LabelBody):
        db = _db(server)
        if body.choice not in CHOICES:
            raise APIError(400, f"choice must be one of {', '.join(CHOICES)} (got {body.choice!r})", param="choice")
        cid = await _call(db.label, body.item_id, body.answer_a, body.answer_b, body.choice, _clean(body.ideal),
                          _clean(body.labeller), _clean(body.comment))
        return {"id": cid}

    @app.post("/api/label/queue", responses=errors(400, 401, 413, 500, 503))
    async def queue(body: QueueBody):
        db = _db(server)
        if (body.messages is None) == (body.prompt is None):
            raise APIError(400, "give either messages (a list of {role, content}) or prompt (text)", param="messages")
        if body.prompt is not None:
            if not body.prompt.strip():
                raise APIError(400, "prompt must not be empty", param="prompt")
            msgs = [{"role": "user", "content": body.prompt.strip()}]
        else:
            msgs = _messages(server, body.messages)
            if msgs[-1]["role"] == "assistant":
                raise APIError(400, "a prompt to label must not end with an assistant message (the answers are "
                               "what gets labelled)", param="messages")
        await run_in_threadpool(server.chat_prompt, msgs)  # answerable: well-formed, leaves room in the context
        qid = await _call(db.enqueue, msgs, "api")
        return {"id": qid}

    @app.get("/api/monitor", responses=errors(401, 500, 503))
    async def monitor():
        db = _db(server)

        def read():
            return db.stats(), db.flagged(limit=20)

        stats, flagged = await _call(read)
        return {**stats, "flagged_conversations": flagged, "model": server.name, "load": server.batcher.load,
                "batcher": dict(server.batcher.stats)}


__all__ = ["add_webapp"]
