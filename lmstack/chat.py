"""Talking to a model: a chat turn with tool calls (`stream_chat`, `chat_completion`), and the
two terminal commands, `lmstack chat` (interactive, streamed) and `lmstack sample` (text).

A turn renders the conversation with the model's chat format (lmstack/chatformat.py), streams
the assistant's reply until it closes its turn, and parses each tool call it wrote into an
OpenAI-style tool call. With a tool registry the calls are run, each result is appended as a
`tool` message, and the model continues in a new assistant message (at most `max_tool_rounds`
times: THE tool loop, `ToolLoop`); without one, the turn ends with finish_reason "tool_calls"
and the caller runs them (as OpenAI's API does). Each round renders the whole conversation
again (no cache is kept between rounds).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Iterator

from lmstack.assistant import added, retrieved
from lmstack.chatformat import ChatFormatError, chat_format
from lmstack.device import pick_device
from lmstack.engine import ContextLengthError, for_inference, generate, stream
from lmstack.modelio import load_model_and_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.toolloop import ToolLoop
from lmstack.tools import ToolRegistry, default_registry
from lmstack.utils import UserError


def stream_chat(model, tok: Tokenizer, messages: list[dict], tools: ToolRegistry | None = None,
                max_tokens: int = 256, temperature: float = 0.7, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, max_tool_rounds: int = 4,
                guard=None) -> Iterator[dict]:
    """One assistant turn (with tool rounds) as events:
      {"type": "text", "text": ...}                            reply text, as it is generated
      {"type": "tool_call", "id", "name", "arguments"}         the model called a tool
      {"type": "tool_result", "id", "name", "arguments", "content"}   what the registry returned
      {"type": "bad_tool_call", "text"}                        unparsable call (dropped)
      {"type": "done", "messages": [...], "finish_reason", "usage"}
    `messages` in "done" are the new ones (assistant messages with tool_calls, tool messages,
    the final assistant message); the input list is not modified. max_tokens is per round.
    `guard`: a defence of untrusted text (tool results, pasted documents) applied by the tool loop
    (lmstack/toolloop.py; off by default).
    """
    fmt = chat_format(tok)
    loop = ToolLoop(fmt, [messages], tools, max_tool_rounds, max_tokens, guard=guard)
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    while loop.next_round():
        ids = loop.prompt(0)
        if len(ids) >= model.cfg.max_seq_len:
            raise ContextLengthError(f"the conversation is {len(ids)} tokens; the model's context is "
                                     f"{model.cfg.max_seq_len}")
        usage["prompt_tokens"] = len(ids)
        reply, stop, finish = loop.parser(0), None, "stop"
        for (d,) in stream(model, [ids], loop.budget(0), temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=None if seed is None else seed + loop.round, stop_ids=fmt.stop_ids, tokenizer=tok):
            usage["completion_tokens"] += d.token is not None
            bad = len(reply.bad)
            text = reply.push(d.token, d.text)
            if len(reply.bad) > bad:
                yield {"type": "bad_tool_call", "text": reply.bad[-1]}
            if text:
                yield {"type": "text", "text": text}
            stop, finish = d.stop, d.finish_reason or finish
        yield from loop.add(0, reply, stop, finish)
    turn = loop.turns[0]
    # calls left in the last message were not run: the caller's to run (no registry, or out of rounds)
    finish = "tool_calls" if turn.new[-1].get("tool_calls") else turn.finish
    yield {"type": "done", "messages": turn.new, "finish_reason": finish, "usage": usage}


def chat_completion(model, tok: Tokenizer, messages: list[dict], **kw) -> dict:
    """`stream_chat` run to the end: {"message": the final assistant message, "messages": all new
    messages (tool rounds included), "finish_reason", "usage"}."""
    for event in stream_chat(model, tok, messages, **kw):
        if event["type"] == "done":
            return {"message": event["messages"][-1], **event}
    raise AssertionError("stream_chat ended without a done event")


# --- the terminal chat --------------------------------------------------------------------------

HELP = "commands: /reset (forget the conversation and its memory), /system TEXT, /temp X, /quit"


def fit(fmt, history: list[dict], ctx: int, reserve: int, memory=None) -> tuple[int, int]:
    """Drop the oldest turns (never the system prompt, never the last user message) until the
    conversation leaves `reserve` positions for the reply; with a `memory`
    (lmstack/tools/memory.py) each dropped turn is paged out to it instead of forgotten. Returns
    (how many messages went, the tokens of what is left with the generation prompt): the caller
    checks that length without rendering the conversation again."""
    dropped = 0
    while (n := len(fmt.prompt(history))) + reserve > ctx:
        first = 1 if history[0]["role"] == "system" else 0
        # the oldest whole turn: up to (not including) the next user message
        nxt = next((i for i in range(first + 1, len(history)) if history[i]["role"] == "user"), None)
        if nxt is None:
            break
        if memory is not None:
            memory.page_out(history[first:nxt])
        dropped += nxt - first
        del history[first:nxt]
    return dropped, n


def recall(history: list[dict], memory, knowledge=None) -> list[dict]:
    """Before a reply to the last (user) message: its lookup in the conversation's paged-out
    memory, whose best page comes back in as the turn it was, just before that message (where a
    small model reads it: further up the context it is ignored, and as a search result it is read
    worse; README: "Memory"); a copy of it paged in before and still in the context moves there,
    and a page the conversation still holds itself is not brought back; then its lookup in the
    assistant's knowledge, as a `search` call and result when it finds something
    (lmstack.assistant.retrieved)."""
    if memory is not None and memory.pages:
        page = memory.page_in(history[-1]["content"])
        lines = {_line(m) for m in page}
        held = {_line(m) for m in history[:-1] if not m.get("recalled")}
        if page and not lines <= held:
            history = [m for m in history[:-1] if not (m.get("recalled") and _line(m) in lines)] + page + history[-1:]
    if knowledge is not None:
        history = retrieved(history, knowledge, f"knowledge_{len(history)}")
    return history


def _line(m: dict) -> tuple[str, str]:
    """A message as a memory page keeps it: its role and its text, whitespace collapsed."""
    return m["role"], " ".join((m.get("content") or "").split())


def chat(model: str, system: str | None = None, temperature: float = 0.7, top_p: float | None = 0.95,
         max_tokens: int = 256, seed: int | None = None, tools: bool = True, dtype: str = "auto",
         memory: str | bool | None = True, guard=None) -> int:
    """The interactive chat: streamed replies, history across turns, tool calls shown as they run.
    `model` is a chat model folder or an assistant folder (lmstack/assistant.py: its instructions,
    knowledge and tools). `memory`: turns that outgrow the context are paged out and recalled
    (True: for this session; a folder: kept there, so a later chat with the same folder still
    remembers; False: forgotten). `guard`: a defence of untrusted text (stream_chat's). Ctrl-C during
    a reply stops the reply; Ctrl-C or Ctrl-D at the prompt exits."""
    from lmstack.assistant import is_assistant, load
    from lmstack.tools.memory import ConversationMemory

    # A process started in the background by a non-interactive shell inherits SIGINT ignored;
    # at a terminal the user still expects Ctrl-C to work, so take it back explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if temperature < 0 or max_tokens < 1 or (top_p is not None and not 0 < top_p <= 1):
        raise UserError("need --temperature >= 0, --max-tokens >= 1 and 0 < --top-p <= 1")
    assistant = load(model) if is_assistant(model) else None
    net, tok = load_model_and_tokenizer(assistant.model if assistant else model, pick_device("auto"), kind="chat")
    net, fmt = for_inference(net, dtype), chat_format(tok)
    registry = (assistant.registry() if assistant else default_registry()) if tools and fmt.tools else None
    knowledge = assistant.search_tool() if assistant and assistant.retrieve and assistant.has_knowledge else None
    if assistant:
        system = assistant.system(system)  # the instructions, then --system (as a served assistant joins them)
    pages = None if not memory else ConversationMemory(None if memory is True else memory)
    if pages is not None and registry is not None:
        registry = registry.with_tools(pages.tool())  # a model may look a page up itself
    try:
        return _chat_loop(net, tok, fmt, model, system, temperature, top_p, max_tokens, seed, registry, knowledge,
                          pages, guard)
    finally:
        if pages is not None:
            pages.close()


def _chat_loop(net, tok, fmt, model, system, temperature, top_p, max_tokens, seed, registry, knowledge, memory,
               guard):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    tty = sys.stdout.isatty()

    def dim(s: str) -> str:
        return f"\x1b[2m{s}\x1b[0m" if tty else s

    col0 = [True]  # is the cursor at the start of a line?

    def note(text: str) -> None:
        print(("" if col0[0] else "\n") + dim(text), flush=True)
        col0[0] = True

    ctx = net.cfg.max_seq_len
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    turn = 0
    n = net.num_params()
    size = f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"
    print(dim(f"lmstack chat: {model} ({size} parameters, context {ctx}, "
              f"tools: {', '.join(registry.names()) if registry else 'off'}"
              f"{'' if fmt.tools else ' (its chat template has no tool-call format)'}; memory: "
              f"{'off' if memory is None else memory.folder})\n"
              f"{HELP}; Ctrl-C stops a reply, Ctrl-D or Ctrl-C at the prompt exits"), flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return 0
            elif cmd == "/reset":
                history = [m for m in history if m["role"] == "system"]
                if memory is not None:
                    memory.clear()
                print(dim("conversation reset"))
            elif cmd == "/system":
                history = [m for m in history if m["role"] != "system"]
                if arg:
                    history.insert(0, {"role": "system", "content": arg})
                print(dim(f"system prompt: {arg}" if arg else "system prompt cleared"))
            elif cmd == "/temp":
                try:
                    value = float(arg)
                    if not value >= 0:
                        raise ValueError
                except ValueError:
                    print(dim(f"/temp needs a number >= 0 (now {temperature:g})"))
                    continue
                temperature = value
                print(dim(f"temperature {temperature:g}"))
            else:
                print(dim(f"unknown command {cmd}; {HELP}"))
            continue

        history.append({"role": "user", "content": line})
        prior = history
        history = recall(prior, memory, knowledge)
        for m in added(history, prior):
            m["lookup"] = True  # what recall put before the message goes with it if the turn is abandoned
            if m.get("recalled"):
                note(f"[recalled] {m['role']}: {m['content'][:200]}")
            elif m["role"] == "tool":
                note(f"[knowledge] {m['content'][:200]}")
        try:
            dropped, n = fit(fmt, history, ctx, min(max_tokens, ctx // 2), memory)
        except ChatFormatError as e:  # a model's own template can refuse a conversation (roles must alternate)
            history = _before_last_user(history)
            note(f"[{e}; /reset starts over]")
            continue
        if dropped:
            print(dim(f"[{'paged out' if memory is not None else 'forgot'} the {dropped} oldest messages to fit "
                      "the context]"))
        if n >= ctx:
            history = _before_last_user(history)
            print(dim(f"that message is too long for this model's context ({ctx} tokens)"))
            continue
        col0[0] = True
        try:
            for ev in stream_chat(net, tok, history, registry, max_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=None if seed is None else seed + 100 * turn, guard=guard):
                if ev["type"] == "text":
                    print(ev["text"], end="", flush=True)
                    col0[0] = ev["text"].endswith("\n")
                elif ev["type"] == "tool_result":
                    note(f"[{ev['name']}] {_show_args(ev['arguments'])} -> {ev['content']}")
                elif ev["type"] == "bad_tool_call":
                    note(f"[unreadable tool call ignored: {ev['text'][:80]}]")
                elif ev["type"] == "done":
                    reply = ev["messages"][-1]
                    if reply["content"].strip() or reply.get("tool_calls"):
                        history += ev["messages"]
                    else:  # an empty reply cannot be rendered back into the template
                        history += ev["messages"][:-1]
                        note("[empty reply]")
                    if ev["finish_reason"] == "length":
                        note("[reply cut: max tokens or context reached]")
                    elif ev["finish_reason"] == "tool_calls":
                        note("[tool calls not run]")
        except KeyboardInterrupt:
            history = _before_last_user(history)  # the turn is abandoned: the conversation goes on from before it
            note("[interrupted]")
        except (ContextLengthError, ChatFormatError) as e:  # e.g. tool rounds outgrew the context
            history = _before_last_user(history)
            note(f"[{e}; /reset starts over]")
        if not col0[0]:
            print(flush=True)
        turn += 1


def _before_last_user(history: list[dict]) -> list[dict]:
    """The conversation before its last user message and what recall put before it for it."""
    last = max((i for i, m in enumerate(history) if m["role"] == "user"), default=len(history))
    while last and history[last - 1].get("lookup"):
        last -= 1
    return history[:last]


def _show_args(arguments: str) -> str:
    """A tool call's arguments for the user: the single value of a one-argument call."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(args, dict) and len(args) == 1:
        return str(next(iter(args.values())))
    return arguments


# --- the terminal sampler -----------------------------------------------------------------------

def sample(model: str, prompt: str = "", max_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           num_samples: int = 1, dtype: str | None = None) -> list[str]:
    """`lmstack sample`: print `num_samples` continuations of `prompt` (after BOS where the model
    adds one); returns them. dtype: `for_inference`'s (None: the weights as saved)."""
    if max_tokens < 1 or num_samples < 1:
        raise UserError("--max-tokens and --num-samples must be >= 1")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 1")
    net, tok = load_model_and_tokenizer(model, pick_device("auto"))
    if dtype is not None:
        net = for_inference(net, dtype)
    ids = tok.bos + tok.encode(prompt)
    if not ids:
        raise UserError("--prompt is empty and this model starts a text with no BOS: give it a prompt")
    if len(ids) >= net.cfg.max_seq_len:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {net.cfg.max_seq_len}")
    texts = []
    for i in range(num_samples):
        new = generate(net, ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed + i, stop_ids=tok.text_stop_ids)
        text = tok.decode(ids + new, skip_special=True)
        texts.append(text)
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text, flush=True)
    return texts
