"""The OpenAI-compatible HTTP API (FastAPI), over the continuous batcher.

    GET  /v1/models                 the model served, and each assistant served on it (its own id)
    POST /v1/chat/completions       messages -> reply (the model's chat format); stream (SSE), n, stop,
                                    seed, logprobs, tools -> tool_calls; for an assistant's id, the
                                    assistant answers and runs its own tools (`_assistant_reply`)
    POST /v1/completions            text or token-id prompts -> continuation; echo + logprobs
                                    (what `lm_eval --model local-completions` needs)
    POST /tokenize, /detokenize, GET /tokenizer_info   (lm_eval's remote tokenizer)
    GET  /health                    liveness, and the batcher's load

Every prompt starts with BOS where the model adds one (unless a token-id prompt already starts
with it); echo and
logprobs report only the caller's tokens. Errors have OpenAI's shape
{"error": {"message", "type", "param", "code"}}: a 4xx for what the caller got wrong, 503 when
the feedback database cannot answer, 500 when the server fails (a generation, or anything
unexpected: logged with its traceback); the server keeps serving.
What the routes run is in generation.py (between HTTP and the batcher); server.py puts the
web app's routes (webapp.py) beside these on the same app.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmstack.chatformat import ChatFormatError
from lmstack.serve.db import DatabaseUnavailable
from lmstack.serve.generation import AssistantTurns, Batch, Choice, Server, ServedAssistant
from lmstack.serve.protocol import (APIError, BodyLimit, ChatRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, error_body, errors)


log = logging.getLogger(__name__)


def _now_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _content_text(msg: dict, i: int) -> dict:
    """OpenAI content may be a list of parts; text parts are joined, others refused."""
    content = msg.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}]")
            parts.append(part["text"])
        msg = {**msg, "content": "".join(parts)}
    return msg


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(cid: str, created: int, model: str, i: int, delta: dict, finish=None, logprobs=None, **extra) -> str:
    """One chat.completion.chunk event for choice i (`extra`: fields of the choice beside OpenAI's)."""
    c = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}
    return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [c]})


def create_app(server: Server) -> FastAPI:
    """The API's app for a server (the web app's routes are added beside them by server.py)."""

    @asynccontextmanager
    async def lifespan(app):
        server.start()
        yield
        server.close()

    app = FastAPI(title="lmstack", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=server.limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        elif tuple(err.get("loc", ())) == ("body",):
            msg, where = "the body must be a JSON object (Content-Type: application/json)", None
        elif err.get("type") == "extra_forbidden":
            msg = f"unrecognized request argument: {where}"
        return JSONResponse(error_body(f"{msg}" + (f" ({where})" if where and "argument" not in msg else ""),
                                       param=where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        """The framework's own answers (no route, wrong method, a body it cannot parse), in
        OpenAI's shape, with their headers (a 405 says what is Allowed)."""
        if e.status_code == 404:
            msg, code = f"no route {request.method} {request.url.path}", "not_found"
        elif e.status_code == 405:
            msg, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(e.detail), None
        return JSONResponse(error_body(msg, code=code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(DatabaseUnavailable)
    async def _database(request: Request, e: DatabaseUnavailable):
        return JSONResponse(error_body(f"{e}; try again", "server_error", code="database_unavailable"),
                            status_code=503)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        """Anything else is a bug: logged with its traceback, answered 500 in the same shape."""
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return JSONResponse(error_body(f"internal error ({type(e).__name__}); the server log has the details",
                                       "server_error", code="internal_error"), status_code=500)

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next):
        path = request.url.path
        t0 = time.monotonic()
        if server.api_key and path != "/health" and not path.startswith(("/app", "/static")) and path != "/":
            given = request.headers.get("authorization", "")
            ok = given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), server.api_key.encode())
            if not ok:
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        request.state.t0 = t0
        response = await call_next(request)
        if getattr(request.state, "streamed", False):
            return response  # logged when the stream ends (_logged), with its tokens and full time
        if server.request_log is not None and path.startswith("/v1/") and request.method == "POST":
            usage = getattr(request.state, "usage", None) or {}
            server.request_log.add(path, response.status_code, (time.monotonic() - t0) * 1000,
                                   usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))
        return response

    @app.get("/health", responses=errors(500))
    async def health():
        """Liveness and load. "degraded" when the feedback database cannot answer (the API still
        serves completions; the web app's feedback routes answer 503)."""
        db = "none" if server.db is None else server.db.state
        log_ = server.request_log
        return {"status": "ok" if db in ("ok", "none") else "degraded", "model": server.name, "database": db,
                **({"request_log": {"written": log_.written, "failed": log_.failed, "dropped": log_.dropped}}
                   if log_ is not None else {}),
                **server.batcher.load}

    @app.get("/v1/models", responses=errors(401, 500))
    async def models():
        return {"object": "list", "data": [_model_card(server, a) for a in [None, *server.assistants.values()]]}

    @app.get("/v1/models/{name}", responses=errors(401, 404, 500))
    async def model(name: str):
        return _model_card(server, server.check_model(name))

    @app.post("/v1/chat/completions", responses=errors(400, 401, 404, 408, 413, 500, 503))
    async def chat_completions(body: ChatRequest, request: Request):
        served = server.check_model(body.model)
        stops = server.check_common(body)
        server.check_messages(body.messages)
        if served is not None:
            return await _assistant_reply(server, served, body, stops, request)
        tools = bool(body.tools) and body.tool_choice != "none"
        ids = await run_in_threadpool(server.chat_prompt, [_content_text(m, i) for i, m in enumerate(body.messages)],
                                      body.tools if tools else None)
        max_tokens = server.room(ids, body.max_completion_tokens or body.max_tokens)
        top = (body.top_logprobs or 0) if body.logprobs else 0  # without logprobs: no top-k at every step
        batch = Batch(server)
        for _ in range(body.n):
            batch.add(ids, max_tokens, chat=True, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                      stop=stops, logprobs=body.logprobs, top=top)
        choices = [Choice(server, i, chat=True) for i in range(body.n)]
        cid, created = _now_id("chatcmpl"), int(time.time())
        request.state.usage = usage = {"prompt_tokens": len(ids), "completion_tokens": 0}

        def chunk(i, delta, finish=None, logprobs=None):
            return _chunk(cid, created, server.name, i, delta, finish, logprobs)

        if body.stream:
            async def gen():
                try:
                    for i in range(body.n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                    async for i, d in batch.events(request.is_disconnected):
                        ch = choices[i]
                        n_before = len(ch.logprobs)
                        text = ch.push(d)
                        lp = _chat_logprobs(server, ch, n_before) if body.logprobs and d.token is not None else None
                        if text or lp:
                            yield chunk(i, {"content": text}, logprobs=lp)
                        if d.finish_reason is not None:
                            if ch.calls and tools:
                                yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(ch.calls)]})
                            yield chunk(i, {}, ch.finish_reason(tools))
                    usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": server.name, "choices": [], "usage": _usage(usage)})
                except APIError as e:
                    yield _sse(error_body(e.message, e.type, e.param, e.code))
                yield "data: [DONE]\n\n"
            return _logged(server, request, gen())

        async for i, d in batch.events(request.is_disconnected):
            choices[i].push(d)
        usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
        out = []
        for ch in choices:
            msg = {"role": "assistant", "content": ch.content}
            if ch.calls and tools:
                msg["tool_calls"] = ch.calls
                msg["content"] = ch.content or None
            out.append({"index": ch.index, "message": msg, "finish_reason": ch.finish_reason(tools),
                        "logprobs": _chat_logprobs(server, ch, 0) if body.logprobs else None})
        return {"id": cid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": out, "usage": _usage(usage)}

    @app.post("/v1/completions", responses=errors(400, 401, 404, 408, 413, 500, 503))
    async def completions(body: CompletionRequest, request: Request):
        if server.check_model(body.model) is not None:
            raise APIError(400, f"`{body.model}` is an assistant: it answers chat completions "
                           "(/v1/chat/completions), not text completions", param="model")
        stops = server.check_common(body)
        if body.stream and body.echo and body.logprobs is not None:
            raise APIError(400, "echo with logprobs is not supported when streaming", param="echo")
        prompts = await run_in_threadpool(_prompts, server, body.prompt)
        batch, choices, heads = Batch(server), [], []
        for ids, user_from in prompts:
            max_tokens = server.room(ids, body.max_tokens) if body.max_tokens else 0
            for _ in range(body.n):
                batch.add(ids, max_tokens, chat=False, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=stops, logprobs=body.logprobs is not None, top=body.logprobs or 0,
                          prompt_logprobs=(body.logprobs or 0) if body.echo and body.logprobs is not None else None)
                choices.append(Choice(server, len(choices), chat=False))
                heads.append((ids, user_from))
        cid, created = _now_id("cmpl"), int(time.time())
        request.state.usage = usage = {"prompt_tokens": sum(len(ids) for ids, _ in prompts), "completion_tokens": 0}

        if body.stream:
            async def gen():
                try:
                    if body.echo:
                        for k, (ids, user_from) in enumerate(heads):
                            yield _sse({"id": cid, "object": "text_completion", "created": created,
                                        "model": server.name,
                                        "choices": [{"index": k, "text": server.tok.decode(ids[user_from:]),
                                                     "logprobs": None, "finish_reason": None}]})
                    async for k, d in batch.events(request.is_disconnected):
                        ch = choices[k]
                        if isinstance(d, tuple):
                            continue
                        text = ch.push(d)
                        if text or d.finish_reason:
                            yield _sse({"id": cid, "object": "text_completion", "created": created,
                                        "model": server.name,
                                        "choices": [{"index": k, "text": text, "logprobs": None,
                                                     "finish_reason": d.finish_reason and ch.finish_reason(False)}]})
                    usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
                    if body.stream_options and body.stream_options.include_usage:
                        yield _sse({"id": cid, "object": "text_completion", "created": created, "model": server.name,
                                    "choices": [], "usage": _usage(usage)})
                except APIError as e:
                    yield _sse(error_body(e.message, e.type, e.param, e.code))
                yield "data: [DONE]\n\n"
            return _logged(server, request, gen())

        async for k, d in batch.events(request.is_disconnected):
            if isinstance(d, tuple):  # ("prompt", log-probs of the prompt tokens)
                choices[k].prompt_lp = d[1]
            else:
                choices[k].push(d)
        usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
        out = []
        for ch, (ids, user_from) in zip(choices, heads):
            text = ch.content
            lp = None
            if body.echo:
                text = server.tok.decode(ids[user_from:]) + text
            if body.logprobs is not None:
                lp = _completion_logprobs(server, ch, ids, user_from, body.echo)
            out.append({"index": ch.index, "text": text, "logprobs": lp, "finish_reason": ch.finish_reason(False)})
        return {"id": cid, "object": "text_completion", "created": created, "model": server.name,
                "choices": out, "usage": _usage(usage)}

    @app.post("/tokenize", responses=errors(400, 401, 413, 500))
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give prompt (text) or messages", param="prompt")
        return await run_in_threadpool(_tokenize, server, body)  # a long text: off the event loop

    @app.post("/detokenize", responses=errors(400, 401, 413, 500))
    async def detokenize(body: DetokenizeRequest):
        bad = [t for t in body.tokens if not 0 <= t < server.tok.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{server.tok.vocab_size - 1})",
                           param="tokens")
        return {"prompt": server.tok.decode(body.tokens)}

    @app.get("/tokenizer_info", responses=errors(401, 500))
    async def tokenizer_info():
        # The chat template is the model's (lmstack's Jinja twin, or an imported model's own). A
        # prompt rendered with it and sent as text does not get its special tokens (user text never
        # becomes one): chat goes through /v1/chat/completions, or a prompt of token ids.
        tok = server.tok

        def name(i):
            return None if i is None else tok.id_to_token(i)

        return {"tokenizer_class": "lmstack byte-level BPE", "bos_token": name(tok.bos_id),
                "eos_token": name(tok.eos_id), "pad_token": name(tok.pad_id), "add_bos_token": tok.add_bos,
                "stop_tokens": sorted(name(i) for i in server.fmt.stop_ids), "model_max_length": server.ctx,
                "vocab_size": tok.vocab_size, "chat_template": server.fmt.jinja}

    return app


def _tokenize(server: Server, body: TokenizeRequest) -> dict:
    if body.messages is not None:
        try:
            msgs = [_content_text(m, i) for i, m in enumerate(body.messages)]
            ids = server.fmt.prompt(msgs) if body.add_generation_prompt else server.fmt.render(msgs)[0]
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
    elif body.prompt in server.tok.specials:
        # The exact name of a special token (alone: lmstack's or an imported model's own) gives its
        # id, so a client that looks special ids up by tokenizing their names (lm_eval's remote
        # tokenizer does) gets them. Generation never does this: user text never becomes a special token.
        ids = [server.tok.specials[body.prompt]]
    else:
        ids = (server.tok.bos if body.add_special_tokens else []) + server.tok.encode(body.prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": server.ctx}


def _logged(server: Server, request: Request, stream) -> StreamingResponse:
    """An SSE response whose request is logged when the stream ends: its real duration and
    tokens (the middleware would log it when the headers go out, before any token)."""
    request.state.streamed = True

    async def body():
        status = 200
        try:
            async for chunk in stream:
                if chunk.startswith('data: {"error"'):
                    status = 500 if '"server_error"' in chunk else 408 if '"timeout"' in chunk else 400
                yield chunk
        finally:
            if server.request_log is not None:
                usage = getattr(request.state, "usage", None) or {}
                server.request_log.add(request.url.path, status, (time.monotonic() - request.state.t0) * 1000,
                                       usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _model_card(server: Server, a: ServedAssistant | None = None) -> dict:
    """The model's card, or an assistant's: its id, the model it runs on (`parent`) and the tools
    the server runs for it."""
    card = {"id": server.name if a is None else a.name, "object": "model", "created": server.created,
            "owned_by": "lmstack", "max_model_len": server.ctx}
    if a is not None:
        card.update(parent=server.name, tools=a.tools.names() if a.tools else [], knowledge=a.finder is not None)
    return card


async def _assistant_reply(server: Server, served: ServedAssistant, body: ChatRequest, stops: list[str],
                           request: Request):
    """A chat completion whose `model` is an assistant's id: the assistant answers the client's
    messages (its instructions first, its knowledge looked up for the last user message) and runs
    its own tools here, through THE tool loop (AssistantTurns); the reply is the final message.
    Each choice also carries `messages`: what the reply added to the conversation, in order (the
    knowledge lookup as a `search` call and its `tool` message, each tool round's assistant
    message with tool_calls and its tool messages, and the final message), for a client to keep.
    Streamed, the text of every round comes as content, each call and result as a chunk whose
    choice has `tool_event` ({type: tool_call | tool_result, id, name, arguments[, content]}),
    and the finishing chunk has `messages`. Tools of the client's own, tool_choice other than
    "auto", and logprobs are refused (400)."""
    if body.tools:
        names = ", ".join(served.tools.names()) if served.tools else "none"
        raise APIError(400, f"`{served.name}` is an assistant: it runs its own tools ({names}) on the server; send "
                       "the request without tools", param="tools")
    if body.tool_choice not in (None, "auto"):
        raise APIError(400, f"`{served.name}` is an assistant: tool_choice may only be \"auto\"", param="tool_choice")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported for an assistant (its reply may span tool rounds)",
                       param="logprobs")
    turns = AssistantTurns(server, served, n=body.n, max_tokens=body.max_completion_tokens or body.max_tokens,
                           temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stops)
    await turns.start([_content_text(m, i) for i, m in enumerate(body.messages)])
    cid, created = _now_id("chatcmpl"), int(time.time())
    request.state.usage = turns.usage

    def final(messages: list[dict]) -> dict:
        msg = dict(messages[-1])
        if msg.get("tool_calls"):  # calls not run (out of rounds): OpenAI's shape, null content beside them
            msg["content"] = msg["content"] or None
        return msg

    if body.stream:
        async def gen():
            try:
                for i in range(body.n):
                    yield _chunk(cid, created, served.name, i, {"role": "assistant", "content": ""})
                async for i, ev in turns.events(request.is_disconnected):
                    if ev["type"] == "text":
                        yield _chunk(cid, created, served.name, i, {"content": ev["text"]})
                    elif ev["type"] == "done":
                        calls = final(ev["messages"]).get("tool_calls")
                        if calls:
                            yield _chunk(cid, created, served.name, i,
                                         {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
                        yield _chunk(cid, created, served.name, i, {}, ev["finish_reason"], messages=ev["messages"])
                    else:
                        yield _chunk(cid, created, served.name, i, {}, tool_event=ev)
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.name,
                                "choices": [], "usage": _usage(turns.usage)})
            except APIError as e:
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            yield "data: [DONE]\n\n"
        return _logged(server, request, gen())

    done = {}
    async for i, ev in turns.events(request.is_disconnected):
        if ev["type"] == "done":
            done[i] = ev
    if len(done) < body.n:
        raise APIError(499, "the client went away", code="client_closed_request")  # nobody reads this
    out = [{"index": i, "message": final(done[i]["messages"]), "finish_reason": done[i]["finish_reason"],
            "logprobs": None, "messages": done[i]["messages"]} for i in range(body.n)]
    return {"id": cid, "object": "chat.completion", "created": created, "model": served.name, "choices": out,
            "usage": _usage(turns.usage)}


def _usage(u: dict) -> dict:
    return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


def _prompts(server: Server, prompt) -> list[tuple[list[int], int]]:
    """The completions prompt(s) -> (ids, BOS first where the model adds one; the index where the
    caller's tokens start)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(prompt) > server.limits.max_prompts:
        raise APIError(400, f"{len(prompt)} prompts; at most {server.limits.max_prompts} per request", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            server.check_text_length(len(p), param="prompt")
            ids, start = server.tok.bos + server.tok.encode(p), len(server.tok.bos)
        else:
            bad = [t for t in p if not 0 <= t < server.tok.vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{server.tok.vocab_size - 1})",
                               param="prompt")
            head = [] if list(p[:1]) == server.tok.bos else server.tok.bos
            ids, start = head + list(p), len(head)
        if not ids:
            raise APIError(400, "prompt must not be empty (this model starts a text with no BOS)", param="prompt")
        server.check_prompt(ids)
        out.append((ids, start))
    return out


def _tok_str(server: Server, i: int) -> str:
    return server.tok.token_to_bytes(i).decode("utf-8", errors="replace")


def _chat_logprobs(server: Server, ch: Choice, start: int) -> dict:
    content = []
    for t, lp, top in zip(ch.tokens[start:], ch.logprobs[start:], ch.top[start:]):
        content.append({"token": _tok_str(server, t), "logprob": lp, "bytes": list(server.tok.token_to_bytes(t)),
                        "top_logprobs": [{"token": _tok_str(server, a), "logprob": b,
                                          "bytes": list(server.tok.token_to_bytes(a))} for a, b in top]})
    return {"content": content}


def _completion_logprobs(server: Server, ch: Choice, ids: list[int], user_from: int, echo: bool) -> dict:
    tokens, lps, tops = [], [], []
    if echo:
        # prompt_lp[j] is log p(ids[j+1] | ids[:j+1]); the caller's first token has none when it is BOS
        plp = ch.prompt_lp or []
        for j in range(user_from, len(ids)):
            tokens.append(ids[j])
            if j == 0:
                lps.append(None)
                tops.append(None)
            else:
                lp, alts = plp[j - 1]
                lps.append(lp)
                tops.append({_tok_str(server, a): b for a, b in alts} if alts else None)
    for t, lp, top in zip(ch.tokens, ch.logprobs, ch.top):
        tokens.append(t)
        lps.append(lp)
        tops.append({_tok_str(server, a): b for a, b in top} if top else None)
    strs = [_tok_str(server, t) for t in tokens]
    offsets, pos = [], 0
    for s in strs:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
