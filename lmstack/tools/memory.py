"""A conversation's memory: the turns that no longer fit the context window, kept searchable.

The LLM as an operating system: the context window is RAM, this is disk. When a conversation
outgrows the context, its oldest turns are paged out here (one small file per turn, in the same
index as the `search` tool: lmstack/tools/search.py) instead of being forgotten; before each
reply, the new user message is looked up here and the best page comes back into the context as
a `search` call and its result (`lmstack.assistant.retrieved`), the shape the world's assistant
learned to read. The `recall` tool lets a model look something up itself.

    memory = ConversationMemory()            # a temporary folder, removed by close()
    memory = ConversationMemory("chats/ada") # kept: a conversation resumed later still remembers
    memory.page_out(messages)                # one turn: its user and assistant text
    memory.recall("where was Ada born")      # the best page, as the search tool shows it

Pages are not summarised: a page is the turn's own text (user and assistant messages; tool
traffic is left out: it is bulky and its result is in the assistant's answer).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lmstack.tools.registry import Tool
from lmstack.tools.search import SearchIndex, format_passages

PAGES, INDEX = "pages", "memory.sqlite"


class ConversationMemory:
    def __init__(self, folder=None, k: int = 1, max_chars: int = 700):
        self._temp = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="lmstack-memory-") if folder is None else folder)
        (self.folder / PAGES).mkdir(parents=True, exist_ok=True)
        self.index = SearchIndex(self.folder / INDEX, create=True)
        self.k, self.max_chars = k, max_chars
        self.pages = len(list((self.folder / PAGES).glob("page-*.md")))

    def page_out(self, messages: list[dict]) -> None:
        """Keep these messages (a turn or more) as one page."""
        lines = [f"{m['role']}: {' '.join(m['content'].split())}" for m in messages
                 if m["role"] in ("user", "assistant", "system") and (m.get("content") or "").strip()]
        if not lines:
            return
        self.pages += 1
        (self.folder / PAGES / f"page-{self.pages:05d}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.index.update(self.folder / PAGES)

    def clear(self) -> None:
        """Forget every page."""
        for page in (self.folder / PAGES).glob("page-*.md"):
            page.unlink()
        self.index.update(self.folder / PAGES)
        self.pages = 0

    def recall(self, query: str) -> str:
        """The best page(s) for `query`, as the search tool formats passages ("no matching passages")."""
        return format_passages(self.index.search(query, self.k), self.max_chars)

    def tool(self) -> Tool:
        return Tool(name="recall", fn=lambda query: self.recall(query if isinstance(query, str) else ""),
                    description="Look up something said earlier in this conversation that no longer fits the "
                                "context: the best matching earlier turn.",
                    parameters={"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]})

    def close(self) -> None:
        self.index.close()
        if self._temp:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
