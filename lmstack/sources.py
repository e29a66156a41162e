"""Where text comes from: files, folders (recursive), globs and Hugging Face datasets, read as
one string per document. The tokenizer trains on these documents and `lmstack data prepare`
tokenizes them (lmstack/data.py).

    .txt / .md    a file is one document
    .jsonl        one document per line: its `text_field` string
    conversations .jsonl of {"messages": [...]} rows (lmstack sft's data): one document each, its
                  messages' contents a line each (iter_conversation_texts: what a tokenizer should
                  also see when the model will be fine-tuned on them)
    .parquet      one document per row of the `text_field` column (needs pyarrow)
    owner/name    a Hugging Face dataset's train split, streamed (needs datasets and a network)

A file that cannot be used (unreadable, empty, binary, not UTF-8, no such field) is skipped with
its reason, never fatal; a name that matches nothing fails at once, before any work.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
from pathlib import Path

from lmstack.utils import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_HF_NAME = re.compile(r"[\w-][\w.-]*(/[\w.-]+)?(:[\w.-]+)?")  # owner/name:config


def resolve_inputs(inputs) -> list[tuple[str, str]]:
    """Expand files / folders (recursive) / globs / dataset names into (kind, path) sources.

    Fails fast (UserError) on anything that matches nothing, before any work starts.
    """
    sources: dict[tuple[str, str], None] = {}  # ordered set: a file named twice is read once
    for item in map(str, as_list(inputs)):
        p = Path(item)
        if p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise UserError(f"{item}: unsupported file type (use {', '.join(SUFFIXES)})")
            found = [p]
        elif p.is_dir():
            found = _files_under(p)
        elif glob.has_magic(item):
            found = [f for m in sorted(glob.glob(item, recursive=True))
                     for f in ([Path(m)] if Path(m).is_file() else _files_under(Path(m)))]
        elif _HF_NAME.fullmatch(item) and not item.lower().endswith(SUFFIXES):
            sources[("hf", item)] = None  # not on disk: maybe a Hugging Face dataset name
            continue
        else:
            raise UserError(f"input {item} not found")
        found = [f for f in found if f.suffix.lower() in SUFFIXES]
        if not found:
            raise UserError(f"{item} matched no {'/'.join(SUFFIXES)} files")
        sources.update({(f.suffix.lower()[1:], str(f)): None for f in found})
    # Optional dependencies, checked now rather than halfway through the corpus.
    for kind, name in sources:
        if kind == "parquet":
            _require("pyarrow.parquet", "reading .parquet files needs pyarrow: pip install pyarrow")
        if kind == "hf":
            _require("datasets", f"input {name} not found (no such file or folder; a Hugging Face "
                                 "dataset name needs `pip install datasets`)")
    return list(sources)


def _require(module: str, message: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(message) from None


def as_list(inputs) -> list:
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def _files_under(folder: Path) -> list[Path]:
    # Hidden files and folders (.git, .DS_Store, our own .tmp dirs) are never data.
    return sorted(f for f in folder.rglob("*") if f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(folder).parts))


def iter_documents(inputs, text_field: str = "text", skipped: list | None = None):
    """Yield each document's text, in a fixed order.

    Inputs are resolved now (so a typo fails immediately); files are read lazily. Files
    that are unusable (unreadable, empty, binary, not UTF-8, no such field) are not fatal:
    they are appended to `skipped` as {"path", "reason"}.
    """
    sources = resolve_inputs(inputs)
    skipped = [] if skipped is None else skipped
    readers = {"txt": _read_text, "md": _read_text, "jsonl": _read_jsonl,
               "parquet": _read_parquet, "hf": _read_hf}

    def gen():
        for kind, path in sources:
            yield from readers[kind](path, text_field, skipped)

    return gen()


def _skip(skipped: list, path, reason: str) -> None:
    skipped.append({"path": str(path), "reason": reason})


def _read_text(path, field, skipped):
    """A .txt / .md file is one document."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return _skip(skipped, path, f"unreadable ({e.strerror or e})")
    if b"\x00" in data:
        return _skip(skipped, path, "binary (contains NUL bytes)")
    try:
        text = data.decode("utf-8-sig")  # -sig: drop a byte-order mark, it is not text
    except UnicodeDecodeError as e:
        return _skip(skipped, path, f"not UTF-8 (invalid byte at offset {e.start})")
    if not text.strip():
        return _skip(skipped, path, "empty")
    yield text


def iter_conversation_texts(inputs, skipped: list | None = None):
    """Each conversation's text, in a fixed order: the contents of its messages, one per line (the
    words fine-tuning will show the model; the chat format's special tokens are not text). Inputs
    are .jsonl files (or folders, globs) of {"messages": [...]} rows; a row without a list of
    messages is counted and its file reported in `skipped`, as for documents."""
    sources = resolve_inputs(inputs)
    for kind, path in sources:
        if kind != "jsonl":
            raise UserError(f"{path}: conversations are read from .jsonl files of {{\"messages\": [...]}} rows")
    skipped = [] if skipped is None else skipped

    def gen():
        for _, path in sources:
            yield from _read_jsonl(path, "messages", skipped, text_of=_conversation_text)

    return gen()


def message_contents(messages: list) -> list[str]:
    """The string contents of a conversation's messages, in order (a tool call's message has none)."""
    return [m["content"] for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)]


def _conversation_text(messages) -> str | None:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None
    return "\n".join(filter(None, message_contents(messages)))


def _read_jsonl(path, field, skipped, text_of=None):
    """One JSON object per line; the document is its `field` string (or `text_of` the field's value,
    None where it has none)."""
    good = bad = missing = 0
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:  # bad JSON or bad UTF-8
                    bad += 1
                    continue
                text = row.get(field) if isinstance(row, dict) else None
                if text_of is not None:
                    text = text_of(text)
                if not isinstance(text, str):
                    missing += 1
                elif text:
                    good += 1
                    yield text
    except OSError as e:
        return _skip(skipped, path, f"unreadable after {good} documents ({e.strerror or e})")
    lacking = f"a list of '{field}'" if text_of else f"a string '{field}' field"
    problems = ([f"{bad} bad JSON line(s)"] if bad else []) + \
               ([f"{missing} line(s) without {lacking}"] if missing else [])
    if problems:
        _skip(skipped, path, ("no usable lines: " if not good else "partly skipped: ") + ", ".join(problems))
    elif not good:
        _skip(skipped, path, "empty")


def _read_parquet(path, field, skipped):
    """Column `field`, read one record batch at a time (never the whole file)."""
    import pyarrow.parquet as pq

    good = 0
    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            return _skip(skipped, path, f"no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text:
                    good += 1
                    yield text
    except (OSError, ValueError) as e:  # pyarrow's errors subclass these
        return _skip(skipped, path, f"unreadable parquet after {good} documents ({str(e).splitlines()[0]})")
    if not good:
        _skip(skipped, path, "empty")


def _read_hf(name, field, skipped):
    """A Hugging Face dataset, streamed: `name` or `name:config`, split train."""
    import datasets

    repo, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(repo, config or None, split="train", streaming=True)
    except Exception as e:  # offline, unknown name, missing config: one line for the user
        raise UserError(f"input {name} not found on disk, and as a Hugging Face dataset: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    good = 0
    for row in rows:
        text = row.get(field)
        if isinstance(text, str) and text:
            good += 1
            yield text
    if not good:
        _skip(skipped, name, f"no string '{field}' field in any row")


def skip_summary(skipped: list[dict], listed_in: str | None = None) -> str:
    """"; skipped PATH: REASON (+N more)" for the one-line summaries (or ""); `listed_in` names
    the file that lists them all, where the command writes one (data prepare's manifest.json)."""
    if not skipped:
        return ""
    s = skipped[0]
    where = f" in {listed_in}" if listed_in else ""
    more = f" (+{len(skipped) - 1} more{where})" if len(skipped) > 1 else ""
    return f"; skipped {s['path']}: {s['reason']}{more}"
