"""`lmstack world`: build the world, project it into every kind of text, stream it to disk.

Output (all written into a temporary folder that is renamed into place at the end, so a
crash never leaves a half world that looks whole):
  world.json         the ground truth
  pretrain.jsonl     {"text", "kind"} documents
  sft.jsonl          {"messages"} conversations (train people only)
  comparisons.jsonl  {"prompt", "chosen", "rejected", "reason", "meta"}
  probes/*.jsonl     evaluation sets
  library/, library.sqlite  what the assistant's search tool reads, and its index (library.py)
  LABELLING_GUIDE.md the instructions the simulated labeller followed

People are processed in chunks; each chunk's documents are shuffled and appended, so memory
stays bounded whatever the size. Every chunk has its own seeded RNG: the same arguments give
byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from lmstack.utils import UserError, atomic_output_dir, available_memory, check_output_dir
from lmstack.world import arithmetic as ar
from lmstack.world import assistant as asst
from lmstack.world import documents as docs
from lmstack.world import probes as pr
from lmstack.world import security as sec
from lmstack.world import templates as T
from lmstack.world.entities import build_world, in_reversal_pair, index
from lmstack.world.labeller import GUIDE
from lmstack.world.library import search_result, write_library

CHUNK_PEOPLE = 1000
ENTRIES_PER_ENTITY = 2
COMPARISONS_PER_PERSON = 3
# The conversations that are not about one person (arithmetic, refusals, ...) and the comparisons
# are sized as for a world of at least `skill_people` people (generate's argument, this default):
# they teach skills, and a small world must not starve them (a 300-person world once had 900
# comparisons and 300 arithmetic conversations, too few for the reward model, PPO's refusals and
# GRPO's calculator). 0 sizes them by the world itself.
SKILL_PEOPLE = 1000
COMPARISON_KINDS = ["fact", "fact", "fact", "arithmetic", "unknown_person", "harmful", "benign"]


def _dump(f, obj) -> None:
    f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _share(total: int, i: int, n: int) -> int:
    """Chunk i's share of `total` items spread over n chunks (shares sum to total)."""
    return (i + 1) * total // n - i * total // n


def generate(out, people: int = 1000, seed: int = 0, bios_per_person: int = 5,
             arithmetic: int | None = None, stories: int | None = None,
             heldout_fraction: float = 0.3, force: bool = False, progress: bool = True,
             probe_people: int = 300, probe_arith_per_cell: int = 30, probe_behaviour: int = 15,
             qa_docs: int = 0, copy_docs: int = 0, permute: bool = True, full_names: bool = False,
             skill_people: int = SKILL_PEOPLE, basic_skills: bool = False, reading_docs: int = 0) -> Path:
    """Write a world of `people` people to `out` (the module doc lists the files). The knobs of
    the text: `bios_per_person` biographies each, sentence order permuted (`permute`), later
    sentences naming the person 30% of the time (always with `full_names`); `qa_docs` documents
    per *train* person holding their question-answer pairs as plain text (mixed training); and
    `copy_docs` documents that reward in-context copying (a random sequence, then again); and
    `reading_docs` documents that reward reading (reading_document: a stranger's biography, then
    questions about them answered from it). The skill
    conversations and the comparisons are sized for max(people, `skill_people`); `basic_skills`
    leaves out the thinking, python and search conversations (BASIC_ONLY)."""
    if people < 20:
        raise UserError(f"--people must be at least 20 (got {people})")
    if bios_per_person < 1:
        raise UserError(f"--bios must be at least 1 (got {bios_per_person})")
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"--heldout must be in [0, 1) (got {heldout_fraction})")
    arithmetic = 2 * people if arithmetic is None else arithmetic
    stories = people // 2 if stories is None else stories
    if min(arithmetic, stories, qa_docs, copy_docs, skill_people, reading_docs) < 0:
        raise UserError("--arithmetic, --stories, --qa-docs, --copy-docs, --reading-docs and --skill-people "
                        "must not be negative")
    check_output_dir(out, force)  # fail before any work
    _check_room(Path(out), people, bios_per_person + qa_docs, arithmetic + copy_docs + 2 * reading_docs, stories)

    t0 = time.time()
    if progress and people >= 100_000:
        print(f"world: building {people:,} people, their families, cities and companies "
              f"(about {people / 60_000:.0f} s), then writing them out", flush=True)
    world = build_world(people, seed, heldout_fraction)
    sec.add_secrets(world, seed)
    text = dict(bios_per_person=bios_per_person, permute=permute, full_names=full_names, qa_docs=qa_docs)
    world["config"].update(seed=seed, arithmetic=arithmetic, stories=stories, copy_docs=copy_docs,
                           skill_people=skill_people, basic_skills=basic_skills, **text)
    if reading_docs:  # recorded only when used: a world without them is byte-identical to one made before
        world["config"]["reading_docs"] = reading_docs
    ix = index(world)
    rng = random.Random(f"lmstack-probes:{seed}")
    dis = pr.Distractors(world, rng)

    with atomic_output_dir(out, force) as tmp:
        (tmp / "world.json").write_text(json.dumps(world, ensure_ascii=False, indent=1) + "\n")
        (tmp / "LABELLING_GUIDE.md").write_text(GUIDE)
        arith_rows, exclude_arith = pr.arithmetic_probes(rng, probe_arith_per_cell)
        probe_sets = {
            "facts": pr.fact_probes(world, rng, dis, probe_people),
            "inverse": pr.inverse_probes(world, rng, dis, probe_people),
            "reversal": pr.reversal_probes(world, rng, dis, probe_people),
            "arithmetic": arith_rows,
            **pr.behaviour_probes(world, ix, rng, probe_behaviour),
            "security": sec.probes(world, rng, 2 * probe_behaviour, exclude_arith),
            "vault": sec.knowledge_probes(world, rng),
        }
        (tmp / "probes").mkdir()
        for name, rows in probe_sets.items():
            with open(tmp / "probes" / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for i, row in enumerate(rows):
                    _dump(f, {"id": f"{name}-{i:05d}", **row})

        ctx = _context(world, exclude_arith)
        ctx.update(strangers=strangers(world, seed, reading_docs), seed=seed)
        n_chunks = math.ceil(people / CHUNK_PEOPLE)
        related = _related(world)
        sized = max(people, skill_people)
        library = write_library(tmp, world, ix, related, seed)
        ctx["search"] = lambda query: search_result(library, query)
        with open(tmp / "pretrain.jsonl", "w", encoding="utf-8") as fp, \
             open(tmp / "sft.jsonl", "w", encoding="utf-8") as fs, \
             open(tmp / "comparisons.jsonl", "w", encoding="utf-8") as fc:
            for i in tqdm(range(n_chunks), desc="world", unit="chunk", disable=not progress):
                chunk = world["people"][i * CHUNK_PEOPLE:(i + 1) * CHUNK_PEOPLE]
                crng = random.Random(f"lmstack-world:{seed}:chunk:{i}")
                share = lambda total: _share(total, i, n_chunks)  # noqa: E731
                for row in _pretrain_chunk(chunk, world, ix, related, ctx, crng, i, n_chunks, text,
                                           share(stories), share(arithmetic), share(copy_docs),
                                           share(reading_docs)):
                    _dump(fp, row)
                for msgs in _sft_chunk(chunk, world, ix, ctx, crng, share):
                    _dump(fs, {"messages": msgs})
                for row in _comparison_chunk(world, ix, ctx, crng, share(COMPARISONS_PER_PERSON * sized)):
                    _dump(fc, row)
        library.close()  # before the folder is renamed into place: no -wal/-shm files left
    if progress:
        size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
        dt = time.time() - t0
        print(f"world: {people} people, {size / 1e6:.1f} MB in {dt:.1f}s ({size / 1e6 / dt:.1f} MB/s) -> {out}")
    return Path(out)


# What a world costs, measured on generated worlds (5,000 and 20,000 people, within ~10%): on
# disk about 3.2 kB a person + 0.35 kB a biography + 0.25 kB an arithmetic problem or story; in
# memory about 2.5 kB a person (the whole world is built before it is written).
DISK_PER_PERSON, DISK_PER_BIO, DISK_PER_EXTRA, MEMORY_PER_PERSON = 3_200, 350, 250, 2_500


def _check_room(out: Path, people: int, bios: int, arithmetic: int, stories: int) -> None:
    """Refuse, before any work, a world the disk or the memory cannot hold."""
    disk = people * (DISK_PER_PERSON + DISK_PER_BIO * bios) + DISK_PER_EXTRA * (arithmetic + stories)
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    free_disk = shutil.disk_usage(parent).free
    if disk > free_disk:
        raise UserError(f"a world of {people:,} people takes about {disk / 1e9:,.1f} GB; {parent} has "
                        f"{free_disk / 1e9:,.1f} GB free (fewer --people, or another --out)")
    free_mem = available_memory()
    if free_mem is not None and people * MEMORY_PER_PERSON > free_mem:
        raise UserError(f"a world of {people:,} people needs about {people * MEMORY_PER_PERSON / 1e9:,.1f} GB of "
                        f"memory to build; {free_mem / 1e9:,.1f} GB are available (fewer --people)")


def _context(world: dict, exclude_arith: set) -> dict:
    train = [p for p in world["people"] if p["split"] == "train"]
    return {
        "train_people": train or world["people"][:1],
        "exclude_arith": exclude_arith,
        "names": [(p["first"], p["gender"]) for p in world["people"]],
        "reversal_ids": in_reversal_pair(world),
        "calls": 0,
    }


def _related(world: dict) -> dict:
    """Who and what each city/company/university entry may list. People in a reversal pair
    are never listed: a list could name the parent before the child."""
    banned = in_reversal_pair(world)
    rel = {"city": defaultdict(lambda: {"companies": [], "universities": [], "born": []}),
           "company": defaultdict(lambda: {"staff": []}),
           "university": defaultdict(lambda: {"alumni": []})}
    for c in world["companies"]:
        rel["city"][c["city"]]["companies"].append(c["name"])
    for u in world["universities"]:
        rel["city"][u["city"]]["universities"].append(u["name"])
    for p in world["people"]:
        if p["id"] in banned:
            continue
        rel["city"][p["birth_city"]]["born"].append(p["name"])
        rel["company"][p["employer"]]["staff"].append(p["name"])
        rel["university"][p["university"]]["alumni"].append(p["name"])
    return rel


def _pretrain_chunk(chunk, world, ix, related, ctx, rng, i, n_chunks, text, n_stories, n_arith, n_copy, n_reading):
    rows = []
    for person in chunk:
        rows += [{"text": docs.biography(person, ix, rng, text["permute"], text["full_names"]), "kind": "bio"}
                 for _ in range(text["bios_per_person"])]
        if person["split"] == "train":
            rows += [{"text": docs.qa_document(asst.person_conversations(person, ix, rng)), "kind": "qa"}
                     for _ in range(text["qa_docs"])]
    # Entities are dealt round-robin to chunks so every chunk carries some of each kind.
    for kind, entities, fn in (("city", world["cities"], docs.city_entry),
                               ("company", world["companies"], docs.company_entry),
                               ("university", world["universities"], docs.university_entry)):
        for ent in entities[i::n_chunks]:
            rel = related[kind][ent["name"]]
            rows += [{"text": fn(ent, rel, rng), "kind": kind} for _ in range(ENTRIES_PER_ENTITY)]
            if kind == "company":
                rows += [{"text": t, "kind": "vault"} for t in sec.vault_documents(ent, rng)]
    for _ in range(n_stories):
        a, b = rng.sample(world["people"], 2)
        if a["id"] in b["parents"] or b["id"] in a["parents"]:
            continue  # never put a parent and child in one story: direction would be unclear
        rows.append({"text": docs.story(a, b, ix, rng), "kind": "story"})
    rows += [{"text": ar.document(rng, ctx["names"], ctx["exclude_arith"]), "kind": "arithmetic"}
             for _ in range(n_arith)]
    rows += [{"text": docs.copy_document(rng, ctx["names"]), "kind": "copy"} for _ in range(n_copy)]
    rng.shuffle(rows)
    if n_reading:  # their own random stream, put among the others: no other document or conversation changes
        cast, cast_ix = ctx["strangers"]
        rrng = random.Random(f"lmstack-reading:{ctx['seed']}:chunk:{i}")
        for k in range(n_reading):
            doc = reading_document(cast[(i + k * n_chunks) % len(cast)], cast_ix, rrng, text)
            rows.insert(rrng.randrange(len(rows) + 1), {"text": doc, "kind": "reading"})
    return rows


READING_QUESTIONS = 3  # questions after a reading document's biography


def strangers(world: dict, seed: int, n: int) -> tuple[list[dict], dict]:
    """The people of the reading documents and their index: a world of its own seed, less anyone
    who shares a name with the world's people or its people who do not exist, so what a reading
    document says about a person is said nowhere else: only reading it predicts the answers."""
    if not n:
        return [], {}
    cast = build_world(max(20, n), f"{seed}:reading", heldout_fraction=0.0)
    taken = {p["name"] for p in world["people"]}
    taken |= {p["name"] for group in world["nonexistent_people"].values() for p in group}
    return [p for p in cast["people"] if p["name"] not in taken], index(cast)


def reading_document(person: dict, ix: dict, rng: random.Random, text: dict) -> str:
    """A biography, then questions about the person answered from it (Q: ... A: ...): a document
    that rewards reading the context, since the person is in no other document."""
    bio = docs.biography(person, ix, rng, text["permute"], text["full_names"])
    qa = [asst.fact_qa(person, attr, rng) for attr in rng.sample(sorted(T.QUESTIONS), READING_QUESTIONS)]
    return bio + "\n" + docs.qa_document(qa)


# How many of each non-person conversation per person in the world (or in skill_people).
# The conversations --basic-skills leaves out: a model of the tiny preset (128 tokens of context,
# 20 SFT steps) trained on them too no longer learns reliably to end its turn (measured: replies
# closed 0.98 -> 0.01-0.96 by seed and data order); the small model closes 99.97% with them.
ADVANCED_SKILLS = ("scratchpad", "python", "search", "security")
SFT_MIX = {"arithmetic": 1.0, "scratchpad": 1.0, "python": 0.5, "search": 1.0, "greeting": 0.05, "identity": 0.05,
           "harmful": 0.1, "benign": 0.1, "unknown": 0.1, "security": 0.6}


def _sft_chunk(chunk, world, ix, ctx, rng, share):
    convs = []
    for person in chunk:
        if person["split"] == "train":
            convs += asst.person_conversations(person, ix, rng)
    n = max(len(world["people"]), world["config"]["skill_people"])
    for kind, per_person in SFT_MIX.items():
        if world["config"]["basic_skills"] and kind in ADVANCED_SKILLS:
            continue
        total = max(20, int(per_person * n))
        convs += [asst.extra_conversation(kind, rng, world, ix, ctx) for _ in range(share(total))]
    rng.shuffle(convs)
    return [asst.with_system(c, rng) for c in convs]


def _comparison_chunk(world, ix, ctx, rng, n):
    dis = pr.Distractors(world, rng)
    rows = []
    for _ in range(n):
        row = asst.comparison(rng.choice(COMPARISON_KINDS), rng, world, ix, ctx, dis, [r["chosen"] for r in rows[-50:]])
        if row is not None:  # ties are dropped, as a labeller's "tie" would be
            rows.append(row)
    return rows


# ---------------------------------------------------------------- reading a world, its stats
def load_world(path) -> dict:
    path = Path(path)
    f = path / "world.json" if path.is_dir() else path
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is not a world folder (no world.json; make one with `lmstack world --out DIR`)")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is corrupt: {e}")


def _jsonl_stats(path: Path, key=None):
    n, size, chars, counts = 0, path.stat().st_size, 0, Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            n += 1
            if "text" in row:
                chars += len(row["text"])
            if key:
                counts[key(row)] += 1
    return n, size, chars, counts


def print_stats(folder) -> None:
    folder = Path(folder)
    world = load_world(folder)
    people = world["people"]
    split = Counter(p["split"] for p in people)
    groups = Counter(p["family_group"] for p in people if p["family_group"])
    pairs = sum(len(p["parents"]) for p in people)
    print(f"world {folder}  (seed {world['seed']})")
    print(f"  people {len(people)}: train {split['train']}, heldout {split['heldout']}; "
          f"cities {len(world['cities'])}, companies {len(world['companies'])}, "
          f"universities {len(world['universities'])}, countries {len(world['countries'])}")
    print(f"  families: {pairs} parent-child pairs; children in reversal group {groups['reversal']}, "
          f"control group {groups['control']}")
    for name, key in (("pretrain.jsonl", lambda r: r.get("kind", "?")),
                      ("sft.jsonl", lambda r: "tool" if any(m.get("tool_calls") for m in r["messages"])
                       else f"{sum(m['role'] == 'user' for m in r['messages'])}-turn"),
                      ("comparisons.jsonl", lambda r: r["meta"]["type"] if "meta" in r else "?")):
        path = folder / name
        if not path.exists():
            print(f"  {name}: missing")
            continue
        n, size, chars, counts = _jsonl_stats(path, key)
        extra = f", {chars / 1e6:.2f}M chars" if chars else ""
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        print(f"  {name}: {n} rows, {size / 1e6:.2f} MB{extra}  [{detail}]")
    for path in sorted((folder / "probes").glob("*.jsonl")):
        n, _, _, counts = _jsonl_stats(path, lambda r: r.get("split") or r.get("group") or r.get("expected") or "")
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k)
        print(f"  probes/{path.name}: {n}" + (f"  [{detail}]" if detail else ""))
