"""An assistant: a chat model plus instructions, knowledge files and tools, in one folder (the
"GPTs" idea). `lmstack chat --model DIR`, `lmstack serve --model DIR` or `--assistant DIR` (served
as its own model id, its tools run by the server) and the web app run it.

    lmstack assistant create --model runs/speedrun/chat --name helper --instructions rules.md \\
        --knowledge ~/notes --tools calculator,python,search --out assistants/helper

The folder (it travels whole: the index holds its knowledge folder relative to itself):
    assistant.json    {"name", "model", "instructions", "tools", "retrieve", ...}
    knowledge/        a copy of the knowledge files (.txt, .md, .jsonl, .pdf)
    knowledge.sqlite  the search index over knowledge/ (lmstack/tools/search.py, BM25)

How it answers: the instructions are the conversation's system message (a system message the
conversation itself starts with, a client's or the web app's, is added after them in the same
message: the caller's words extend the instructions, never replace them, and a chat template
that takes one system message takes it); with knowledge and `retrieve` (the default), every user
message is looked up in the knowledge before the model replies, and the best passage is put in
the conversation as a `search` call of the message and its result, just before the message
(`retrieved`: a tool result, the least trusted role, and the question last, where a small model
reads it); the `search` tool is also there for the model to call. A small model that cannot write
a query (copy a name) still gets its knowledge this way.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmstack.tools import ToolRegistry, default_registry
from lmstack.tools.search import SUFFIXES, SearchIndex, search_tool
from lmstack.utils import UserError, atomic_output_dir, atomic_write_json, check_output_dir

CONFIG, KNOWLEDGE, INDEX = "assistant.json", "knowledge", "knowledge.sqlite"
TOOLS = ("calculator", "python", "search")
SEARCH_K, SEARCH_CHARS = 1, 700  # what one retrieval shows: the world's assistant data shows one passage
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Assistant:
    folder: Path
    name: str  # its model id when served
    model: Path  # the chat model folder
    instructions: str
    tools: list[str]
    retrieve: bool  # look up every user message in the knowledge (needs knowledge)

    @property
    def has_knowledge(self) -> bool:
        return (self.folder / INDEX).is_file()

    def registry(self) -> ToolRegistry:
        """Its tools: calculator and python as everywhere, search over its knowledge."""
        reg = default_registry().subset([t for t in self.tools if t != "search"])
        if "search" in self.tools and self.has_knowledge:
            reg = reg.with_tools(self.search_tool())
        return reg

    def system(self, extra: str | None = None) -> str | None:
        """The system message: the instructions, then a blank line and the caller's own (`extra`)."""
        return "\n\n".join(t for t in (self.instructions, (extra or "").strip()) if t) or None

    def search_tool(self):
        return search_tool(self.folder / INDEX, k=SEARCH_K, max_chars=SEARCH_CHARS)

    def prepare(self, messages: list[dict], finder=None) -> list[dict]:
        """The conversation the model sees: the instructions first (joined with the system
        message the conversation starts with, if any: `system`), then (retrieving) the last user
        message's lookup in the knowledge, when the conversation ends with a user message."""
        out = list(messages)
        if self.instructions and out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": self.system(out[0]["content"])}
        elif self.instructions:
            out.insert(0, {"role": "system", "content": self.instructions})
        if self.retrieve and self.has_knowledge and out and out[-1]["role"] == "user":
            out = retrieved(out, finder or self.search_tool(), f"knowledge_{len(out)}")
        return out


def retrieved(conv: list[dict], finder, call_id: str) -> list[dict]:
    """`conv` with retrieval done for the model: a `search` call of the last (user) message and its
    result, put just before that message, so that the question is the last thing the model reads
    before it answers (a small model reads the passage far better there than after the question:
    README, "Retrieval before the question"). Nothing is added when the search finds nothing."""
    query = conv[-1]["content"]
    result = finder.fn(query=query)
    if result.startswith("no matching passages"):
        return conv
    call = {"id": call_id, "type": "function", "function": {"name": "search", "arguments": json.dumps({"query": query})}}
    return conv[:-1] + [{"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call_id, "content": result}] + conv[-1:]


def added(after: list[dict], before: list[dict]) -> list[dict]:
    """The messages of `after` (a conversation `prepare` or `lmstack.chat.recall` returned) that are
    not the same objects as any in `before` (the one they were given): what they put in."""
    had = {id(m) for m in before}
    return [m for m in after if id(m) not in had]


def create(model, out, name: str | None = None, instructions=None, knowledge=None, tools=("calculator", "search"),
           retrieve: bool = True, force: bool = False) -> Assistant:
    """Write an assistant folder (module doc); `instructions` a file, `knowledge` a folder."""
    from lmstack.modelio import lineage  # the model folder's kind, checked now, not at first chat

    model = Path(model).resolve()
    if not (model / "config.json").is_file():
        raise UserError(f"--model {model} is not a model folder (no config.json)")
    if not lineage(model).get("chat"):
        raise UserError(f"--model {model} is not a chat model (an assistant needs one trained to chat)")
    tools = [t.strip() for t in (tools.split(",") if isinstance(tools, str) else tools) if t.strip()]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise UserError(f"--tools: unknown {', '.join(unknown)} (known: {', '.join(TOOLS)})")
    name = name or Path(out).name
    if not _NAME.match(name):
        raise UserError(f"--name {name!r}: letters, digits, '.', '_' and '-' only (it is a model id), at most 64")
    text = ""
    if instructions:
        try:
            text = Path(instructions).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--instructions {instructions}: cannot read ({e})") from None
    if knowledge is not None and not Path(knowledge).is_dir():
        raise UserError(f"--knowledge {knowledge} is not a folder")
    if "search" in tools and knowledge is None:
        tools.remove("search")  # nothing to search
    check_output_dir(out, force)
    with atomic_output_dir(out, force) as tmp:
        if knowledge is not None:
            shutil.copytree(knowledge, tmp / KNOWLEDGE, ignore=_not_knowledge)
            with SearchIndex(tmp / INDEX, create=True) as idx:
                report = idx.update(tmp / KNOWLEDGE)
            if not report.chunks_total:
                raise UserError(f"--knowledge {knowledge}: no passages to index ({', '.join(SUFFIXES)} files)")
        atomic_write_json(tmp / CONFIG, {"name": name, "model": str(model), "instructions": text, "tools": tools,
                                         "retrieve": bool(retrieve and knowledge is not None)})
    return load(out)


def _not_knowledge(folder, names):
    return [n for n in names if n.startswith(".") or (Path(folder, n).is_file() and not n.lower().endswith(SUFFIXES))]


def load(folder) -> Assistant:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"{folder} is not an assistant folder (no {CONFIG}; make one with lmstack assistant create)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        a = Assistant(folder, cfg["name"], Path(cfg["model"]), cfg.get("instructions", ""), list(cfg.get("tools", [])),
                      bool(cfg.get("retrieve", False)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e})") from None
    if not (a.model / "config.json").is_file():
        raise UserError(f"{path}: its model {a.model} is not there any more")
    return a


def knowledge_stats(a: Assistant) -> dict | None:
    if not a.has_knowledge:
        return None
    with SearchIndex(a.folder / INDEX) as idx:
        return idx.stats()


def is_assistant(folder) -> bool:
    return (Path(folder) / CONFIG).is_file()
