"""Evaluation sets with exact answers and the metadata evaluation slices by.

Every row has `question` (asked in chat) and, where a base model can be scored too, `cloze`
(a text prefix whose continuation is " " + answer) and `distractors` (same-type wrong
answers for log-likelihood ranking; chance is 1 / (1 + len(distractors))).
"""

from __future__ import annotations

import random

from lmstack.world import arithmetic as ar
from lmstack.world import templates as T
from lmstack.world.assistant import BENIGN, HARMFUL, entity_values, fact_value
from lmstack.world.documents import CHILD_ROLE, ROLE
from lmstack.world.entities import MAJORS, fact_forms, family_pairs, format_date

N_DISTRACTORS = 9


class Distractors:
    """Same-type wrong answers: cities for cities, dates for dates, names of the same gender."""

    def __init__(self, world: dict, rng: random.Random):
        self.rng = rng
        self.people = world["people"]
        cities = [c["name"] for c in world["cities"]]
        self.pools = {"birth_city": cities, "work_city": cities, "major": MAJORS,
                      "university": [u["name"] for u in world["universities"]],
                      "employer": [c["name"] for c in world["companies"]]}

    def _sample(self, pool, exclude: set, k: int, make=None) -> list[str]:
        out: list[str] = []
        for _ in range(50 * k):
            if len(out) == k:
                break
            x = make() if make else self.rng.choice(pool)
            if x not in exclude and x not in out:
                out.append(x)
        return out

    def __call__(self, attr: str, person: dict | None, k: int = N_DISTRACTORS) -> list[str]:
        truth = {fact_value(person, attr)} if person else set()
        if attr == "birth_date":
            return self._sample(None, truth, k, lambda: format_date(self.rng.choice(self.people)["birth_date"]))
        return self._sample(self.pools[attr], truth, k)

    def names(self, gender: str, exclude: set, k: int = N_DISTRACTORS) -> list[str]:
        return self._sample(None, exclude, k, lambda: self._person_of(gender)["name"])

    def _person_of(self, gender):
        while True:
            p = self.rng.choice(self.people)
            if p["gender"] == gender:
                return p


def _sample_people(world, split, k, rng):
    people = [p for p in world["people"] if p["split"] == split]
    return rng.sample(people, min(k, len(people)))


def fact_probes(world, rng, dis: Distractors, per_split: int) -> list[dict]:
    """A probe per person and fact; `others` holds the same person's other facts, so a wrong
    reply that states one of them is told apart from a wrong value (the eval's `confusable`)."""
    rows = []
    for split in ("train", "heldout"):
        for p in _sample_people(world, split, per_split, rng):
            for attr in T.QUESTIONS:
                answer = fact_value(p, attr)
                rows.append({
                    "question": T.QUESTIONS[attr][0].format(name=p["name"]),
                    "cloze": T.CLOZE[attr].format(name=p["name"]),
                    "answer": answer,
                    "aliases": fact_forms(p, attr)[1:],
                    "distractors": dis(attr, p),
                    "others": {a: fact_forms(p, a) for a in T.QUESTIONS if a != attr},
                    "person": p["id"], "name": p["name"], "relation": attr,
                    "split": split, "direction": "forward",
                })
    return rows


def inverse_probes(world, rng, dis: Distractors, per_split: int) -> list[dict]:
    """"Who was born in X on D?": the attributes are given, the person must be recalled."""
    seen: dict[tuple, int] = {}
    for p in world["people"]:
        key = (p["birth_city"], p["birth_date"])
        seen[key] = seen.get(key, 0) + 1
    rows = []
    for split in ("train", "heldout"):
        for p in _sample_people(world, split, per_split, rng):
            if seen[(p["birth_city"], p["birth_date"])] > 1:
                continue  # the question would have two right answers
            date = format_date(p["birth_date"])
            rows.append({
                "question": f"Who was born in {p['birth_city']} on {date}?",
                "cloze": f"The person born in {p['birth_city']} on {date} is",
                "answer": p["name"], "aliases": [],
                "distractors": dis.names(p["gender"], {p["name"]}),
                "person": p["id"], "relation": "birth_city+birth_date",
                "split": split, "direction": "inverse",
            })
    return rows


def reversal_probes(world, rng, dis: Distractors, per_group: int) -> list[dict]:
    """Parent->child and child->parent questions for the reversal and the control group.
    `stated` says whether that direction ever appears in the training text."""
    people = {p["id"]: p for p in world["people"]}
    pairs = {"reversal": [], "control": []}
    for parent, child in family_pairs(world):
        pairs[child["family_group"]].append((parent, child))
    rows = []
    for group in ("reversal", "control"):
        chosen = rng.sample(pairs[group], min(per_group, len(pairs[group])))
        for parent, child in chosen:
            v = {"parent": parent["name"], "child": child["name"], "role": ROLE[parent["gender"]],
                 "child_role": CHILD_ROLE[child["gender"]]}
            # Any child of the same sex is a right answer to "who is X's daughter?".
            siblings = [people[c]["name"] for c in parent["children"]
                        if people[c]["gender"] == child["gender"] and c != child["id"]]
            for direction, answer, aliases, gender, exclude in (
                ("child_to_parent", parent["name"], [], parent["gender"], {parent["name"]}),
                ("parent_to_child", child["name"], siblings, child["gender"], {child["name"], *siblings}),
            ):
                rows.append({
                    "question": T.FAMILY_QUESTIONS[direction][0].format(**v),
                    "cloze": T.FAMILY_CLOZE[direction].format(**v),
                    "answer": answer, "aliases": aliases,
                    "distractors": dis.names(gender, exclude),
                    "parent": parent["id"], "child": child["id"], "relation": "parent",
                    "group": group, "direction": direction, "split": child["split"],
                    "subject": child["name"] if direction == "child_to_parent" else parent["name"],
                    "stated": direction == "child_to_parent" or group == "control",
                })
    return rows


def arithmetic_probes(rng, per_cell: int) -> tuple[list[dict], set]:
    """Problems by operation and digits; the returned set is excluded from all training text."""
    rows, taken = [], set()
    for op, max_d in ar.MAX_DIGITS.items():
        for digits in range(1, max_d + 1):
            cell = 0
            for _ in range(per_cell * 20):
                if cell == per_cell:
                    break
                a, op_, b = ar.sample_problem(rng, op, digits)
                if (a, op, b) in taken:
                    continue
                taken.add((a, op, b))
                cell += 1
                expr = ar.expression(a, op, b)
                rows.append({"question": f"What is {expr}?", "cloze": f"{expr} =",
                             "answer": str(ar.compute(a, op, b)), "a": a, "op": op, "b": b,
                             "digits": digits, "relation": "arithmetic"})
    return rows, taken


def behaviour_probes(world, ix, rng, per_category: int) -> dict[str, list[dict]]:
    """Harmful requests (should refuse), benign near-misses (should not), and questions about
    people who do not exist (should say so). All use phrasings never seen in training."""
    harmful, benign, unknown = [], [], []
    for category in sorted(HARMFUL):
        kind, pool, _ = HARMFUL[category]
        prompts = {pool[-1].format(**entity_values(kind, rng, world, ix)) for _ in range(per_category * 3)}
        for prompt in sorted(prompts)[:per_category]:
            harmful.append({"question": prompt, "category": category, "expected": "refuse"})
    for category in sorted(BENIGN):
        kind, pool = BENIGN[category]
        q, _, truth = pool[-1]
        seen = set()
        for _ in range(per_category * 3):
            v = entity_values(kind, rng, world, ix)
            if q.format(**v) in seen or len(seen) == per_category:
                continue
            seen.add(q.format(**v))
            benign.append({"question": q.format(**v), "category": category, "expected": "comply",
                           "truth": [truth.format(**v)] if truth else []})
    for fake in world["nonexistent_people"]["probe"][:per_category * 10]:
        attr = rng.choice(sorted(T.QUESTIONS))
        unknown.append({"question": T.QUESTIONS[attr][0].format(name=fake["name"]), "name": fake["name"],
                        "relation": attr, "expected": "idk"})
    return {"harmful": harmful, "benign": benign, "nonexistent": unknown}
