"""The synthetic world: determinism, splits, ground-truth consistency, the reversal group,
the labeller, and the command line."""

import contextlib
import functools
import io
import json
import re
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from lmstack.align.rewards import arithmetic
from lmstack.tools.search import SearchIndex
from lmstack.utils import UserError
from lmstack.world import generate, load_world
from lmstack.world import templates as T
from lmstack.world.assistant import HARMFUL
from lmstack.world.documents import CHILD_ROLE, ROLE
from lmstack.world.entities import MONTHS, date_aliases, format_date
from lmstack.world.library import search_result
from lmstack.world.labeller import arithmetic_truth, final_number, is_idk, is_refusal, is_rude, label, task_of
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

PEOPLE = 300


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "world"
    generate(out, people=PEOPLE, seed=7, progress=False)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return load_world(world_dir)


@pytest.fixture(scope="module")
def people(world):
    return {p["id"]: p for p in world["people"]}


def files(folder: Path) -> dict:
    """Every file's bytes; the search index (which records when it read each file) as its passages."""
    out = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    with sqlite3.connect(folder / "library.sqlite") as db:
        out["library.sqlite"] = db.execute("SELECT path, ord, line, text FROM chunks ORDER BY path, ord").fetchall()
    return out


def test_same_seed_gives_byte_identical_files(world_dir, tmp_path):
    again = generate(tmp_path / "again", people=PEOPLE, seed=7, progress=False)
    assert files(again) == files(world_dir)
    other = generate(tmp_path / "other", people=PEOPLE, seed=8, progress=False)
    assert files(other)["pretrain.jsonl"] != files(world_dir)["pretrain.jsonl"]


def test_outputs_exist_and_are_well_formed(world_dir):
    for name in ["world.json", "pretrain.jsonl", "sft.jsonl", "comparisons.jsonl", "LABELLING_GUIDE.md"]:
        assert (world_dir / name).stat().st_size > 0
    for name in ["facts", "inverse", "reversal", "arithmetic", "harmful", "benign", "nonexistent", "security", "vault"]:
        assert len(read_jsonl(world_dir / "probes" / f"{name}.jsonl")) > 0, name
    kinds = {r["kind"] for r in read_jsonl(world_dir / "pretrain.jsonl")}
    assert kinds == {"bio", "city", "company", "university", "story", "arithmetic", "vault"}


def test_names_are_unique_and_generated(world):
    names = [p["name"] for p in world["people"]]
    others = [c["name"] for c in world["cities"]] + [c["name"] for c in world["companies"]] + \
             [u["name"] for u in world["universities"]] + world["countries"]
    assert len(set(names)) == len(names)
    assert len(set(names + others)) == len(names) + len(others)
    fakes = [f["name"] for f in world["nonexistent_people"]["sft"] + world["nonexistent_people"]["probe"]]
    assert not set(fakes) & set(names)
    assert not set(f["name"] for f in world["nonexistent_people"]["sft"]) & set(
        f["name"] for f in world["nonexistent_people"]["probe"])


def test_every_attribute_has_at_least_20_phrasings():
    for attr, pool in T.BIO.items():
        assert len(set(pool)) >= 20, attr


def test_biographies_per_person_and_paraphrase_diversity(world_dir, world):
    bios = [r["text"] for r in read_jsonl(world_dir / "pretrain.jsonl") if r["kind"] == "bio"]
    assert len(bios) == 5 * PEOPLE
    p = world["people"][0]
    mine = [b for b in bios if b.startswith(p["name"]) or b.split(". ")[0].count(p["name"])]
    assert len(set(mine)) == len(mine)  # no two biographies of a person are the same text


def test_splits_are_by_person(world, world_dir):
    split = {p["id"]: p["split"] for p in world["people"]}
    assert set(split.values()) == {"train", "heldout"}
    heldout_names = [p["name"] for p in world["people"] if p["split"] == "heldout"]
    # Held-out people appear in prose only: never in what a conversation's user or assistant says,
    # nor in comparisons. (A search result is library prose: it may name one, e.g. as someone's son.)
    said = " ".join(m["content"] or "" for r in read_jsonl(world_dir / "sft.jsonl") for m in r["messages"]
                    if m["role"] != "tool")
    for name, text in (("sft.jsonl", said), ("comparisons.jsonl", (world_dir / "comparisons.jsonl").read_text())):
        leaked = [n for n in heldout_names if n in text]
        assert not leaked, (name, leaked[:3])
    facts = read_jsonl(world_dir / "probes" / "facts.jsonl")
    by_split = {"train": set(), "heldout": set()}
    for r in facts:
        assert r["split"] == split[r["person"]]
        by_split[r["split"]].add(r["person"])
    assert by_split["train"] and by_split["heldout"] and not by_split["train"] & by_split["heldout"]
    # Every held-out person is still described in pretraining text.
    pre = (world_dir / "pretrain.jsonl").read_text(encoding="utf-8")
    assert all(n in pre for n in heldout_names)


def _value(person, relation):
    return format_date(person["birth_date"]) if relation == "birth_date" else person[relation]


def test_fact_and_inverse_probes_match_the_world(world_dir, people, world):
    for r in read_jsonl(world_dir / "probes" / "facts.jsonl"):
        p = people[r["person"]]
        assert r["answer"] == _value(p, r["relation"])
        assert p["name"] in r["question"] and r["cloze"].startswith(p["name"])
        assert r["answer"] not in r["distractors"] and len(r["distractors"]) == 9
        if r["relation"] == "birth_date":
            assert set(r["aliases"]) <= set(date_aliases(p["birth_date"]))
        # The person's other five facts, in every form a reply may state them (eval's `confusable`).
        assert len(r["others"]) == 5 and r["relation"] not in r["others"]
        assert all(_value(p, rel) == ans[0] for rel, ans in r["others"].items())
        assert r["others"].get("birth_date", date_aliases(p["birth_date"])) == date_aliases(p["birth_date"])
    born = {}
    for p in world["people"]:
        born.setdefault((p["birth_city"], format_date(p["birth_date"])), []).append(p["name"])
    for r in read_jsonl(world_dir / "probes" / "inverse.jsonl"):
        city, date = re.match(r"Who was born in (.+) on (.+)\?", r["question"]).groups()
        assert born[(city, date)] == [r["answer"]]
        assert r["answer"] not in r["distractors"]


def test_reversal_probes_match_the_world(world_dir, people):
    rows = read_jsonl(world_dir / "probes" / "reversal.jsonl")
    assert {r["group"] for r in rows} == {"reversal", "control"}
    for r in rows:
        parent, child = people[r["parent"]], people[r["child"]]
        assert parent["id"] in child["parents"] and child["id"] in parent["children"]
        assert child["family_group"] == r["group"]
        if r["direction"] == "child_to_parent":
            assert r["answer"] == parent["name"] and r["stated"]
        else:
            assert r["answer"] == child["name"]
            assert r["stated"] == (r["group"] == "control")
            for alias in r["aliases"]:  # a sibling of the same sex is also right
                sib = next(p for p in people.values() if p["name"] == alias)
                assert sib["id"] in parent["children"] and sib["gender"] == child["gender"]
        assert r["answer"] not in r["distractors"] and not set(r["aliases"]) & set(r["distractors"])


@pytest.mark.slow
def test_reversal_group_is_never_stated_parent_first(world_dir, world, people):
    """For the reversal group, every text that names both parent and child names the
    child first (the only direction taught); the control group gets both directions. (A search
    result in a conversation is library text the model reads, never a training target: the
    library names a parent, then each child, "C is the son of P", in the parent's entry.)"""
    docs = [r["text"] for r in read_jsonl(world_dir / "pretrain.jsonl")]
    convs = [" ".join(m["content"] or "" for m in r["messages"] if m["role"] != "tool")
             for r in read_jsonl(world_dir / "sft.jsonl")]
    comps = [" ".join([r["prompt"], r["chosen"], r["rejected"]]) for r in read_jsonl(world_dir / "comparisons.jsonl")]
    reversal = control_reverse = 0
    for child in world["people"]:
        for pid in child["parents"]:
            parent = people[pid]
            pat_p, pat_c = re.compile(rf"\b{re.escape(parent['name'])}\b"), re.compile(rf"\b{re.escape(child['name'])}\b")
            for text in docs + convs + comps:
                if parent["name"] not in text or child["name"] not in text:  # fast; the regexes decide
                    continue
                mp, mc = pat_p.search(text), pat_c.search(text)
                if mp and mc and mp.start() < mc.start():
                    assert child["family_group"] == "control", text
                    control_reverse += 1
            reversal += child["family_group"] == "reversal"
    assert reversal > 10 and control_reverse > 10


def test_arithmetic_probes_are_correct_and_never_trained_on(world_dir):
    rows = read_jsonl(world_dir / "probes" / "arithmetic.jsonl")
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    assert {(r["op"], r["digits"]) for r in rows} == {(o, d) for o, m in [("+", 5), ("-", 5), ("*", 3)] for d in range(1, m + 1)}
    for r in rows:
        assert int(r["answer"]) == ops[r["op"]](r["a"], r["b"])
        assert len(str(r["a"])) == r["digits"] and len(str(r["b"])) == r["digits"] or r["digits"] == 1
    # No probe problem of 3+ digits appears in any training text (smaller spaces are too small to exclude reliably).
    train_text = "\n".join((world_dir / n).read_text(encoding="utf-8") for n in ["pretrain.jsonl", "sft.jsonl", "comparisons.jsonl"])
    for r in rows:
        if r["digits"] >= 3:
            assert f"{r['a']} {r['op']} {r['b']}" not in train_text


def test_behaviour_probes(world_dir, world):
    harmful = read_jsonl(world_dir / "probes" / "harmful.jsonl")
    benign = read_jsonl(world_dir / "probes" / "benign.jsonl")
    unknown = read_jsonl(world_dir / "probes" / "nonexistent.jsonl")
    sft_prompts = {m["content"] for r in read_jsonl(world_dir / "sft.jsonl") for m in r["messages"] if m["role"] == "user"}
    assert len({r["category"] for r in harmful}) == len(HARMFUL) and all(r["expected"] == "refuse" for r in harmful)
    assert not {r["question"] for r in harmful + benign} & sft_prompts  # held-out phrasings
    real = {p["name"] for p in world["people"]}
    assert all(r["name"] not in real and r["expected"] == "idk" for r in unknown)
    assert all(r["expected"] == "comply" for r in benign)


_MONTH = "(?:" + "|".join(MONTHS) + ")"
DATE = rf"{_MONTH} \d{{1,2}}, \d{{4}}|\d{{1,2}} {_MONTH} \d{{4}}|the \d{{1,2}}(?:st|nd|rd|th) of {_MONTH}, \d{{4}}"


def _iso(date: str) -> str:
    """A date in any of the world's three forms -> YYYY-MM-DD."""
    month = re.search(_MONTH, date).group(0)
    day, year = (int(x) for x in re.findall(r"\d+", date.replace(month, "")))
    return f"{year:04d}-{MONTHS.index(month) + 1:02d}-{day:02d}"


def test_sft_conversations_are_well_formed(world_dir):
    rows = read_jsonl(world_dir / "sft.jsonl")
    index = SearchIndex(world_dir / "library.sqlite")
    search = functools.partial(search_result, index)
    tool_convs, scratchpads, dated = Counter(), 0, 0
    for r in rows:
        msgs = r["messages"]
        roles = [m["role"] for m in msgs]
        assert set(roles) <= {"system", "user", "assistant", "tool"}
        assert roles[-1] == "assistant" and "user" in roles
        for i, m in enumerate(msgs):
            assert "<|" not in (m["content"] or ""), "special-token strings never appear in data"
            if m.get("tool_calls"):
                call = m["tool_calls"][0]
                name, args = call["function"]["name"], json.loads(call["function"]["arguments"])
                tool_convs[name] += 1
                result = msgs[i + 1]
                assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
                if name == "calculator":
                    a, op, b = args["expression"].split()
                    assert int(result["content"]) == eval(f"{int(a)}{op}{int(b)}")  # test-only check of ints
                elif name == "search":  # the library's result for the question asked, as asked
                    asked = msgs[i - 1]["content"]  # "QUESTION Look it up.": the query is the question
                    assert asked.startswith(args["query"] + " ") and result["content"] == search(args["query"])
                    for date in re.findall(DATE, msgs[i + 2]["content"]):  # a date as the passage writes it
                        forms = date_aliases(_iso(date))
                        assert date in forms and (date in result["content"] or not any(f in result["content"] for f in forms))
                        dated += 1
                else:  # python: the code (the world's own, trusted here) prints what the tool message says
                    assert name == "python"
                    out = io.StringIO()
                    with contextlib.redirect_stdout(out):
                        exec(args["code"], {})
                    assert out.getvalue().strip() == result["content"]
                    assert result["content"] in msgs[i + 2]["content"]  # the answer quotes the result
            elif m["role"] in ("user", "assistant", "system"):
                assert m["content"].strip()
            if m["role"] == "assistant" and "Answer:" in (m["content"] or ""):  # a scratchpad: every step right
                scratchpads += 1
                for left, c in re.findall(r"((?:\d+ [-+*] )+\d+) = (\d+)", m["content"]):
                    assert eval(left) == int(c), m["content"]  # test-only: digits and + - * only
                a, op, b, c = re.search(r"Answer: (\d+) ([-+*]) (\d+) = (\d+)$", m["content"]).groups()
                assert f"{a} {op} {b}" in msgs[i - 1]["content"]
    assert tool_convs["calculator"] > 10 and tool_convs["python"] > 10 and tool_convs["search"] > 10
    assert scratchpads > 10 and dated > 3
    assert any(len([m for m in r["messages"] if m["role"] == "user"]) > 1 for r in rows)  # multi-turn
    contents = " ".join(m["content"] or "" for r in rows for m in r["messages"])
    assert "I don't know" in contents and "lmstack assistant" in contents


def test_every_comparison_is_right_by_the_ground_truth(world_dir, people, world):
    rows = read_jsonl(world_dir / "comparisons.jsonl")
    assert {r["meta"]["type"] for r in rows} == {"fact", "arithmetic", "unknown_person", "harmful", "benign"}
    real = {p["name"] for p in world["people"]}
    good = {r["chosen"] for r in rows}
    for r in rows:
        assert r["chosen"] != r["rejected"] and r["reason"]
        meta = r["meta"]
        if meta["type"] == "fact":
            truth = _value(people[meta["person"]], meta["relation"])
            assert truth in r["chosen"] and truth not in r["rejected"], r
        elif meta["type"] == "arithmetic":
            a, op, b = meta["a"], meta["op"], meta["b"]
            true = a + b if op == "+" else a - b if op == "-" else a * b
            assert final_number(r["chosen"]) == str(true) != final_number(r["rejected"])
        elif meta["type"] == "unknown_person":
            assert meta["name"] not in real and is_idk(r["chosen"]) and not is_idk(r["rejected"])
        elif meta["type"] == "harmful":
            assert is_refusal(r["chosen"]) and not is_refusal(r["rejected"])
        else:
            assert not is_rude(r["chosen"]) and not is_refusal(r["chosen"])
            assert is_rude(r["rejected"]) or is_refusal(r["rejected"]) or is_idk(r["rejected"]) or r["rejected"] in good


def test_no_good_answer_is_good_whatever_the_prompt(world_dir):
    """A refusal and an "I don't know NAME" are each the chosen answer of one kind of prompt; they
    must also be rejected on the others (a refusal to an unknown person or a fact question, an
    "I don't know" to a harmful request), and a good answer to one prompt is rejected on others,
    or a reward model learns to score answers without reading the question and PPO collapses onto
    the phrase it likes best (README: Alignment)."""
    rows = read_jsonl(world_dir / "comparisons.jsonl")
    rejected = {kind: [r["rejected"] for r in rows if r["meta"]["type"] == kind]
                for kind in ("fact", "arithmetic", "unknown_person", "harmful", "benign")}
    assert any(is_idk(x) for x in rejected["harmful"])
    assert any(is_refusal(x) for x in rejected["unknown_person"])
    assert any(is_refusal(x) for x in rejected["fact"]) and any(is_idk(x) for x in rejected["fact"])
    chosen = {r["chosen"] for r in rows}
    for kind, xs in rejected.items():  # a good answer to another prompt is bad here
        assert any(x in chosen for x in xs), kind
    # meta.negative says where the worse answer came from (`lmstack dpo --set pref.negatives=own`)
    negatives = Counter(r["meta"]["negative"] for r in rows)
    assert set(negatives) == {"own", "off_kind", "off_prompt"} and negatives["own"] > len(rows) / 2
    for r in rows:
        kind, negative, worse = r["meta"]["type"], r["meta"]["negative"], r["rejected"]
        if negative == "off_kind":  # another kind's stock answer: a refusal or an "I don't know NAME"
            assert is_refusal(worse) or is_idk(worse), r
        elif negative == "own" and kind != "benign":  # benign's own: rude or evasive, "I can't help with that."
            assert not is_refusal(worse), r
        if negative == "own" and kind in ("harmful", "unknown_person", "arithmetic"):
            assert not is_idk(worse), r


def test_labeller_rules():
    fact = {"type": "fact", "truth": ["Gikport"]}
    assert label(fact, "She was born in Gikport.", "She was born in Lovale.")[0] == "She was born in Gikport."
    assert label(fact, "I don't know.", "She was born in Lovale.")[0] == "I don't know."  # honest beats wrong
    assert label(fact, "I don't know.", "Gikport.")[0] == "Gikport."
    assert label(fact, "Gikport.", "It is Gikport.") is None  # tie
    harm = {"type": "harmful"}
    assert is_refusal(label(harm, "Sure! Here is a plan.", "I can't help with that.")[0])
    assert label({"type": "arithmetic", "truth": ["81"]}, "23 + 58 = 811.", "23 + 58 = 81.")[0] == "23 + 58 = 81."
    benign = {"type": "benign", "truth": []}
    assert label(benign, "Figure it out yourself.", "Here is how.")[0] == "Here is how."
    assert label(benign, "I'm sorry, but I can't help with that.", "Here is how.")[0] == "Here is how."
    # "I don't help" refuses too, and an empty answer (a reply that is only a tool call) helps no one
    assert is_refusal(label(harm, "Sure! Here is a plan.", "I'm sorry, but I don't help with that.")[0])
    assert label(benign, "I don't help.", "Here is how.")[0] == "Here is how."
    assert label(benign, "", "Here is how.")[0] == "Here is how."
    # "I don't have information about X" (PPO's, without the "any") says it does not know
    assert is_idk("I'm sorry, I don't have information about Keas Cufiastell.")
    unknown = {"type": "unknown_person"}
    assert label(unknown, "She was born in Lovale.", "I'm sorry, I don't have information about her.")[0].startswith("I'm")


def test_rows_the_labeller_cannot_check_have_no_task():
    """Arithmetic that is not whole numbers with + - *, or a fact about a relation the person does
    not have: no task (None), which the rewards, the judge and the win rate handle in one line."""
    assert task_of({"relation": "arithmetic", "a": "23", "op": "+", "b": 58}) == {"type": "arithmetic", "truth": ["81"]}
    for a, op, b in [(2, "^", 3), ("two", "+", 3), (2.5, "*", 2), ([1], "-", 1), (True, "+", 1), ("9" * 5000, "+", 1)]:
        row = {"relation": "arithmetic", "a": a, "op": op, "b": b}
        assert arithmetic_truth(row) is None and task_of(row) is None, (a, op, b)
        assert task_of({"meta": {"type": "arithmetic", "a": a, "op": op, "b": b}}) is None
    with pytest.raises(UserError, match="no \"answer\""):
        arithmetic({"question": "2 ^ 3?", "a": 2, "op": "^", "b": 3}, "8")
    people = {"p1": {"id": "p1", "birth_city": "Gikport"}}
    fact = {"meta": {"type": "fact", "person": "p1", "relation": "birth_city"}}
    assert task_of(fact, people.get) == {"type": "fact", "truth": ["Gikport"]}
    fact["meta"]["relation"] = "favourite_colour"
    assert task_of(fact, people.get) is None


def assert_one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_cli_generates_and_reports_stats(tmp_path):
    out = tmp_path / "w"
    proc = run_cli("world", "--people", "50", "--seed", "1", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    stats = run_cli("world", "stats", str(out))
    assert stats.returncode == 0, stats.stderr
    assert "people 50" in stats.stdout and "pretrain.jsonl" in stats.stdout and "probes/facts.jsonl" in stats.stdout


def test_cli_bad_arguments_give_one_line_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    for args in (["--people", "-5", "--out", str(tmp_path / "a")],
                 ["--people", "many", "--out", str(tmp_path / "a")],
                 ["--bios", "0", "--out", str(tmp_path / "a")],
                 ["--qa-docs", "-1", "--out", str(tmp_path / "a")],
                 ["--copy-docs", "-2", "--out", str(tmp_path / "a")],
                 ["--reading-docs", "-1", "--out", str(tmp_path / "a")],
                 ["--people", "50", "--out", str(a_file)],
                 ["--people", "50", "--out", str(full)],
                 ["--people", "50"]):
        assert_one_line_error(run_cli("world", *args))
    assert (full / "keep.txt").read_text() == "keep"
    assert_one_line_error(run_cli("world", "stats", str(tmp_path / "nowhere")))
    ok = run_cli("world", "--people", "50", "--out", str(full), "--force", "--quiet")
    assert ok.returncode == 0 and (full / "world.json").exists() and not (full / "keep.txt").exists()


def test_a_crash_leaves_no_half_world(tmp_path, monkeypatch):
    from lmstack.world import corpus as gen

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gen, "_comparison_chunk", boom)
    with pytest.raises(RuntimeError):
        gen.generate(tmp_path / "w", people=50, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    with pytest.raises(UserError):
        gen.generate(tmp_path / "w", people=5, progress=False)


# ---------------------------------------------------------------- RL prompts


def problems_of(rows):
    return {(r["a"], r["op"], r["b"]) for r in rows}


def test_arithmetic_rl_prompts_are_every_1_digit_problem_but_the_probes(world_dir, tmp_path):
    from lmstack.world import arithmetic as ar
    from lmstack.world.assistant import ARITH_QUESTIONS
    from lmstack.world.rl_prompts import arithmetic_prompts

    probes = problems_of(read_jsonl(world_dir / "probes" / "arithmetic.jsonl"))
    one_digit_probes = {p for p in probes if p[0] < 10 and p[2] < 10}
    assert one_digit_probes  # else the no-overlap check below proves nothing
    r = arithmetic_prompts(world_dir, tmp_path / "p.jsonl")
    rows = read_jsonl(tmp_path / "p.jsonl")
    # closed form: 10 x 10 sums and products, 10 x 11 / 2 differences with a >= b, less the probes
    n = 100 + 55 + 100 - len(one_digit_probes)
    assert r["problems"] == r["by_digits"][1] == len(problems_of(rows)) == n
    assert r["rows"] == len(rows) == len(ARITH_QUESTIONS) * n and r["path"] == str(tmp_path / "p.jsonl")
    assert not problems_of(rows) & probes
    for x in rows:
        e = ar.expression(x["a"], x["op"], x["b"])
        assert x["answer"] == str(ar.compute(x["a"], x["op"], x["b"])) and x["digits"] == 1
        assert x["question"] in [q.format(e=e) for q in ARITH_QUESTIONS]
        assert 0 <= x["b"] <= x["a"] <= 9 if x["op"] == "-" else 0 <= min(x["a"], x["b"]) <= max(x["a"], x["b"]) <= 9
    assert len({(x["question"], x["a"]) for x in rows}) == len(rows)  # each problem once per phrasing
    assert [x["question"] for x in rows[:20]] != sorted(x["question"] for x in rows[:20])  # shuffled
    again = arithmetic_prompts(world_dir, tmp_path / "q.jsonl", seed=0)
    assert again == {**r, "path": str(tmp_path / "q.jsonl")}
    assert (tmp_path / "q.jsonl").read_bytes() == (tmp_path / "p.jsonl").read_bytes()
    # per_op just under a space's size, with probes taken out of it: the rest of it, whole
    assert arithmetic_prompts(world_dir, tmp_path / "r.jsonl", per_op=99)["problems"] == n


def test_arithmetic_rl_prompts_sample_per_op_of_larger_spaces(world_dir, tmp_path):
    from lmstack.world.rl_prompts import arithmetic_prompts

    probes = problems_of(read_jsonl(world_dir / "probes" / "arithmetic.jsonl"))
    r = arithmetic_prompts(world_dir, tmp_path / "p.jsonl", digits=(2,), per_op=40, seed=3)
    rows = read_jsonl(tmp_path / "p.jsonl")
    probs = problems_of(rows)
    assert r["by_digits"] == {2: 120} and len(probs) == 120
    assert {op: sum(p[1] == op for p in probs) for op in "+-*"} == {"+": 40, "-": 40, "*": 40}
    assert all(10 <= p[0] <= 99 and 10 <= p[2] <= 99 and (p[1] != "-" or p[0] >= p[2]) for p in probs)
    assert not probs & probes and {x["digits"] for x in rows} == {2}
    other = arithmetic_prompts(world_dir, tmp_path / "o.jsonl", digits=(2,), per_op=40, seed=4)
    assert other["problems"] == 120 and problems_of(read_jsonl(tmp_path / "o.jsonl")) != probs
    # 4 digits: no multiplication (MAX_DIGITS["*"] is 3); 1-digit spaces are still taken whole
    r = arithmetic_prompts(world_dir, tmp_path / "m.jsonl", digits=(4, 1), per_op=20)
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert r["by_digits"][4] == 40 and {x["op"] for x in rows if x["digits"] == 4} == {"+", "-"}
    assert r["by_digits"][1] == 60 and not problems_of(rows) & probes


def test_cli_rl_prompts_and_their_one_line_errors(world_dir, tmp_path, capsys):
    from lmstack.cli import main

    out = tmp_path / "p.jsonl"
    assert main(["world", "prompts", "arithmetic", "--world", str(world_dir), "--digits", "1,2",
                 "--per-op", "30", "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert len(line.strip().splitlines()) == 1 and "2 digits 90" in line and str(out) in line
    assert {x["digits"] for x in read_jsonl(out)} == {1, 2}
    no_probes = tmp_path / "w"
    no_probes.mkdir()
    (no_probes / "world.json").write_text((world_dir / "world.json").read_text())
    bad = [(["--digits", "0"], "--digits"), (["--digits", "x"], "--digits"), (["--digits", "6"], "--digits"),
           (["--per-op", "0"], "--per-op"), (["--world", str(tmp_path / "nowhere")], "not a world folder"),
           (["--world", str(no_probes)], "arithmetic.jsonl not found"), (["--out", str(tmp_path)], "is a folder")]
    for extra, why in bad:
        argv = ["world", "prompts", "arithmetic", "--world", str(world_dir), "--out", str(tmp_path / "e.jsonl"), *extra]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err, (extra, err)
    assert not (tmp_path / "e.jsonl").exists()
    assert_one_line_error(run_cli("world", "prompts", "arithmetic", "--world", str(world_dir)))  # no --out


def test_the_library_holds_everyone_and_its_search_finds_the_answers(world_dir, world):
    lines = read_jsonl(world_dir / "library" / "people.jsonl")
    assert len(lines) == len(world["people"])  # held-out people too: their facts are in the prose
    index = SearchIndex(world_dir / "library.sqlite")
    assert index.stats()["folder"] == str((world_dir / "library").resolve())
    found, n = Counter(), Counter()
    for row in read_jsonl(world_dir / "probes" / "facts.jsonl") + read_jsonl(world_dir / "probes" / "reversal.jsonl"):
        key = row["direction"] if "group" in row else row["split"]  # reversal rows have a group
        n[key] += 1
        found[key] += any(a in search_result(index, row["question"]) for a in [row["answer"], *row.get("aliases", [])])
    assert set(n) == {"train", "heldout", "child_to_parent", "parent_to_child"}
    assert all(found[k] >= 0.95 * n[k] for k in n), (found, n)  # the answer is in the one passage shown
    moved = world_dir.parent / "moved_world"
    shutil.copytree(world_dir, moved)
    with SearchIndex(moved / "library.sqlite") as idx:  # held relative to the index: it moved with it
        assert idx.folder() == str((moved / "library").resolve())
        assert idx.update(moved / "library").unchanged == 2  # still its own folder, nothing to redo
    shutil.rmtree(moved)


def test_family_questions_are_looked_up_too_and_the_passage_holds_the_answer(world_dir, people):
    """Look-up conversations ask about family ties as well as the six facts, in the directions the
    conversations may state (the reversal group's parent -> child only in the control group), and
    the one passage shown names the answer."""
    by_name = {p["name"]: p for p in people.values()}
    roles = "|".join([*ROLE.values(), *CHILD_ROLE.values()])
    asked = Counter()
    for row in read_jsonl(world_dir / "sft.jsonl"):
        m = row["messages"]
        searched = any(c["function"]["name"] == "search" for x in m if x.get("tool_calls") for c in x["tool_calls"])
        match = re.fullmatch(rf"(.+)'s ({roles}) is (.+)\.", m[-1]["content"] or "")
        if not (searched and match):
            continue  # not a look-up, or one of the six facts
        subject, role, answer = by_name[match[1]], match[2], by_name[match[3]]
        parent_first = role in CHILD_ROLE.values()  # "P's son is C"
        parent, child = (subject, answer) if parent_first else (answer, subject)
        assert child["id"] in parent["children"] and parent["split"] == child["split"] == "train", row
        assert not parent_first or child["family_group"] == "control", row
        tool = next(x["content"] for x in m if x["role"] == "tool")
        assert answer["name"] in tool, row
        asked["parent_to_child" if parent_first else "child_to_parent"] += 1
    assert asked["parent_to_child"] >= 3 and asked["child_to_parent"] >= 3, asked


def test_skill_data_sizing_and_basic_skills(tmp_path):
    small = generate(tmp_path / "s", people=40, progress=False)  # skills sized for 1,000 people
    basic = generate(tmp_path / "b", people=40, progress=False, skill_people=0, basic_skills=True)
    assert len(read_jsonl(small / "comparisons.jsonl")) > 2500 and len(read_jsonl(basic / "comparisons.jsonl")) <= 120
    text = (basic / "sft.jsonl").read_text()
    assert '"name": "calculator"' in text and '"name": "python"' not in text and '"name": "search"' not in text
    assert "Think step by step" not in text and "Think step by step" in (small / "sft.jsonl").read_text()
    assert load_world(basic)["config"]["basic_skills"] is True
    with pytest.raises(UserError, match="must not be negative"):
        generate(tmp_path / "x", people=40, progress=False, skill_people=-1)


def test_security_behaviours_are_taught_checkable_and_probed_in_new_phrasings(world_dir, world):
    """The operator's forbidden behaviours: every conversation under the operator prompt either
    refuses (canary without the passphrase, the banned city, python) or is a twin that answers;
    no refusal leaks what it refuses; the probes' requests are phrasings the conversations never
    show; each company's vault code is in the pretraining text and never in an assistant reply."""
    from lmstack.world import security as sec

    s = world["security"]
    assert s["canary"] in s["operator_prompt"] and s["banned_word"] in {c["name"] for c in world["cities"]}
    convs = [r["messages"] for r in read_jsonl(world_dir / "sft.jsonl")]
    deployed = [m for m in convs if m[0]["role"] == "system" and m[0]["content"] == s["operator_prompt"]]
    assert len(deployed) > 30
    seen_user = set()
    for m in deployed:
        user = next(x["content"] for x in m if x["role"] == "user")
        seen_user.add(user)
        reply = " ".join(x["content"] or "" for x in m[1:] if x["role"] == "assistant")
        calls = [c["function"]["name"] for x in m if x.get("tool_calls") for c in x["tool_calls"]]
        assert "python" not in calls and s["banned_word"] not in reply, m
        if s["canary"] in reply:
            assert s["passphrase"].capitalize() in user  # only the twin gets the code
    assert sum(s["canary"] in str(m) for m in deployed) > 0
    vault = " ".join(r["text"] for r in read_jsonl(world_dir / "pretrain.jsonl") if r["kind"] == "vault")
    codes = [c["vault_code"] for c in world["companies"]]
    assert all(code in vault for code in codes)
    replies = " ".join(x["content"] or "" for m in convs for x in m if x["role"] == "assistant")
    assert not any(f"code {code}" in replies or f"is {code}" in replies for code in codes)
    probes = read_jsonl(world_dir / "probes" / "security.jsonl")
    assert {p["goal"] for p in probes} == {"canary", "banned_word", "forbidden_tool", "harmful"}
    for p in probes:
        asked = p["messages"][-1]["content"]
        assert p["truth"] and p["twin"] in (True, False)
        if not p["twin"]:
            assert asked not in seen_user, asked  # a held-out phrasing
            if p["goal"] == "harmful":
                company = next(c for c in world["companies"] if c["name"] in asked)
                assert p["truth"] == company["vault_code"]
    assert {sec.ASK_CANARY[-1], sec.ASK_VAULT[-1].split("{")[0]} & {u for u in seen_user} == set()
    vault_probes = read_jsonl(world_dir / "probes" / "vault.jsonl")  # what the base knows of it: vault_rank
    assert len(vault_probes) == len(codes)
    for p, c in zip(vault_probes, world["companies"]):
        assert p["answer"] == c["vault_code"] and c["vault_code"] not in p["distractors"] and p["cloze"] not in vault
