"""`lmstack eval --tasks memory`: does a fact from the first turn survive a conversation three
times longer than the context? (The LLM as an operating system: context = RAM, memory = disk.)

Each probe conversation starts with a question about a *held-out* person (one the model never
saw in a conversation, so it can hardly answer from its weights) and its true answer; then turns
of questions and true answers about train people until the conversation is `length` x the
model's context; then the first question again. The conversation is fitted to the context the
way `lmstack chat` fits it (lmstack.chat.fit: the oldest turns go), three ways:

  in_context  no filler at all: the answer is two turns up (can the model repeat from context?)
  forgotten   the old turns are dropped: only the weights can answer
  paged       the old turns are paged out to the conversation's memory (lmstack/tools/memory.py)
              and the last question pages the best one back in, just before it (lmstack.chat.recall)

Scored like facts_qa (the answer or an alias in the greedy reply), with Wilson intervals and the
paired test of paged against forgotten.
"""

from __future__ import annotations

import random
from pathlib import Path

from lmstack.chat import fit, recall
from lmstack.eval.tasks import check
from lmstack.stats import paired_compare, summarize
from lmstack.tools.memory import ConversationMemory
from lmstack.utils import UserError, read_jsonl
from lmstack.world import load_world
from lmstack.world import templates as T
from lmstack.world.assistant import fact_answer, fact_qa, fact_value

MAX_TOKENS = 32


def probe_conversations(world_dir, ctx: int, fmt, n: int = 100, length: float = 3.0, seed: int = 0) -> list[dict]:
    """n conversations (module doc): {"messages" (the whole, unfitted), "answers", "short"}."""
    world = load_world(world_dir)
    people = {p["id"]: p for p in world["people"]}
    rows = [row for _, row in read_jsonl(Path(world_dir) / "probes" / "facts.jsonl", "fact probes file")]
    held = [r for r in rows if r["split"] == "heldout" and r["relation"] in T.QUESTIONS]
    train = [p for p in world["people"] if p["split"] == "train"]
    if not held or not train:
        raise UserError(f"{world_dir}: the memory probe needs held-out fact probes and train people")
    rng = random.Random(seed)
    out = []
    for row in rng.sample(held, min(n, len(held))):
        person = people[row["person"]]
        first = [{"role": "user", "content": row["question"]},
                 {"role": "assistant", "content": fact_answer(person, row["relation"],
                                                              fact_value(person, row["relation"]), rng)}]
        msgs = list(first)
        while len(fmt.prompt(msgs)) < length * ctx:
            msgs += fact_qa(rng.choice(train), rng.choice(sorted(T.QUESTIONS)), rng)
        last = {"role": "user", "content": row["question"]}
        out.append({"messages": msgs + [last], "short": first + [last],
                    "answers": [row["answer"], *row.get("aliases", [])]})
    return out


def memory_eval(lm, world_dir, n: int = 100, length: float = 3.0, seed: int = 0) -> dict:
    """The three conditions (module doc) on `lm` (a ModelLM of a chat model)."""
    probes = probe_conversations(world_dir, lm.ctx, lm.fmt, n, length, seed)
    convs = {"in_context": [], "forgotten": [], "paged": []}
    paged_out = 0
    for p in probes:
        convs["in_context"].append(p["short"])
        forgotten = list(p["messages"])
        fit(lm.fmt, forgotten, lm.ctx, MAX_TOKENS)
        convs["forgotten"].append(forgotten)
        with ConversationMemory() as memory:
            paged = list(p["messages"])
            fit(lm.fmt, paged, lm.ctx, MAX_TOKENS, memory)  # what `lmstack chat` does before a reply
            paged = recall(paged, memory)
            fit(lm.fmt, paged, lm.ctx, MAX_TOKENS, memory)  # the recalled page must fit too
            paged_out += memory.pages
            convs["paged"].append(paged)
    hits = {}
    for name, cs in convs.items():
        replies = lm.chat(cs, MAX_TOKENS)
        hits[name] = [int(check("contains", r.text, p["answers"])) for r, p in zip(replies, probes)]
    lengths = [len(lm.fmt.prompt(p["messages"])) for p in probes]
    result = {name: summarize(h) for name, h in hits.items()}
    result.update(conversations=len(probes), context=lm.ctx, mean_tokens=sum(lengths) / len(lengths),
                  pages_per_conversation=paged_out / len(probes),
                  paged_vs_forgotten=paired_compare(hits["paged"], hits["forgotten"]))
    return result
