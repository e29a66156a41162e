"""Conversations: a chat turn with tool calls (`stream_chat`, `chat_completion`) and
`lmstack chat`, the interactive terminal chat.

A turn renders the conversation with THE chat template (`render_chat`, generation prompt on),
streams the assistant's reply until it closes its turn (<|end|>), and parses each
`<|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>` it wrote into an OpenAI-style
tool call. With a tool registry the calls are run, each result is appended as a `tool` message,
and the model continues in a new assistant message (at most `max_tool_rounds` times); without
one, the turn ends with finish_reason "tool_calls" and the caller runs them (as OpenAI's API
does). Each round renders the whole conversation again (no cache is kept between rounds).
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Iterator

from lmstack.engine import ContextLengthError, for_inference, stream
from lmstack.tokenizer import ChatFormatError, Tokenizer, render_chat
from lmstack.tools import ToolRegistry, default_registry
from lmstack.utils import UserError

# A reply ends at <|end|>, or at any token that can only begin something else.
TURN_ENDS = ("<|end|>", "<|eos|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")


def parse_tool_call(text: str, call_id: str) -> dict | None:
    """The JSON between <|tool_call|> and <|/tool_call|> -> an OpenAI tool call, or None if
    it is not {"name": str, "arguments": {...}}."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, (dict, str)):
        return None
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": obj["name"], "arguments": args}}


def stream_chat(model, tok: Tokenizer, messages: list[dict], tools: ToolRegistry | None = None,
                max_tokens: int = 256, temperature: float = 0.7, top_k: int | None = None,
                top_p: float | None = None, seed: int | None = None, max_tool_rounds: int = 4,
                ) -> Iterator[dict]:
    """One assistant turn (with tool rounds) as events:
      {"type": "text", "text": ...}                            reply text, as it is generated
      {"type": "tool_call", "id", "name", "arguments"}         the model called a tool
      {"type": "tool_result", "id", "name", "arguments", "content"}   what the registry returned
      {"type": "bad_tool_call", "text"}                        unparsable call (dropped)
      {"type": "done", "messages": [...], "finish_reason", "usage"}
    `messages` in "done" are the new ones (assistant messages with tool_calls, tool messages,
    the final assistant message); the input list is not modified. max_tokens is per round.
    """
    sid = tok.special_ids
    open_id, close_id = sid["<|tool_call|>"], sid["<|/tool_call|>"]
    stop_ids = {sid[t] for t in TURN_ENDS}
    history, new = list(messages), []
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    finish = "stop"
    for round_ in range(max_tool_rounds + 1):
        ids, _ = render_chat(tok, history, add_generation_prompt=True)
        if len(ids) >= model.cfg.max_seq_len:
            raise ContextLengthError(f"the conversation is {len(ids)} tokens; the model's context is "
                                     f"{model.cfg.max_seq_len}")
        usage["prompt_tokens"] = len(ids)
        content, calls, call_ids, in_call = "", [], None, False
        for (d,) in stream(model, [ids], max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=None if seed is None else seed + round_, stop_ids=stop_ids, tokenizer=tok):
            usage["completion_tokens"] += d.token is not None
            if d.token == open_id:  # text flushed with the marker came before it
                text, in_call, call_ids = d.text, True, []
            elif d.token == close_id and in_call:
                text, in_call = "", False
                call = parse_tool_call(tok.decode(call_ids), f"call_{len(history) + len(calls)}")
                if call is None:
                    yield {"type": "bad_tool_call", "text": tok.decode(call_ids)}
                else:
                    calls.append(call)
            elif in_call:
                text = ""
                if d.token is not None:
                    call_ids.append(d.token)
            else:
                text = d.text
            if text:
                content += text
                yield {"type": "text", "text": text}
            finish = d.finish_reason or finish
        msg = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = calls
        new.append(msg)
        history.append(msg)
        if not calls:
            break
        if tools is None or round_ == max_tool_rounds:
            finish = "tool_calls"  # the caller's to run (no registry, or out of rounds)
            break
        for call in calls:
            fn = call["function"]
            yield {"type": "tool_call", "id": call["id"], "name": fn["name"], "arguments": fn["arguments"]}
            result = tools.call(fn["name"], fn["arguments"])
            yield {"type": "tool_result", "id": call["id"], "name": fn["name"], "arguments": fn["arguments"],
                   "content": result}
            tool_msg = {"role": "tool", "tool_call_id": call["id"], "content": result or "(empty)"}
            new.append(tool_msg)
            history.append(tool_msg)
    yield {"type": "done", "messages": new, "finish_reason": finish, "usage": usage}


def chat_completion(model, tok: Tokenizer, messages: list[dict], **kw) -> dict:
    """`stream_chat` run to the end: {"message": the final assistant message, "messages": all new
    messages (tool rounds included), "finish_reason", "usage"}."""
    for event in stream_chat(model, tok, messages, **kw):
        if event["type"] == "done":
            return {"message": event["messages"][-1], **event}
    raise AssertionError("stream_chat ended without a done event")


# --- the terminal chat --------------------------------------------------------------------------

HELP = "commands: /reset (forget the conversation), /system TEXT, /temp X, /quit"


def _fit(tok: Tokenizer, history: list[dict], ctx: int, reserve: int) -> int:
    """Drop the oldest turns (never the system prompt, never the last user message) until the
    conversation leaves `reserve` positions for the reply. Returns how many messages went."""
    dropped = 0
    while len(render_chat(tok, history, add_generation_prompt=True)[0]) + reserve > ctx:
        first = 1 if history[0]["role"] == "system" else 0
        # the oldest whole turn: up to (not including) the next user message
        nxt = next((i for i in range(first + 1, len(history)) if history[i]["role"] == "user"), None)
        if nxt is None:
            break
        dropped += nxt - first
        del history[first:nxt]
    return dropped


def chat(model: str, system: str | None = None, temperature: float = 0.7, top_p: float | None = 0.95,
         max_tokens: int = 256, seed: int | None = None, tools: bool = True, dtype: str = "auto") -> int:
    """The interactive chat: streamed replies, history across turns, tool calls shown as they run.
    Ctrl-C during a reply stops the reply; Ctrl-C or Ctrl-D at the prompt exits."""
    # A process started in the background by a non-interactive shell inherits SIGINT ignored;
    # at a terminal the user still expects Ctrl-C to work, so take it back explicitly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from lmstack import distributed
    from lmstack.train import checkpoint

    if temperature < 0 or max_tokens < 1 or (top_p is not None and not 0 < top_p <= 1):
        raise UserError("need --temperature >= 0, --max-tokens >= 1 and 0 < --top-p <= 1")
    net = checkpoint.load_model(model, distributed.pick_device("auto"))
    tok = Tokenizer.load(model)
    if tok.vocab_size > net.cfg.vocab_size:
        raise UserError(f"{model}: the tokenizer has {tok.vocab_size} tokens but the model only {net.cfg.vocab_size}")
    net = for_inference(net, dtype)
    registry = default_registry() if tools else None
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
    print(dim(f"lmstack chat: {model} ({sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, context {ctx}, "
              f"tools: {', '.join(registry.names()) if registry else 'off'})\n"
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
        dropped = _fit(tok, history, ctx, min(max_tokens, ctx // 2))
        if dropped:
            print(dim(f"[forgot the {dropped} oldest messages to fit the context]"))
        if len(render_chat(tok, history, add_generation_prompt=True)[0]) >= ctx:
            history.pop()
            print(dim(f"that message is too long for this model's context ({ctx} tokens)"))
            continue
        col0[0] = True
        try:
            for ev in stream_chat(net, tok, history, registry, max_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=None if seed is None else seed + 100 * turn):
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
            history.pop()  # the turn is abandoned: the conversation goes on from before it
            note("[interrupted]")
        except (ContextLengthError, ChatFormatError) as e:  # e.g. tool rounds outgrew the context
            history.pop()
            note(f"[{e}; /reset starts over]")
        if not col0[0]:
            print(flush=True)
        turn += 1


def _show_args(arguments: str) -> str:
    """A tool call's arguments for the user: the single value of a one-argument call."""
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    if isinstance(args, dict) and len(args) == 1:
        return str(next(iter(args.values())))
    return arguments
