"""THE tool loop: an assistant turn whose replies call tools gets their results and goes on.

One loop for the terminal chat, evaluation and RL rollouts alike (`ToolLoop`); it renders through
a model's chat format (lmstack/chatformat.py) and parses replies with its `ReplyParser`. The tools
are a registry (lmstack/tools/) whose `call(name, arguments)` returns text and never raises.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from lmstack.chatformat import ChatFormat, ReplyParser, TemplateFormat


@dataclass
class Turn:
    """One conversation's assistant turn in the tool loop."""
    messages: list[dict]  # the conversation: the input, then what this turn added
    ids: list[int]  # continuation mode: the prompt's ids, then every id of the turn so far
    start: int  # continuation mode: where the turn's ids begin
    new: list[dict] = field(default_factory=list)  # what this turn added: assistant, tool, ..., assistant
    env: list[int] = field(default_factory=list)  # continuation mode: positions in the turn the tools wrote
    text: str = ""  # the last reply's text (tool calls left out)
    closed: bool = False  # the last reply ended with the end-of-turn id
    finish: str = "length"  # the last reply's finish reason: "stop" | "length"
    calls: int = 0  # tool calls begun in the whole turn
    ran: int = 0  # tool calls run
    unanswered: int = 0  # tool calls in the last reply that got no result
    done: bool = False


class ToolLoop:
    """ONE tool loop, for the terminal chat, evaluation and RL rollouts alike: every round, each
    unfinished turn gets one reply (the caller generates it: streamed, batched or scripted); a
    reply that calls tools gets their results as tool messages and the turn goes on, for at most
    `max_rounds` rounds after the first. Without tools, or out of rounds, the calls stay unrun
    and the turn ends (its last message keeps its tool_calls). `tools` is a registry whose
    `call(name, arguments)` returns the result as text and never raises.

    How a turn goes on:
      continuation=False (chat, eval): each round renders the whole conversation again, as a
        client of a chat API sends it back; `max_tokens` is per reply.
      continuation=True (RL rollouts): each round continues the very ids sampled so far, the
        tool results rendered after them; a reply must have closed its turn to go on,
        `max_tokens` bounds the whole turn (tool results included), and the results' positions
        are kept in `Turn.env` (context the model did not write).
    Prompts are conversations (lists of messages), or in continuation mode rendered ids.
    `guard` (off by default): the one place untrusted text is defended before the model reads it,
    an object with `conversation(messages)` (applied to each prompt conversation) and
    `message(msg)` (to each tool result the loop adds), both returning new messages and both
    idempotent, e.g. lmstack/security/hierarchy.py's datamarking or injection classifier.
    Drive it with: `while todo := loop.next_round(): ... loop.add(i, reply, stop, finish)`.
    """

    def __init__(self, fmt: ChatFormat | TemplateFormat, prompts: list, tools=None, max_rounds: int = 2, max_tokens: int = 256,
                 continuation: bool = False, guard=None):
        self.fmt, self.tools, self.max_rounds, self.max_tokens = fmt, tools, max_rounds, max_tokens
        self.guard = guard
        self.specs = tools.specs() if tools is not None and fmt.tools else None  # for a template that lists them
        self.continuation, self.round = continuation, -1
        self.turns = []
        for p in prompts:
            if p and isinstance(p[0], int):
                if not continuation:
                    raise ValueError("prompts given as ids need continuation=True")
                msgs, ids = [], list(p)
            else:
                msgs = guard.conversation(list(p)) if guard is not None else list(p)
                ids = fmt.prompt(msgs, self.specs) if continuation else []
            self.turns.append(Turn(msgs, ids, len(ids)))

    def next_round(self) -> list[int]:
        """Start the next round: the turns that need a reply in it (none: the loop is over)."""
        self.round += 1
        return [i for i, t in enumerate(self.turns) if not t.done]

    def prompt(self, i: int) -> list[int]:
        t = self.turns[i]
        return list(t.ids) if self.continuation else self.fmt.prompt(t.messages, self.specs)

    def budget(self, i: int) -> int:
        """The tokens turn i's next reply may have."""
        t = self.turns[i]
        return self.max_tokens - (len(t.ids) - t.start) if self.continuation else self.max_tokens

    def call_ids(self, i: int) -> Callable[[int], str]:
        """Tool-call ids of turn i's next reply: call_N, N the index its k-th call would have
        among the conversation's messages (unique within the conversation)."""
        base = len(self.turns[i].messages)
        return lambda k: f"call_{base + k}"

    def parser(self, i: int) -> ReplyParser:
        """A parser for turn i's next reply, fed as it streams."""
        return self.fmt.parser(self.call_ids(i))

    def add(self, i: int, reply: ReplyParser | list[int], stop: int | str | None, finish: str) -> list[dict]:
        """Turn i's reply this round (a parser it was fed to, or its ids), `stop` the id that
        ended it (None if none), `finish` "stop" | "length". Runs its tool calls if the turn goes
        on; returns their events: {"type": "tool_call" | "tool_result", "id", "name",
        "arguments"[, "content"]}."""
        t, fmt = self.turns[i], self.fmt
        if not isinstance(reply, ReplyParser):
            reply = fmt.parse(reply, self.call_ids(i))
        msg = {"role": "assistant", "content": reply.text}
        if reply.calls:
            msg["tool_calls"] = reply.calls
        t.new.append(msg)
        t.messages.append(msg)
        t.text, t.closed, t.finish = reply.text, stop == fmt.end_id, finish
        t.calls, t.unanswered = t.calls + reply.opened, reply.opened
        if self.continuation:
            t.ids += reply.ids + ([stop] if isinstance(stop, int) else [])
        go_on = bool(reply.calls) and self.tools is not None and self.round < self.max_rounds
        if not go_on or (self.continuation and stop != fmt.end_id):
            t.done = True
            return []
        events, results = [], []
        for call in reply.calls:
            fn = call["function"]
            event = {"type": "tool_call", "id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}
            content = self.tools.call(fn["name"], fn["arguments"])
            events += [event, {**event, "type": "tool_result", "content": content}]
            result = {"role": "tool", "tool_call_id": call["id"], "content": content or "(empty)"}
            results.append(self.guard.message(result) if self.guard is not None else result)
        if self.continuation:
            more = fmt.render_more(t.messages, results, self.specs)
            used = len(t.ids) - t.start
            if used + len(more) >= self.max_tokens:  # no room left to answer: the turn ends here
                t.done = True
                return events
            t.env += range(used, used + len(more))
            t.ids += more
        t.new += results
        t.messages += results
        t.ran, t.unanswered = t.ran + len(reply.calls), 0
        return events
