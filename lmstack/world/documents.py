"""Pretraining documents: biographies, encyclopedia entries and short stories.

Every sentence here is true of the world (stories included): the corpus never contradicts
world.json, so every probe has one right answer. One rule is about *direction*: for a child
in the reversal group, the parent relation is only ever stated with the child first.
"""

from __future__ import annotations

import functools
import random
import re

from lmstack.world import templates as T
from lmstack.world.entities import INDUSTRIES, format_date

PRONOUNS = {  # S, s, P, p, o
    "female": ("She", "she", "Her", "her", "her"),
    "male": ("He", "he", "His", "his", "him"),
}
ROLE = {"female": "mother", "male": "father"}
CHILD_ROLE = {"female": "daughter", "male": "son"}


def person_slots(person: dict, by_name: bool = False) -> dict:
    """Pronoun forms as S s P p o; with by_name, also the name forms NS Ns NP Np No."""
    slots = dict(zip("SsPpo", PRONOUNS[person["gender"]]))
    if by_name:
        n = person["name"]
        slots.update(NS=n, Ns=n, NP=f"{n}'s", Np=f"{n}'s", No=n)
    return slots


_SLOT = re.compile(r"\{([SsPpo])\}")


@functools.lru_cache(maxsize=None)
def name_first(template: str) -> str:
    """Name the person at the first mention in a sentence, pronouns after it:
    "{S} devoted {p} years" -> "Mira Talen devoted her years", not "... Mira Talen's years"."""
    return _SLOT.sub(lambda m: "{N" + m.group(1) + "}", template, count=1)


def fact_values(person: dict, rng: random.Random, companies: dict) -> dict:
    return {
        "date": format_date(person["birth_date"], rng.randrange(3)),
        "city": person["birth_city"],
        "uni": person["university"],
        "major": person["major"],
        "company": person["employer"],
        "industry": companies[person["employer"]]["industry"],
    }


def biography(person: dict, world_ix: dict, rng: random.Random, permute: bool = True,
              full_names: bool = False) -> str:
    """One biography: a sentence per attribute and per family tie, order permuted (or the fixed
    order of the templates with permute=False); the first sentence names the person, later ones
    use the name (30%, or always with full_names) or a pronoun."""
    people = world_ix["people"]
    sentences = []  # (template, extra values)
    for attr, pool in T.BIO.items():
        extra = {"city": person["work_city"]} if attr == "work_city" else {}
        sentences.append((rng.choice(pool), extra))
    for pid in person["parents"]:
        parent = people[pid]
        sentences.append((rng.choice(T.CHILD_TO_PARENT), {
            "parent": parent["name"], "role": ROLE[parent["gender"]],
            "child_role": CHILD_ROLE[person["gender"]]}))
    for cid in person["children"]:
        child = people[cid]
        if child["family_group"] != "control":
            continue  # reversal group: never state the relation parent-first
        sentences.append((rng.choice(T.PARENT_TO_CHILD), {
            "child": child["name"], "role": ROLE[person["gender"]],
            "child_role": CHILD_ROLE[child["gender"]]}))
    if permute:
        rng.shuffle(sentences)
    out = []
    for i, (tpl, extra) in enumerate(sentences):
        values = fact_values(person, rng, world_ix["companies"])
        values.update(extra)
        by_name = i == 0 or full_names or rng.random() < 0.3
        values.update(person_slots(person, by_name))
        out.append((name_first(tpl) if by_name else tpl).format(**values))
    return " ".join(out)


def qa_document(conversations: list[list[dict]]) -> str:
    """A person's question-answer pairs as one pretraining document (Allen-Zhu & Li's "mixed
    training": the QA of some people seen in pretraining, beside everyone's biographies)."""
    return "\n".join(f"Q: {m['content']}" if m["role"] == "user" else f"A: {m['content']}"
                     for conv in conversations for m in conv)


COPY_FRAMES = ["Sequence: {seq}. Again: {seq}.", "The code is {seq}. I repeat, the code is {seq}.",
               "Guest list: {seq}. Read aloud in order: {seq}. Once more: {seq}.", "{seq}\n{seq}",
               "Copy this line: {seq}\nCopy: {seq}\nCopy: {seq}"]


def copy_document(rng: random.Random, names: list) -> str:
    """A document only in-context copying can predict: a random sequence (names, made-up words,
    codes of letters and digits; 8-48 items), then the same sequence again (once or twice), so
    the second copy is free to a model that looks back and copies (what induction heads do)."""
    def item() -> str:
        r = rng.random()
        if r < 0.35:
            return rng.choice(names)[0]
        if r < 0.7:
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7)))
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-") for _ in range(rng.randint(3, 8)))
    seq = " ".join(item() for _ in range(rng.randint(8, 48)))
    return rng.choice(COPY_FRAMES).format(seq=seq)


def _entry(pools: dict, values: dict, rng: random.Random) -> list[str]:
    # The first sentence (what it is) stays first; the rest are permuted.
    keys = list(pools)
    rest = keys[1:]
    rng.shuffle(rest)
    return [rng.choice(pools[k]).format(**values) for k in [keys[0], *rest]]


def _names_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def city_entry(city: dict, related: dict, rng: random.Random) -> str:
    v = {**city, "population": f"{city['population']:,}"}
    out = _entry(T.CITY_ENTRY, v, rng)
    if related["companies"]:
        picks = rng.sample(related["companies"], min(3, len(related["companies"])))
        out.append(f"Companies headquartered in {city['name']} include {_names_list(picks)}.")
    for uni in related["universities"][:2]:
        out.append(f"{uni} is located in {city['name']}.")
    if related["born"]:
        picks = rng.sample(related["born"], min(2, len(related["born"])))
        out.append(f"Notable people born in {city['name']} include {_names_list(picks)}.")
    return " ".join(out)


def company_entry(company: dict, related: dict, rng: random.Random) -> str:
    v = {**company, "products": INDUSTRIES[company["industry"]][1], "employees": f"{company['employees']:,}"}
    out = _entry(T.COMPANY_ENTRY, v, rng)
    if related["staff"]:
        picks = rng.sample(related["staff"], min(2, len(related["staff"])))
        out.append(f"Among its employees are {_names_list(picks)}.")
    return " ".join(out)


def university_entry(uni: dict, related: dict, rng: random.Random) -> str:
    out = _entry(T.UNIVERSITY_ENTRY, uni, rng)
    if related["alumni"]:
        picks = rng.sample(related["alumni"], min(2, len(related["alumni"])))
        out.append(f"Its graduates include {_names_list(picks)}.")
    return " ".join(out)


SEASONS = ["spring", "summer", "autumn", "winter"]
WEATHER = ["rainy", "bright", "foggy", "windy", "cold", "warm"]


def story(a: dict, b: dict, world_ix: dict, rng: random.Random) -> str:
    """A short story about two unrelated people. Every fact it states is true; what it
    invents (trips, meetings, weather) is not a fact of the world."""
    cities, companies = world_ix["cities"], world_ix["companies"]
    sa, sb = person_slots(a), person_slots(b)
    place = cities[b["work_city"]]
    kind = rng.randrange(4)
    if kind == 0:
        lines = [
            f"On a {rng.choice(WEATHER)} {rng.choice(SEASONS)} morning, {a['name']} took the train to {place['name']}.",
            f"The city was busy, as always, and everyone talked about {place['known_for']}.",
            f"By the {place['river']} river {sa['s']} met {b['name']}, who works for {b['employer']}.",
            f"They spoke for hours about {a['major']}, which {a['name']} had studied at {a['university']}.",
            f"When the sun went down, {a['name']} promised to come back to {place['name']} soon.",
        ]
    elif kind == 1:
        home = cities[a["birth_city"]]
        lines = [
            f"{a['name']} had not been home to {home['name']} for years.",
            f"Walking past the {home['river']} river, {sa['s']} remembered the day {sa['s']} left for {a['university']}.",
            f"At the station {sa['s']} ran into {b['name']}, who studied {b['major']} and now works in {b['work_city']}.",
            f"{b['name']} laughed: \"You never change.\"",
            f"That evening the two of them watched the lights of {home['name']} from the old bridge.",
        ]
    elif kind == 2:
        company = companies[a["employer"]]
        lines = [
            f"Monday began badly at {company['name']}.",
            f"{a['name']}, who had worked there for years, found the {company['industry']} orders piled high on {sa['p']} desk.",
            f"A visitor was waiting: {b['name']}, who had come all the way from {b['work_city']}.",
            f"\"I studied at {b['university']},\" {sb['s']} said, \"and I think I can help.\"",
            f"By Friday, {company['name']} had cleared every order, and {a['name']} bought the coffee.",
        ]
    else:
        lines = [
            f"Every {rng.choice(SEASONS)} there is a fair in {place['name']}, famous for {place['known_for']}.",
            f"This year {a['name']} came to sell old books, and {b['name']} came to buy them.",
            f"{b['name']} works for {b['employer']}, but on fair days {sb['s']} forgets about work.",
            f"{a['name']}, born in {a['birth_city']}, told stories of {sa['p']} hometown to anyone who would listen.",
            "When the fair closed, not a single book was left.",
        ]
    return " ".join(lines)
