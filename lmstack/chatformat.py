"""Conversations as a model reads and writes them: the chat format, once.

    <|bos|><|system|> You are helpful.<|end|><|user|> What is 2 + 3?<|end|>
    <|assistant|><|tool_call|>{"name": "calculator", "arguments": {"expression": "2 + 3"}}<|/tool_call|><|end|>
    <|tool|> 5<|end|><|assistant|> 2 + 3 = 5.<|end|>

Everything that turns messages into token ids or a reply back into messages goes through here:
SFT's loss mask, the engine's callers (chat, eval, serve, RL rollouts), the exports.
- `ChatFormat` (get one with `chat_format(tok)`, for the model's tokenizer): `render` (ids and
  the mask of what the assistant writes), the ids that end a turn, the Jinja twin of `render`
  (what Hugging Face and llama.cpp run), and `parse`/`parser` for replies.
- `ReplyParser`: ONE incremental parser of a reply, token by token, into the text a reader sees
  and its tool calls.
- the tool loop that drives a format turn by turn is in lmstack/toolloop.py.
- `row_prompt` / `split_row`: ONE reading of a jsonl row ({messages}, {prompt[, completion]},
  {question}) as a conversation.

Roles and boundaries are special ids inserted here by id; message text goes through `encode`,
so a user typing "<|end|>" gets plain text. Message text is encoded after a space (`LEAD`), so
that its first word is the token it is in running text: pretraining reads "Q: When was ..." as
" When", and a message "When was ..." encoded bare would start with "W" + "hen", tokens the base
barely saw (the README's "One token for a word" measures what that cost). A reply's text loses
that one space when it is parsed. Messages render independently, so appending a
message never changes how the earlier ones render (a prefix stays a prefix).

An imported model keeps its own format (`TemplateFormat`, from its folder's chat_format.json):
its Jinja chat template run as transformers runs it, the rendered text tokenized as
transformers tokenizes it (split at the special tokens, each piece encoded on its own), except
that a special token spelled inside a message stays text. Its loss mask is found by rendering
the conversation up to each assistant message and diffing; it stops at the model's own
end-of-turn tokens. `chat_format(tok)` gives whichever the model has.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Callable

ROLES = ("system", "user", "assistant", "tool")
# A reply ends at <|end|>, or at any token that can only begin something else.
TURN_ENDS = ("<|end|>", "<|eos|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")

# A message's text follows its role's token after one space (see the module's docstring).
LEAD = " "

# `ChatFormat.render` in Jinja: `<|bos|>`, then `<|role|> content<|end|>` per message (an
# assistant's tool calls as <|tool_call|>{"name": ..., "arguments": ...}<|/tool_call|> after its
# content), then `<|assistant|>` for the generation prompt. llama.cpp and llama-cpp-python, and
# transformers' apply_chat_template tokenize the rendered text with special tokens recognised (so
# there, unlike in `render`, text spelling a special token becomes it). Tool-call arguments as a
# dict render with tojson (json.dumps' separators, as `render`), as a JSON string as written.
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] %}{{ '" + LEAD + "' + message['content'] }}{% endif %}"
    "{% if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] if call['function'] is defined else call %}"
    "{{ '<|tool_call|>{\"name\": ' }}{{ fn['name'] | tojson }}{{ ', \"arguments\": ' }}"
    "{% if fn['arguments'] is string %}{{ fn['arguments'] }}{% else %}{{ fn['arguments'] | tojson }}{% endif %}"
    "{{ '}<|/tool_call|>' }}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class ChatFormatError(ValueError):
    """A malformed conversation (unknown role, missing or empty content, bad tool call)."""


# --- checking messages ------------------------------------------------------------------------

def tool_call_text(call: dict) -> str:
    """One OpenAI-style tool call -> the canonical JSON the model reads and writes."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError("a tool call needs function.name")
    args = fn.get("arguments", "{}")
    try:
        if isinstance(args, str):
            args = json.loads(args or "{}")
        return json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
    except (ValueError, RecursionError):  # not JSON; nested deeper than Python's parser goes
        raise ChatFormatError(f"tool call {fn['name']}: arguments are not valid JSON") from None


def _checked(i: int, m) -> tuple[str, str, list[str]]:
    """Message i -> (role, content, its tool calls' JSON); ChatFormatError says what is wrong."""
    role = m.get("role") if isinstance(m, dict) else None
    if role not in ROLES:
        raise ChatFormatError(f"message {i}: role must be one of {', '.join(ROLES)} (got {role!r})")
    content, calls = m.get("content"), m.get("tool_calls") or []
    if content is not None and not isinstance(content, str):
        raise ChatFormatError(f"message {i}: content must be a string")
    if not isinstance(calls, list):
        raise ChatFormatError(f"message {i}: tool_calls must be a list")
    if calls and role != "assistant":
        raise ChatFormatError(f"message {i}: only assistant messages carry tool_calls")
    if not (content or "").strip() and not calls:
        raise ChatFormatError(f"message {i} ({role}): empty content")
    if "weight" in m and (role != "assistant" or isinstance(m["weight"], bool) or m["weight"] not in (0, 1)):
        raise ChatFormatError(f"message {i}: weight must be 0 or 1, on an assistant message")
    return role, content or "", [tool_call_text(c) for c in calls]


def trained(m: dict) -> bool:
    """Whether fine-tuning learns to write message m: an assistant message, unless it says
    "weight": 0 (OpenAI's fine-tuning format: the message is context, not a target)."""
    return m["role"] == "assistant" and m.get("weight", 1) == 1


def check_messages(messages) -> None:
    """Raise ChatFormatError unless `messages` is a conversation `render` can render."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        _checked(i, m)


# --- the format -------------------------------------------------------------------------------

class _Replies:
    """What both formats do the same way with a reply: parse it (its text and tool calls)."""

    lead = ""  # what a message's text follows (ChatFormat: LEAD); a reply's text loses it

    def text_ids(self, text: str) -> list[int]:
        """A message's text as the format encodes it (an imported template's: as written)."""
        return self.tok.encode(self.lead + text)

    def parser(self, call_id: Callable[[int], str] = lambda k: f"call_{k}") -> "ReplyParser":
        return ReplyParser(self, call_id)

    def parse(self, ids, call_id: Callable[[int], str] = lambda k: f"call_{k}") -> "ReplyParser":
        """A whole reply at once; its text is the decoding of the ids outside tool calls."""
        p = ReplyParser(self, call_id)
        for t in ids:
            p.push(t)
        p.text = self.tok.decode(p.visible, skip_special=True).removeprefix(self.lead)
        return p


class ChatFormat(_Replies):
    """lmstack's chat format for one tokenizer (its special tokens, found by name). Callers get
    it from the model they loaded (`chat_format(tok)`), never from a module-level constant, so a
    model may carry a format of its own."""

    jinja = CHAT_TEMPLATE_JINJA
    lead = LEAD
    tools = True  # it has a tool-call format: <|tool_call|>{"name", "arguments"}<|/tool_call|>

    def __init__(self, tok):
        self.tok = tok
        sid = self.special = tok.special_ids
        self.bos_id, self.end_id, self.assistant_id = sid["<|bos|>"], sid["<|end|>"], sid["<|assistant|>"]
        self.call_open, self.call_close = sid["<|tool_call|>"], sid["<|/tool_call|>"]
        self.stop_ids = frozenset(sid[t] for t in TURN_ENDS)  # the ids that end an assistant turn

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """messages -> (ids, mask). mask[i] is 1 on what the assistant must learn to write: its
        content, its tool calls and its closing <|end|> (so it learns to stop); 0 elsewhere, and on
        an assistant message with "weight": 0 (`trained`).
        add_generation_prompt appends <|assistant|> for the model to continue from. `tools` (the
        OpenAI tools list) is not rendered: an lmstack model learns its tools in training."""
        if not isinstance(messages, list) or not (messages or add_generation_prompt):
            raise ChatFormatError("messages must be a non-empty list")
        sid, encode = self.special, self.tok.encode
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            role, content, calls = _checked(i, m)
            body = self.text_ids(content) if content else []
            for call in calls:
                body += [self.call_open] + encode(call) + [self.call_close]
            body.append(self.end_id)
            train = int(trained(m))
            ids += [sid[f"<|{role}|>"]] + body
            mask += [0] + [train] * len(body)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(0)
        return ids, mask

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The ids a reply to `messages` continues: the conversation and the generation prompt."""
        return self.render(messages, add_generation_prompt=True, tools=tools)[0]

    def render_replies(self, messages: list[dict], replies: list) -> list[tuple[list[int], list[int]]]:
        """The conversation followed by each reply (an assistant message's text, or the message:
        `reply_message`) -> [(ids, mask)], the mask 1 on that reply and its <|end|> only.
        Messages render on their own, so the conversation is rendered once."""
        p_ids, _ = self.render(messages)
        out = []
        for a in replies:
            a_ids, a_mask = self.render([reply_message(a)])
            out.append((p_ids + a_ids[1:], [0] * len(p_ids) + a_mask[1:]))
        return out

    def render_more(self, before: list[dict], messages: list[dict], tools=None) -> list[int]:
        """The ids that `messages` add after the conversation `before` (which ends with the
        assistant's reply, closed by its end-of-turn id), then the generation prompt: what
        continues a sampled reply with, e.g., tool results. (Here messages render on their own.)"""
        return self.render(messages, add_generation_prompt=True)[0][1:]


# --- an imported model's own format ---------------------------------------------------------------

DEFUSE = "\ufdd0"  # a Unicode noncharacter: put inside a special token's text in a message, it stops being one


def _raise(message):
    raise ChatFormatError(f"the model's chat template refused the conversation: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str):
    """A chat template compiled as transformers compiles it: a sandboxed, immutable Jinja
    environment, trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception and
    strftime_now; `{% generation %}` blocks render their body (the mask is found by diffing)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatFormatError(f"the model's chat template does not compile: {e}") from None


def _defused(x, specials: list[str]):
    """Every string in a message (content, tool calls) with each special token's text broken by DEFUSE."""
    if isinstance(x, str):
        for t in specials:
            if t in x:
                x = x.replace(t, t[0] + DEFUSE + t[1:])
        return x
    if isinstance(x, dict):
        return {k: _defused(v, specials) for k, v in x.items()}
    if isinstance(x, list):
        return [_defused(v, specials) for v in x]
    return x


class TemplateFormat(_Replies):
    """An imported model's own chat format (tok.own: its chat_format.json): its Jinja template,
    special tokens and end-of-turn ids. The same surface as ChatFormat."""

    def __init__(self, tok):
        own = self.own = tok.own
        self.tok, self.jinja = tok, own.template
        self.template = _compile(own.template)
        self.bos_id = tok.bos_id
        stops = [tok.token_id(t) for t in own.stop_tokens] or [tok.eos_id]
        if None in stops:
            raise ChatFormatError("the model names no token that ends an assistant's reply (stop_tokens, EOS)")
        self.end_id, self.stop_ids = stops[0], frozenset(stops)
        # Hermes-style tool calls (Qwen 2.5, Hermes, SmolLM3): <tool_call>{"name", "arguments"}</tool_call>,
        # when the template writes them and both markers are single tokens; otherwise the model has no
        # tool format lmstack can parse, and `tools` is False.
        o, c = tok.find("<tool_call>"), tok.find("</tool_call>")
        self.tools = o is not None and c is not None and "<tool_call>" in own.template
        self.call_open, self.call_close = (o, c) if self.tools else (-1, -1)
        specials = sorted(tok.specials, key=len, reverse=True)
        self._specials = specials
        self._split = re.compile("|".join(map(re.escape, specials))) if specials else None
        added = tok.added_tokens()
        self._lstrip = {t.content for t in added if t.special and t.lstrip}
        self._rstrip = {t.content for t in added if t.special and t.rstrip}

    def text(self, messages: list[dict], add_generation_prompt: bool = False, tools=None) -> str:
        """The template's output, as transformers' apply_chat_template(tokenize=False) gives it."""
        ctx = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        for name in ("bos_token", "eos_token", "pad_token"):
            if getattr(self.own, name) is not None:  # absent ones are undefined, as in transformers
                ctx[name] = getattr(self.own, name)
        if tools:
            ctx["tools"] = tools
        try:
            return self.template.render(**ctx)
        except ChatFormatError:
            raise
        except Exception as e:  # a template error, or a template indexing a message that is not there
            raise ChatFormatError(f"the model's chat template failed: {type(e).__name__}: {e}") from None

    def _ids(self, text: str) -> list[int]:
        """Rendered text -> ids: split at the special tokens (all of them the template's own: a
        message's were defused), each piece encoded with no special token recognised."""
        if self._split is None:  # no special tokens: nothing was defused
            return self.tok.encode(text) if text else []
        ids, pos, pieces = [], 0, []
        for m in self._split.finditer(text):
            pieces.append(text[pos:m.start()])
            pieces.append(m.group())
            pos = m.end()
        pieces.append(text[pos:])
        for k in range(1, len(pieces), 2):  # added tokens' lstrip / rstrip take the whitespace beside them
            if pieces[k] in self._lstrip:
                pieces[k - 1] = pieces[k - 1].rstrip()
            if pieces[k] in self._rstrip:
                pieces[k + 1] = pieces[k + 1].lstrip()
        for k, piece in enumerate(pieces):
            if k % 2:
                ids.append(self.tok.specials[piece])
            elif piece:
                for t in self._specials:
                    piece = piece.replace(t[0] + DEFUSE + t[1:], t)
                ids += self.tok.encode(piece)
        return ids

    def _encode(self, messages, add_generation_prompt: bool, tools=None) -> list[int]:
        return self._ids(self.text(_defused(messages, self._specials), add_generation_prompt, tools))

    def _checked_all(self, messages, add_generation_prompt: bool) -> None:
        if not isinstance(messages, list) or not (messages or add_generation_prompt):
            raise ChatFormatError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            _checked(i, m)

    def _reply(self, before: list[int], upto: list[int], whole: list[int]) -> range:
        """Where an assistant message's own tokens are: what `upto` (the conversation through it)
        adds after `before` (the conversation before it, with the generation prompt), up to and
        including its first end-of-turn id; both must start `whole`."""
        if upto[:len(before)] != before or whole[:len(upto)] != upto:
            raise ChatFormatError("the model's chat template does not render the start of a conversation as "
                                  "the start of the whole, so the assistant's tokens cannot be found")
        end = next((k + 1 for k in range(len(before), len(upto)) if upto[k] in self.stop_ids), len(upto))
        return range(len(before), end)

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The ids a reply to `messages` continues (no mask: the template runs once)."""
        self._checked_all(messages, True)
        return self._encode(messages, True, tools)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools=None):
        """messages -> (ids, mask), as ChatFormat.render. The mask covers what each assistant
        message adds after the conversation before it (rendered with the generation prompt), up to
        and including its first end-of-turn id: its content, its tool calls and its stop."""
        self._checked_all(messages, add_generation_prompt)
        ids = self._encode(messages, add_generation_prompt, tools)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if trained(m):
                for k in self._reply(self._encode(messages[:i], True, tools),
                                     self._encode(messages[:i + 1], False, tools), ids):
                    mask[k] = 1
        return ids, mask

    def render_replies(self, messages: list[dict], replies: list) -> list[tuple[list[int], list[int]]]:
        """The conversation followed by each reply -> [(ids, mask)], the mask on that reply only
        (see ChatFormat.render_replies): the prompt rendered once, each conversation once."""
        before = self.prompt(messages)
        out = []
        for a in replies:
            whole = messages + [reply_message(a)]
            self._checked_all(whole, False)
            ids = self._encode(whole, False)
            span = self._reply(before, ids, ids)
            out.append((ids, [int(k in span) for k in range(len(ids))]))
        return out

    def render_more(self, before: list[dict], messages: list[dict], tools=None) -> list[int]:
        """The ids that continue `before` (ending with the assistant's reply, closed by its
        end-of-turn id) with `messages`, then the generation prompt (see ChatFormat.render_more)."""
        a, b = self._encode(before, False, tools), self._encode(before + messages, True, tools)
        ends = [k for k, t in enumerate(a) if t in self.stop_ids]
        if b[:len(a)] != a or not ends:
            raise ChatFormatError("the model's chat template does not render the start of a conversation as "
                                  "the start of the whole, so a reply cannot be continued")
        return b[ends[-1] + 1:]


def chat_format(tok) -> ChatFormat | TemplateFormat:
    """The chat format of the model whose tokenizer is `tok`: an imported model's own template
    (its folder's chat_format.json names one), else lmstack's."""
    if tok.own is not None and tok.own.template is not None:
        return TemplateFormat(tok)
    return ChatFormat(tok)


def render_chat(tok, messages: list[dict], add_generation_prompt: bool = False):
    """`chat_format(tok).render(messages, add_generation_prompt)`: (ids, mask)."""
    return chat_format(tok).render(messages, add_generation_prompt)


# --- replies: text and tool calls -----------------------------------------------------------------

def parse_tool_call(text: str, call_id: str) -> dict | None:
    """The JSON between <|tool_call|> and <|/tool_call|> -> an OpenAI tool call, or None if
    it is not {"name": str, "arguments": {...}}."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # a model can write "[[[[..." past the parser's depth
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, (dict, str)):
        return None
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": obj["name"], "arguments": args}}


class ReplyParser:
    """An assistant reply, token by token -> the text a reader sees and the tool calls in it.

    `push(token, text)` takes one generated id (None when the reply stopped on a stop id, which
    is not part of it) with the text the engine decoded for it, and returns the part of that
    text a reader sees: text between <|tool_call|> and <|/tool_call|> is not shown (the text
    that arrives with the opening marker came before it), and the format's `lead` before the
    first text is not shown either. Each closed call is parsed into
    `calls` (an OpenAI tool call, id from `call_id(k)`) or, when its JSON is not a call, `bad`.
    A call still open when the reply ends is neither; `opened` counts every call begun."""

    def __init__(self, fmt: ChatFormat, call_id: Callable[[int], str]):
        self.fmt, self.call_id = fmt, call_id
        self.ids: list[int] = []  # every id pushed
        self.visible: list[int] = []  # the ids outside tool calls
        self.text = ""  # the pushed text outside tool calls
        self.calls: list[dict] = []
        self.bad: list[str] = []  # the text of closed calls that did not parse
        self.opened = 0
        self._call: list[int] | None = None  # the ids of the call being written
        self._lead = fmt.lead  # still to drop from the start of the text

    def push(self, token: int | None, text: str = "") -> str:
        fmt = self.fmt
        if token is not None:
            self.ids.append(token)
        if token == fmt.call_open:
            self._call, self.opened = [], self.opened + 1
        elif token == fmt.call_close and self._call is not None:
            body, self._call = fmt.tok.decode(self._call), None
            call = parse_tool_call(body, self.call_id(len(self.calls)))
            if call is not None:
                self.calls.append(call)
            else:
                self.bad.append(body)
            return ""
        elif self._call is not None:
            if token is not None:
                self._call.append(token)
            return ""
        elif token is not None:
            self.visible.append(token)
        if text and self._lead:
            text, self._lead = text.removeprefix(self._lead), ""
        self.text += text
        return text


# --- rows of jsonl files as conversations -----------------------------------------------------

def prompt_messages(prompt) -> list[dict]:
    """A `prompt` field (a string: one user message; or a list of messages) -> messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ChatFormatError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise ChatFormatError("prompt must be a non-empty string or a non-empty list of messages")


def reply_message(reply) -> dict:
    """A comparison's answer -> the assistant message it is: a string is its text; an object is
    the message itself ({"content": text or null, "tool_calls": [...]}, e.g. a reply that only
    calls a tool, which a comparison may reject)."""
    if isinstance(reply, dict):
        return {"role": "assistant", "content": reply.get("content"), "tool_calls": reply.get("tool_calls") or []}
    return {"role": "assistant", "content": reply}


def reply_problem(reply) -> str | None:
    """Why a comparison's answer (a non-empty string, or an assistant message object) cannot be
    rendered (None when it can)."""
    if isinstance(reply, str):
        return None if reply.strip() else "must be a non-empty string or an assistant message"
    if not isinstance(reply, dict) or reply.get("role", "assistant") != "assistant":
        return "must be a non-empty string or an assistant message"
    try:
        _checked(0, reply_message(reply))
    except ChatFormatError as e:
        return str(e).removeprefix("message 0: ").removeprefix("message 0 (assistant): ")
    return None


def prompt_problem(prompt) -> str | None:
    """Why a `prompt` (a string or a list of messages) cannot be rendered (None when it can)."""
    try:
        check_messages(prompt_messages(prompt))
    except ChatFormatError as e:
        return f"bad prompt: {e}"
    return None


def split_row(row) -> tuple[list[dict], list[dict]]:
    """A jsonl row in the ecosystem's shapes -> (the conversation it asks to answer, the answer
    it holds: [] when none). The shapes, first match wins:
        {"messages": [...]}                        the trailing assistant messages are the answer
        {"prompt": str | [...], "completion": str | [...]}
        {"prompt": str | [...]}                    (a comparisons row: chosen / rejected are its answers)
        {"question": str}                          a world probe
    Strings are one user (prompt) or assistant (completion) message. ChatFormatError when the
    row is none of these; the messages themselves are checked when they are rendered."""
    if not isinstance(row, dict):
        raise ChatFormatError("row is not a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise ChatFormatError("messages must be a non-empty list")
        k = len(msgs)
        while k and isinstance(msgs[k - 1], dict) and msgs[k - 1].get("role") == "assistant":
            k -= 1
        return list(msgs[:k]), list(msgs[k:])
    if "prompt" in row:
        prompt, answer = row["prompt"], row.get("completion", [])
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        answer = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else answer
        if not isinstance(prompt, list) or not isinstance(answer, list):
            raise ChatFormatError("prompt and completion must be strings or lists of messages")
        return prompt, answer
    if "question" in row:
        return [{"role": "user", "content": row["question"]}], []
    raise ChatFormatError("no messages, prompt or question field")


def row_prompt(row) -> list[dict]:
    """The conversation a row asks a model to answer (`split_row` without the answer): it must
    be a well-formed conversation that ends with a user (or tool) message."""
    msgs, _ = split_row(row)
    if not msgs:
        raise ChatFormatError("no message before the assistant's reply")
    check_messages(msgs)
    if msgs[-1].get("role") not in ("user", "tool"):
        raise ChatFormatError("the conversation does not end with a user (or tool) message")
    return msgs
