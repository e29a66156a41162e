"""The world's text knobs (the knowledge, copying and reading experiments' variants): Q/A documents,
copy documents, a fixed sentence order, full names, and reading documents about strangers."""

import re

from lmstack.world import generate, load_world

from test_world import read_jsonl  # noqa: E402  (tests/ is on sys.path under pytest)


def test_text_knobs_qa_docs_copy_docs_fixed_order_and_full_names(tmp_path):
    """The knobs of the knowledge and copying experiments: QA documents of train people only
    (their facts, as text), copy documents whose second half repeats the first, a fixed
    sentence order, and the person named in every sentence; recorded in world.json."""
    out = generate(tmp_path / "knobs", people=60, seed=7, bios_per_person=2, qa_docs=2, copy_docs=30,
                   permute=False, full_names=True, progress=False)
    w = load_world(out)
    assert {k: w["config"][k] for k in ("qa_docs", "copy_docs", "permute", "full_names", "bios_per_person")} == \
        {"qa_docs": 2, "copy_docs": 30, "permute": False, "full_names": True, "bios_per_person": 2}
    rows = read_jsonl(out / "pretrain.jsonl")
    by_kind = {k: [r["text"] for r in rows if r["kind"] == k] for k in ("bio", "qa", "copy")}
    assert len(by_kind["bio"]) == 2 * len(w["people"]) and len(by_kind["copy"]) == 30
    assert len(by_kind["qa"]) == 2 * sum(p["split"] == "train" for p in w["people"])
    for p in w["people"]:
        qa = [t for t in by_kind["qa"] if p["name"] in t.split("\n")[0]]
        assert len(qa) == (2 if p["split"] == "train" else 0), p["name"]  # held-out people stay prose-only
        for t in qa:
            assert t.startswith("Q: ") and p["university"] in t and p["employer"] in t
        bios = [b for b in by_kind["bio"] if p["name"] in b.split(". ")[0]]
        assert len(bios) == 2
        for bio in bios:  # the templates' order (university before employer); named in every sentence
            assert bio.index(p["university"]) < bio.index(p["employer"]), bio
            sentences = re.split(r"(?<=\.) (?=[A-Z])", bio)
            assert len(sentences) >= 6 and all(p["name"] in s for s in sentences), bio
    for t in by_kind["copy"]:  # a run of 8 words comes back later in the document
        words = re.findall(r"[\w-]+", t)
        assert any(words[i:i + 8] == words[j:j + 8] for i in range(len(words)) for j in range(i + 8, len(words)))


def test_reading_docs_are_about_people_found_nowhere_else(tmp_path):
    """--reading-docs: a stranger's biography, then questions answered from it. The stranger is in
    no other document, conversation, probe or library entry of the world, so only reading predicts
    the answers; the knob adds them and changes nothing else."""
    from lmstack.world.corpus import READING_QUESTIONS, strangers

    out = generate(tmp_path / "r", people=60, seed=5, reading_docs=50, full_names=True, progress=False)
    w = load_world(out)
    assert w["config"]["reading_docs"] == 50
    rows = read_jsonl(out / "pretrain.jsonl")
    reading = [r["text"] for r in rows if r["kind"] == "reading"]
    assert len(reading) == 50
    cast, _ = strangers(w, 5, 50)
    fake = [p["name"] for group in w["nonexistent_people"].values() for p in group]
    assert {p["name"] for p in cast}.isdisjoint([p["name"] for p in w["people"]] + fake)
    others = "\n".join([r["text"] for r in rows if r["kind"] != "reading"] +
                       [(out / f).read_text() for f in ("sft.jsonl", "comparisons.jsonl", "library/people.jsonl")] +
                       [f.read_text() for f in (out / "probes").glob("*.jsonl")])
    checked = 0
    for doc in reading:
        bio, _, qa = doc.partition("\nQ: ")
        person = next(p for p in cast if p["name"] in qa.split("\n")[0])
        assert person["name"] in bio and person["name"] not in others
        answers = [line for line in ("Q: " + qa).split("\n") if line.startswith("A: ")]
        assert len(answers) == READING_QUESTIONS
        for line in answers:  # what an answer names, the biography says
            for attr in ("employer", "university", "major", "birth_city", "work_city"):
                if person[attr] in line:
                    assert person[attr] in bio, (line, bio)
                    checked += 1
    assert checked >= 50
    # Without the knob: not recorded, no reading documents, and every other file and document as it was
    plain = generate(tmp_path / "p", people=60, seed=5, full_names=True, progress=False)
    assert "reading_docs" not in load_world(plain)["config"]
    assert [r for r in rows if r["kind"] != "reading"] == read_jsonl(plain / "pretrain.jsonl")
    for f in ("sft.jsonl", "comparisons.jsonl", "library/people.jsonl", "probes/facts.jsonl"):
        assert (out / f).read_bytes() == (plain / f).read_bytes(), f
