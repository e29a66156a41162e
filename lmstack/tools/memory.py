"""A conversation's memory: the turns that no longer fit the context window, kept searchable.

The LLM as an operating system: the context window is RAM, this is disk. When a conversation
outgrows the context, its oldest turns are paged out here (one small file per turn, in the same
index as the `search` tool: lmstack/tools/search.py) instead of being forgotten; before each
reply, the new user message is looked up here and the best page is paged back in: its turn comes
back into the context as the conversation's own messages, just before the new message
(`lmstack.chat.recall`). The `recall` tool lets a model look something up itself.

    memory = ConversationMemory()            # a temporary folder, removed by close()
    memory = ConversationMemory("chats/ada") # kept: a conversation resumed later still remembers
    memory.page_out(messages)                # one turn: its user and assistant text
    memory.page_in("where was Ada born")     # the best page's messages, marked {"recalled": True}
    memory.recall("where was Ada born")      # the best page, as the search tool shows it

Pages are not summarised: a page is the turn's own text (user and assistant messages; tool
traffic is left out: it is bulky and its result is in the assistant's answer). A page that was
paged in is clean, as an operating system says: its messages carry `recalled` and are not written
out a second time when they leave the context again.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lmstack.tools.registry import Tool
from lmstack.tools.search import SearchIndex, format_passages

PAGES, INDEX = "pages", "memory.sqlite"
ROLES = ("user", "assistant", "system")  # what a page keeps: one "role: text" line per message


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
                 if m["role"] in ROLES and (m.get("content") or "").strip() and not m.get("recalled")]
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

    def page_in(self, query: str) -> list[dict]:
        """The best page for `query` as the user and assistant messages it was made of (each marked
        `recalled`), or [] when nothing matches."""
        best = self.index.search(query, 1)
        if not best:
            return []
        try:
            text = (self.folder / PAGES / best[0].path).read_text(encoding="utf-8")
        except OSError:  # indexed, then removed behind our back
            return []
        out = []
        for line in text.splitlines():
            role, sep, content = line.partition(": ")
            if sep and role in ("user", "assistant") and content.strip():  # a turn, not a system message
                out.append({"role": role, "content": content, "recalled": True})
        return out

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
