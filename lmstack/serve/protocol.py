"""The wire protocol of the API: request bodies (pydantic), errors in OpenAI's shape, limits,
and the body-size guard. `api.py` holds the endpoints."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Ids are SQLite integers (int64), and so are OpenAI's seeds: int64 also keeps the batcher's
# seed + i (choice i) within torch's bound (2**64 - 1). A larger int is a 400, not a 500.
INT64_MAX = 2 ** 63 - 1
SEED = Field(None, ge=-2 ** 63, le=INT64_MAX)


@dataclass
class Limits:
    """What one request may ask for (each over the limit: a 4xx, not a slow server)."""
    max_body_bytes: int = 1 << 20  # request body
    max_messages: int = 256  # messages in a chat request
    max_prompt_tokens: int = 0  # 0 = the model's context - 1
    max_tokens: int = 4096  # per choice (also capped by the room left in the context)
    max_n: int = 8  # choices per request
    max_prompts: int = 64  # prompts in one completions request
    request_timeout: float = 120.0  # seconds from arrival to the last token
    max_waiting: int = 256  # generations waiting for a KV-cache slot; more get 503 `overloaded`


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --- request bodies (pydantic checks the types; extra fields are refused, as OpenAI does) ------

class Body(BaseModel):
    """A request body (the top level): its text, nested models' included, is checked once."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        """JSON may spell a lone UTF-16 surrogate ("\\ud800"), which is no character: no
        tokenizer, database or UTF-8 stream can take it, so the request is refused here."""
        _check_text(data)
        return data


class Nested(BaseModel):
    """A model inside a request body: extra fields refused too, but no text check of its own
    (the body's has walked it; one per level would walk each string again)."""
    model_config = ConfigDict(extra="forbid")


def _check_text(value) -> None:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (it holds a lone surrogate such as \\ud800)") from None
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


def errors(*statuses: int) -> dict:
    """The error answers a route can give, for the OpenAPI document."""
    what = {400: "malformed request (the message says what)", 401: "missing or wrong API key",
            404: "no such model, route or item", 408: "the request took longer than its time limit",
            413: "request body too large", 500: "unexpected server error (logged)",
            503: "the feedback database cannot answer (locked or broken), or there is none; or the server is "
                 "overloaded (its queue of waiting generations is full: retry later)"}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


class StreamOptions(Nested):
    include_usage: bool = False


class ChatRequest(Body):
    model: str
    messages: list[dict[str, Any]]
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


class CompletionRequest(Body):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0


class TokenizeRequest(Body):
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    model: str | None = None


class DetokenizeRequest(Body):
    tokens: list[int]
    model: str | None = None


class BodyLimit:
    """Pure ASGI middleware: a body over `max_bytes` gets 413, whether its length is announced
    (Content-Length) or not (chunked): the body is read here, at most max_bytes + 1 bytes, before
    the app sees any of it (so no framework turns the refusal into something else)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away before the body ended
                return
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await self._reject(send)
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _reject(self, send):
        body = json.dumps(error_body(f"request body over {self.max_bytes} bytes", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
