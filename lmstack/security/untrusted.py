"""Untrusted text in a conversation, and spotlighting's marks (Hines et al. 2024): the format
the defences (lmstack/security/hierarchy.py) write and the attacks (injection.py) know.

Which text is untrusted: a `tool` message's content, and in a `user` message what follows its
first line break (the convention for a pasted document: the request on the first line, then what
was pasted). Spotlighting *delimits* an untrusted text (between « and ») and *datamarks* it (a ^
before every space, so every word of it carries the mark). The marks are plain characters that
go through the tokenizer's `encode` like any text, so they can never become a special-token id.
The ^ sits *before* the space so each word keeps its space-prefixed token: marking costs about
one token per word (a ^ in place of the space would split every word and cost ~3x).
"""

from __future__ import annotations

BEGIN, END, MARK = "«", "»", "^"


def datamark(text: str, mark: bool = True) -> str:
    """Delimit and (with `mark`) datamark one untrusted text. The marker characters are first
    removed from it, so a document cannot forge its own end (`unmark(datamark(t)) == t` for a t
    without them)."""
    clean = text.replace(BEGIN, "").replace(END, "").replace(MARK, "")
    return BEGIN + (clean.replace(" ", MARK + " ") if mark else clean) + END


def unmark(text: str) -> str:
    """The text `datamark` was given (less any marker characters it held)."""
    if not is_marked(text):
        raise ValueError("not a datamarked text")
    return text[len(BEGIN):-len(END)].replace(MARK + " ", " ")


def is_marked(text: str) -> bool:
    return len(text) >= 2 and text.startswith(BEGIN) and text.endswith(END)


def untrusted(msg: dict) -> tuple[str, str] | None:
    """(the trusted prefix, the untrusted text) of a message, or None if it has none: a tool
    result is untrusted whole; in a user message, what follows the first line break."""
    content = msg.get("content")
    if not isinstance(content, str) or not content:
        return None
    if msg.get("role") == "tool":
        return "", content
    if msg.get("role") == "user" and "\n" in content:
        head, _, rest = content.partition("\n")
        return (head + "\n", rest) if rest else None
    return None


def untrusted_texts(messages: list[dict]) -> list[str]:
    """The untrusted texts of a conversation (what a classifier on inputs judges)."""
    return [part[1] for m in messages if (part := untrusted(m)) is not None]


def replace(msg: dict, prefix: str, text: str) -> dict:
    """`msg` with its untrusted text (after `prefix`) replaced by `text`."""
    return {**msg, "content": prefix + text}
