"""The world's library: what the assistant's `search` tool reads, and its index.

    library/people.jsonl   one reference biography per person (every sentence names them), then
                           each of their children, named child first ("C is the son of P": the
                           direction the reversal group's text allows)
    library/places.jsonl   an entry per city, company and university
    library.sqlite         the search index over library/ (lmstack/tools/search.py, BM25)

Every person is in it, held-out people included: their facts are in the pretraining prose but
never in a conversation, so "closed book vs with search" on held-out people measures reading
(`facts_qa_search` in lmstack/eval/world.toml). The library has its own random stream, so adding
it changed no other file of a world. The tool's settings (TOOL_K passages, TOOL_CHARS characters)
are the world's: the assistant data shows results cut exactly as the evaluation's tool cuts them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.tools.search import SearchIndex, format_passages, search_tool
from lmstack.tools.registry import Tool
from lmstack.world import documents as docs

FOLDER, INDEX = "library", "library.sqlite"
TOOL_K = 1  # passages per search: one biography fits the small model's 256-token context with room to answer
TOOL_CHARS = 700


def write_library(out: Path, world: dict, ix: dict, related: dict, seed: int) -> SearchIndex:
    """Write library/ into the world folder `out` and index it; returns the open index."""
    rng = random.Random(f"lmstack-library:{seed}")
    folder = out / FOLDER
    folder.mkdir()
    people = ix["people"]
    with open(folder / "people.jsonl", "w", encoding="utf-8") as f:
        for p in world["people"]:
            text = docs.biography(p, ix, rng, permute=True, full_names=True)
            # Every child, named first (the direction the reversal group's text allows), so a
            # search for a parent's child finds it in the parent's entry.
            kids = [people[c] for c in p["children"]]
            text += "".join(f" {c['name']} is the {docs.CHILD_ROLE[c['gender']]} of {p['name']}." for c in kids)
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    with open(folder / "places.jsonl", "w", encoding="utf-8") as f:
        for kind, entities, fn in (("city", world["cities"], docs.city_entry),
                                   ("company", world["companies"], docs.company_entry),
                                   ("university", world["universities"], docs.university_entry)):
            for ent in entities:
                f.write(json.dumps({"text": fn(ent, related[kind][ent["name"]], rng)}, ensure_ascii=False) + "\n")
    index = SearchIndex(out / INDEX, create=True)
    index.update(folder)
    return index


def search_result(index: SearchIndex, query: str) -> str:
    """What the world's search tool returns for `query` (the text of a tool message)."""
    return format_passages(index.search(query, TOOL_K), TOOL_CHARS)


def library_tool(world_dir) -> Tool:
    """The `search` tool over a world's library, cut as the assistant data cuts it."""
    return search_tool(Path(world_dir) / INDEX, k=TOOL_K, max_chars=TOOL_CHARS)
