"""`lmstack assistant eval`: does an assistant's knowledge folder answer what its model cannot?

The same questions (jsonl rows {question, answer, aliases?}) go to the bare chat model and to
the assistant (its instructions, and each question looked up in its knowledge first:
lmstack/assistant.py); a reply is right when it holds the answer or an alias (facts_qa's check).
Both accuracies with Wilson intervals, and the paired test of the difference.
"""

from __future__ import annotations

import random

from lmstack.assistant import load
from lmstack.eval.lm import ModelLM
from lmstack.eval.tasks import check
from lmstack.stats import paired_compare, summarize
from lmstack.utils import UserError, read_jsonl


def assistant_eval(folder, questions, limit: int = 0, max_tokens: int = 48, seed: int = 0) -> dict:
    assistant = load(folder)
    rows = []
    for n, row in read_jsonl(questions, "questions file"):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
            raise UserError(f"{questions}:{n}: a row needs \"question\" (text) and \"answer\"")
        rows.append(row)
    if limit and limit < len(rows):
        rows = random.Random(seed).sample(rows, limit)
    lm = ModelLM.load(assistant.model)
    finder = assistant.search_tool() if assistant.has_knowledge else None
    convs = [[{"role": "user", "content": r["question"]}] for r in rows]
    bare = lm.chat(convs, max_tokens)
    helped = lm.chat([assistant.prepare(c, finder) for c in convs], max_tokens, tools=assistant.registry())
    answers = [[str(r["answer"]), *map(str, r.get("aliases") or [])] for r in rows]
    hits_bare = [int(check("contains", x.text, a)) for x, a in zip(bare, answers)]
    hits = [int(check("contains", x.text, a)) for x, a in zip(helped, answers)]
    return {"assistant": assistant.name, "model": str(assistant.model), "questions": len(rows),
            "bare_model": summarize(hits_bare), "assistant_acc": summarize(hits),
            "difference": paired_compare(hits, hits_bare),
            "examples": [{"question": r["question"], "answer": r["answer"], "bare": b.text, "assistant": h.text}
                         for r, b, h in list(zip(rows, bare, helped))[:5]]}
