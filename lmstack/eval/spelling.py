"""Spelling: are the words of a model's replies words of its world?

A tokenizer trained on one kind of text splits the words it rarely saw into pieces ("language"
into l + an + g + u + a + ge), and a model fine-tuned to say such words must learn to put the
pieces back together; where it has not, its replies hold non-words ("a small lgguaaeleel"). No
task's checker sees that: a refusal with a garbled middle still refuses. This measure does.

The lexicon is every word written in the world's files (its pretraining documents, conversations,
comparisons, probes and library: the .jsonl files under the world folder), so a reply that
repeats a name from its question is still well spelled. A word is a run of letters, case
ignored; "can't" is "can" and "t". A reply is well spelled when every word in it is in the
lexicon. Non-words that happen to be words of the world ("st" from "1st") are not caught, so
the measure is a lower bound on garbling.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from lmstack.stats import summarize

WORD = re.compile(r"[^\W\d_]+")  # letters only: digits, punctuation and "_" separate words
SHOWN_BELOW = 0.9  # tables show a task's own spelling row when some model spells fewer replies than this


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def world_lexicon(world) -> frozenset[str]:
    """Every word of the .jsonl files under the world folder (the strings of each row; a line that
    is not JSON, its text)."""
    lex = set()
    for f in sorted(Path(world).rglob("*.jsonl")):
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    line = " ".join(_strings(json.loads(line)))
                except ValueError:
                    pass
                lex.update(words(line))
    return frozenset(lex)


def _strings(value):
    """Every string in a JSON value (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def spelling(replies: list[str], lexicon: frozenset[str], examples: int = 10) -> dict:
    """The share of replies whose every word is in `lexicon` (with its 95% interval), the number
    of words and of non-words, and the most common non-words."""
    ok, seen, bad = [], 0, Counter()
    for text in replies:
        ws = words(text)
        missing = [w for w in ws if w not in lexicon]
        ok.append(int(not missing))
        seen += len(ws)
        bad.update(missing)
    return {**summarize(ok), "words": seen, "nonwords": sum(bad.values()),
            "nonword_share": sum(bad.values()) / seen if seen else 0.0,
            "common": [[w, c] for w, c in bad.most_common(examples)]}


def spelling_by_task(tasks: dict, lexicon: frozenset[str]) -> dict:
    """`spelling` over the greedy chat replies of every task ("all") and of each task."""
    replies = {name: [it["reply"] for it in r["items"] if "reply" in it]
               for name, r in tasks.items() if r.get("format") == "chat"}
    replies = {name: rs for name, rs in replies.items() if rs}
    return {"all": spelling([x for rs in replies.values() for x in rs], lexicon),
            **{name: spelling(rs, lexicon) for name, rs in replies.items()}}


def rows_to_show(by_model: list[dict]) -> list[str]:
    """The spelling rows a table shows for these models' `spelling_by_task` results: "all", then
    every task that some model spells worse than SHOWN_BELOW."""
    names = dict.fromkeys(name for s in by_model for name in s)
    return [n for n in names if n == "all" or any(n in s and s[n]["acc"] < SHOWN_BELOW for s in by_model)]
