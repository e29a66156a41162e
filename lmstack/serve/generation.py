"""Between HTTP and the batcher: the model being served, and the requests it runs for a route.

The API (api.py) and the web app (webapp.py) both go through here and never through each
other: `Server` holds the model, its tokenizer and chat format, the limits and the batcher, and
checks what a request may ask for; `Batch` submits one HTTP request's generations (its
choices) to the batcher and yields their events as they come; `Choice` collects one
generation's output (text, tool calls, log-probs); `AssistantTurns` runs an assistant's reply
(lmstack/assistant.py, served as its own model id): its conversation prepared, then THE tool
loop (lmstack/toolloop.py) with every round's generations through the batcher and the tools run
here. Every failure a client can cause is an `APIError` (a 4xx in OpenAI's shape), never a
traceback.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from typing import Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from lmstack.assistant import Assistant, added
from lmstack.chatformat import ChatFormatError, chat_format, check_messages
from lmstack.serve.batcher import Batcher, GenRequest, QueueFull
from lmstack.serve.db import RequestLog
from lmstack.serve.protocol import APIError, Limits
from lmstack.toolloop import ToolLoop
from lmstack.tools import Tool, ToolRegistry, default_registry

MAX_TOOL_ROUNDS = 4  # an assistant's tool rounds per reply, after the first (as `lmstack chat`)


@dataclass
class ServedAssistant:
    """An assistant served as its own model id, on the server's model."""
    assistant: Assistant
    tools: ToolRegistry | None  # what its tool loop runs: its tools within the server's --tools (None: none)
    finder: Tool | None  # its knowledge lookup before each reply (None: it does not retrieve)

    @property
    def name(self) -> str:
        return self.assistant.name

    @classmethod
    def of(cls, a: Assistant, allowed, fmt) -> "ServedAssistant":
        """`a` served where only the tools named in `allowed` may run (and none when the model's
        chat format has no tool calls)."""
        reg = a.registry()
        reg = reg.subset([t for t in reg.names() if t in allowed]) if fmt.tools else None
        return cls(a, reg if reg is not None and reg.names() else None,
                   a.search_tool() if a.retrieve and a.has_knowledge else None)


class Server:
    """The model behind the API: tokenizer and chat format, batcher, limits, optional API key
    and feedback database; the tools the web app may run (`tools`, default: the default
    registry's) and the assistants served on the model (each its own model id). `guard` (off by
    default): the defence of untrusted text (tool results, pasted documents) every conversation
    goes through before the model reads it, e.g. lmstack/security/hierarchy.py's datamarking.
    `prefix_cache_mb`: the bound of the batcher's prefix cache (0: none)."""

    def __init__(self, model, tok, name: str, api_key: str | None = None, db=None, limits: Limits | None = None,
                 slots: int = 16, tools: ToolRegistry | None = None, assistants=(), default: str | None = None,
                 guard=None, prefix_cache_mb: float = 64):
        self.model, self.tok, self.fmt, self.name = model, tok, chat_format(tok), name
        self.guard = guard
        self.api_key, self.db = api_key, db
        self.tools = default_registry() if tools is None else tools
        self.assistants: dict[str, ServedAssistant] = {a.name: a for a in assistants}
        self.default = default or name  # the id the web app starts with
        self.limits = limits or Limits()
        self.ctx = model.cfg.max_seq_len
        self.max_prompt = min(self.limits.max_prompt_tokens or self.ctx - 1, self.ctx - 1)
        self.batcher = Batcher(model, tok, slots, max_waiting=self.limits.max_waiting,
                               prefix_cache_bytes=int(prefix_cache_mb * (1 << 20)))
        self.request_log = RequestLog(db) if db is not None else None
        self.text_stops = tok.text_stop_ids  # plain text ends at a document boundary
        # No token stands for more characters than the longest one, so a text of c characters
        # is at least c / longest tokens: a prompt far too long is refused before it is tokenized.
        self.max_token_chars = max(1, max(tok.token_bytes()))
        self.created = int(time.time())

    def start(self) -> None:
        """Start the batcher's thread and the request log's (the app's lifespan: while it serves)."""
        self.batcher.start()
        if self.request_log is not None:
            self.request_log.start()

    def close(self) -> None:
        """Stop both; the request log writes what is queued first (a few seconds at most)."""
        self.batcher.close()
        if self.request_log is not None:
            self.request_log.close()

    # --- checks ----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        """The model ids served: the model's own, then each assistant's."""
        return [self.name, *self.assistants]

    def check_model(self, name: str) -> ServedAssistant | None:
        """The assistant a request's `model` names (None: the model itself); 404 for any other."""
        if name == self.name:
            return None
        if name in self.assistants:
            return self.assistants[name]
        raise APIError(404, f"The model `{name}` does not exist (this server serves "
                       f"{', '.join(f'`{i}`' for i in self.ids)})", "invalid_request_error", "model", "model_not_found")

    def check_common(self, body) -> list[str]:
        """n, the unsupported penalties and the stop strings of a completions request."""
        if body.n > self.limits.max_n:
            raise APIError(400, f"n is {body.n}; at most {self.limits.max_n} choices per request", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name} is not supported (only 0)", param=name)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not isinstance(s, str) or not s for s in stop):
            raise APIError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
        return stop

    def check_messages(self, messages: list) -> None:
        """A chat's messages: at least one, at most the limit."""
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        if len(messages) > self.limits.max_messages:
            raise APIError(400, f"{len(messages)} messages; at most {self.limits.max_messages}", param="messages")

    def check_prompt(self, ids: list[int] | None = None, at_least: int = 0, param: str = "messages") -> None:
        """400 for a prompt over the limit: its ids, or a text known to be `at_least` tokens."""
        n = len(ids) if ids is not None else at_least
        if n > self.max_prompt:
            size = f"{n} tokens" if ids is not None else f"at least {n} tokens"
            raise APIError(400, f"This model's maximum context length is {self.ctx} tokens; the prompt is "
                           f"{size} (at most {self.max_prompt} here)", param=param, code="context_length_exceeded")

    def check_text_length(self, chars: int, param: str = "messages") -> None:
        """The cheap bound: refuse text that cannot fit, whatever its tokens, before tokenizing it."""
        self.check_prompt(at_least=chars // self.max_token_chars, param=param)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation's ids, ready for the assistant's reply; 400 when it is malformed or
        leaves no room in the context for an answer (a very long one before it is tokenized), or
        offers tools to a model whose chat format has no tool calls. `tools` (OpenAI's list) goes
        to a template that lists them (an imported model's own)."""
        if tools and not self.fmt.tools:
            raise APIError(400, "this model's chat template has no tool-call format lmstack can parse "
                           "(tools are off for it); send the request without tools", param="tools")
        self.check_text_length(sum(len(m["content"]) for m in messages
                                   if isinstance(m, dict) and isinstance(m.get("content"), str)))
        if self.guard is not None:
            messages = self.guard.conversation(messages)
        try:
            ids = self.fmt.prompt(messages, tools)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        self.check_prompt(ids)
        return ids

    def room(self, ids: list[int], asked: int | None) -> int:
        """The tokens a reply to `ids` may have: what was asked (or the limit), within the context."""
        if asked is not None and asked > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {asked}; at most {self.limits.max_tokens} here", param="max_tokens")
        room = self.ctx - len(ids)
        return min(room, asked if asked is not None else self.limits.max_tokens)


class Choice:
    """Collects one generation's events: its text and, for a chat reply, its tool calls (the
    chat format's parser; the JSON of a call is not text), log-probs and finish reason."""

    def __init__(self, server: Server, index: int, chat: bool):
        self.index = index
        self.reply = server.fmt.parser(lambda k: f"call_{uuid.uuid4().hex[:12]}") if chat else None
        self.content = ""
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list = []
        self.finish: str | None = None
        self.prompt_lp = None  # echo: the prompt's log-probs

    @property
    def calls(self) -> list[dict]:
        return self.reply.calls if self.reply is not None else []

    def push(self, d) -> str:
        """A Delta -> the new visible text."""
        if d.token is not None:
            self.tokens.append(d.token)
            if d.logprob is not None:
                self.logprobs.append(d.logprob)
                self.top.append(d.top_logprobs or [])
        text = d.text if self.reply is None else self.reply.push(d.token, d.text)
        self.content += text
        if d.finish_reason is not None:
            self.finish = d.finish_reason
        return text

    def finish_reason(self, tools: bool) -> str:
        if self.calls and tools:
            return "tool_calls"
        return "length" if self.finish == "length" else "stop"


class Batch:
    """One HTTP request's generations, submitted to the batcher together; their events come back
    on one queue (the batcher's thread hands them to this event loop)."""

    def __init__(self, server: Server, deadline: float | None = None):
        self.server = server
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()
        self.reqs: list[GenRequest] = []
        # when its generations time out (time.monotonic()): the request's time limit from now,
        # or a deadline set before (an assistant's tool rounds share their request's)
        self.deadline = deadline if deadline is not None else time.monotonic() + server.limits.request_timeout

    def add(self, prompt: list[int], max_tokens: int, *, chat: bool, temperature: float = 1.0, top_p: float = 1.0,
            seed: int | None = None, stop=(), logprobs: bool = False, top: int = 0,
            prompt_logprobs: int | None = None, seed_offset: int | None = None) -> GenRequest:
        """Submit one generation; its events carry its index (the order of `add` calls). With a
        seed, generation i samples with seed + i (or seed + seed_offset)."""
        i, s = len(self.reqs), self.server
        offset = i if seed_offset is None else seed_offset
        req = GenRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p if top_p < 1 else None, seed=None if seed is None else seed + offset,
                         stop_ids=s.fmt.stop_ids if chat else s.text_stops, stop_strings=tuple(stop),
                         logprobs=logprobs, top_logprobs=top, prompt_logprobs=prompt_logprobs,
                         deadline=self.deadline,
                         on_event=lambda ev: self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, ev)))
        try:
            s.batcher.submit(req)
        except QueueFull as e:  # this request's earlier generations leave with it
            for r in self.reqs:
                r.cancelled = True
            raise APIError(503, f"{e}; retry later", "server_error", code="overloaded") from None
        self.reqs.append(req)
        return req

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None):
        """Yield (index, event) until every generation has finished: a Delta, or ("prompt",
        log-probs) for an echo. A failed generation or a timeout raises APIError; a client that
        went away (`disconnected()`) cancels them all (their slots free at the next step)."""
        pending = len(self.reqs)
        try:
            while pending:
                try:
                    i, ev = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
                if isinstance(ev, tuple):
                    if ev[0] == "error":
                        raise APIError(500, f"generation failed: {ev[1]}", "server_error")
                    yield i, ev
                    continue
                if ev.finish_reason == "timeout":
                    raise APIError(408, f"the request took longer than {self.server.limits.request_timeout:g} s",
                                   "timeout", code="timeout")
                if ev.finish_reason is not None:
                    pending -= 1
                yield i, ev
        finally:
            for r in self.reqs:
                r.cancelled = True  # no-op for finished rows; frees the slot of abandoned ones


async def sample_answers(server: Server, messages: list[dict], *, max_tokens: int, temperature: float, n: int = 2,
                         disconnected=None) -> list[str]:
    """`n` answers to a conversation, sampled through the batcher (as /v1/chat/completions
    does), each with its own seed; tool calls are left out of the text."""
    ids = await run_in_threadpool(server.chat_prompt, messages)
    batch = Batch(server)
    seed = random.randrange(1 << 30)
    for _ in range(n):
        batch.add(ids, server.room(ids, max_tokens), chat=True, temperature=temperature, seed=seed)
    choices = [Choice(server, i, chat=True) for i in range(n)]
    async for i, d in batch.events(disconnected):
        choices[i].push(d)
    return [c.content.strip() for c in choices]


class AssistantTurns:
    """An assistant's reply (n of them) with its tools run here, as OpenAI's Assistants API runs
    them: `start(messages)` prepares the conversation (the instructions, the knowledge lookup of
    the last user message: `Assistant.prepare`) and checks it (a 4xx before anything is sent);
    `events()` runs THE tool loop: every round, each unfinished turn's next reply is generated
    through the batcher (continuous batching, beside every other request), and the tool calls it
    wrote are run by the assistant's registry in a worker thread; at most MAX_TOOL_ROUNDS rounds
    after the first, all within the request's time limit. `usage`: the first prompt once (as for
    any request), every later round's prompt (each is prefilled again) and every token generated."""

    def __init__(self, server: Server, served: ServedAssistant, *, n: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, stop=()):
        self.server, self.served, self.n, self.asked, self.seed = server, served, n, max_tokens, seed
        self.sampling = {"temperature": temperature, "top_p": top_p, "stop": tuple(stop)}
        self.deadline = time.monotonic() + server.limits.request_timeout
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.lookup: list[dict] = []  # the knowledge lookup: a search call and its result, or nothing
        self.loop: ToolLoop | None = None
        self.first: list[int] = []

    async def start(self, messages: list[dict]) -> None:
        s, a = self.server, self.served
        try:
            check_messages(messages)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        s.check_text_length(sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str)))
        conv = await run_in_threadpool(a.assistant.prepare, messages, a.finder)
        # the lookup: the search call and result `prepare` put before the last user message
        self.lookup = [m for m in added(conv, messages) if m["role"] != "system"]
        self.loop = ToolLoop(s.fmt, [conv] * self.n, a.tools, MAX_TOOL_ROUNDS, self.asked or s.limits.max_tokens,
                             guard=s.guard)
        self.first = await run_in_threadpool(s.chat_prompt, conv, self.loop.specs)
        s.room(self.first, self.asked)  # a max_tokens over the limit: 400 now
        self.usage["prompt_tokens"] = len(self.first)

    def _prompt(self, i: int) -> list[int]:
        """Turn i's prompt after a tool round; 400 when the tool results left no room to answer."""
        try:
            ids = self.loop.prompt(i)
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages") from None
        self.server.check_prompt(ids)
        return ids

    async def events(self, disconnected: Callable[[], Awaitable[bool]] | None = None):
        """Yield (choice, event), `lmstack.chat.stream_chat`'s events: the knowledge lookup as a
        "tool_call" and a "tool_result" event first; {"type": "text", "text"} as replies stream;
        {"type": "bad_tool_call", "text"}; {"type": "tool_call" | "tool_result", "id", "name",
        "arguments"[, "content"]} for each call run; and last, per choice, {"type": "done",
        "messages": what the reply added (the lookup, each tool round, the final message),
        "finish_reason"}. A client that went away ends it early (no "done")."""
        s, loop = self.server, self.loop
        for i in range(self.n):
            for ev in _lookup_events(self.lookup):
                yield i, ev
        while todo := loop.next_round():
            batch, replies = Batch(s, self.deadline), []
            for i in todo:
                ids = self.first if loop.round == 0 else self._prompt(i)
                if loop.round:
                    self.usage["prompt_tokens"] += len(ids)
                batch.add(ids, s.room(ids, self.asked), chat=True, seed=self.seed,
                          seed_offset=i + loop.round * self.n, **self.sampling)
                replies.append({"parser": loop.parser(i), "stop": None, "finish": None})
            async for k, d in batch.events(disconnected):
                r, i = replies[k], todo[k]
                self.usage["completion_tokens"] += d.token is not None
                bad = len(r["parser"].bad)
                text = r["parser"].push(d.token, d.text)
                if len(r["parser"].bad) > bad:
                    yield i, {"type": "bad_tool_call", "text": r["parser"].bad[-1]}
                if text:
                    yield i, {"type": "text", "text": text}
                if d.finish_reason is not None:
                    r["stop"], r["finish"] = d.stop, d.finish_reason
            if any(r["finish"] is None for r in replies):
                return  # the client went away (its generations are cancelled)
            for i, r in zip(todo, replies):
                for ev in await run_in_threadpool(loop.add, i, r["parser"], r["stop"], r["finish"]):
                    yield i, ev
        for i, t in enumerate(loop.turns):
            # calls left in the last message were not run (out of rounds, or no tools to run them)
            yield i, {"type": "done", "messages": self.lookup + t.new,
                      "finish_reason": "tool_calls" if t.new[-1].get("tool_calls") else t.finish}


def _lookup_events(lookup: list[dict]) -> list[dict]:
    """The knowledge lookup (a search call and its tool message) as the tool loop's events."""
    if not lookup:
        return []
    call = lookup[0]["tool_calls"][0]
    ev = {"type": "tool_call", "id": call["id"], "name": call["function"]["name"],
          "arguments": call["function"]["arguments"]}
    return [ev, {**ev, "type": "tool_result", "content": lookup[1]["content"]}]
