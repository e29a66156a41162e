"""`lmstack experiment run | list | show`: recipes, the runner (tiny scale, a 40-person world: seconds)
and the results store."""

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.config import load_config
from lmstack.experiments import run as xrun
from lmstack.experiments.run import PRACTICE_PEOPLE
from lmstack.experiments.recipe import (
    READER_SET,
    builtin_names,
    check_scale,
    load_recipe,
    run_settings,
)
from lmstack.experiments.store import append_records, read_records
from lmstack.model import GPT
from lmstack.modelio import read_config
from lmstack.speedrun import PEOPLE, PRETRAIN_SET, SFT_SET, world_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.world.assistant import as_retrieved

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = {"experiment", "variant", "scale", "seed", "commit", "time", "model", "stage", "N", "N_total", "D",
          "flops", "val_loss", "metrics", "command"}
METRIC = {"acc", "ci", "n", "chance", "baseline", "baseline_ci", "better"}
# A test-only recipe: a 40-person world, 6 pretraining steps (a checkpoint at 3), 3 SFT steps.
MINI = """
description = "a test"
headline = ["base reversal_rank group+direction=*", "chat facts_qa split=heldout", "base copy"]
world = { people = 40 }
pretrain = ["train.max_steps=6", "train.save_every=3"]
sft = ["train.max_steps=3"]

[eval]
base = ["reversal_rank", "copy"]
chat = ["facts_qa"]

[variants.a]
"""


def recipe(tmp_path, text=MINI, name="mini"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


def run(tmp_path, name, **kw):
    return xrun.run_experiment(name, scale="tiny", out=tmp_path / "runs", results=tmp_path / "results", **kw)


def test_builtin_recipes_parse_and_fit_every_scale():
    assert {"reversal", "knowledge", "icl", "arithmetic", "reading"} <= set(builtin_names())
    for name in builtin_names():
        r = load_recipe(name)
        assert r.description and r.variants and r.headline, name
        for scale in ("tiny", "small", "gpt2"):
            check_scale(r, scale)
    knowledge = load_recipe("knowledge")
    assert [v.name for v in knowledge.variants] == ["single", "multi5_permute", "multi5_permute_fullname", "mixed_qa"]
    assert knowledge.variants[0].world == {"heldout_fraction": 0.5, "bios_per_person": 1, "permute": False,
                                           "full_names": False, "qa_docs": 0}
    # every knowledge variant names every text knob: the scale's own choices (WORLD_SET) never leak in
    small = [run_settings(v, "small", 0)["world"] for v in knowledge.variants]
    assert [(w["qa_docs"], w["full_names"]) for w in small] == [(0, False), (0, False), (0, True), (1, True)]
    # the speedrun's world size and SFT settings for the scale, the seed, and a count given per person
    sets = run_settings(load_recipe("icl").variants[1], "tiny", 3)
    assert sets["world"]["people"] == sets["world"]["copy_docs"] == PEOPLE["tiny"] and sets["world"]["seed"] == 3
    assert sets["pretrain"] == ["train.seed=3"] and sets["sft"] == [*SFT_SET["tiny"], "train.seed=3"]
    # the optimizer experiment: Muon pretrains and fine-tunes its variant, AdamW the other
    opt = {v.name: run_settings(v, "small", 0) for v in load_recipe("optimizer").variants}
    assert "optim.optimizer=muon" in opt["muon"]["pretrain"] and opt["muon"]["sft"][-2:] == ["optim.optimizer=muon",
                                                                                            "train.seed=0"]
    assert "optim.optimizer=adamw" in opt["adamw"]["pretrain"] and not any("muon" in s for s in opt["adamw"]["sft"])
    reading = {v.name: run_settings(v, "small", 0) for v in load_recipe("reading").variants}
    assert reading["tokenizer_text_only"]["tokenizer"] == {"conversations": False} and "tokenizer" not in reading[
        "plain"]
    # copy rows throughout keep as many text rows as the scale has: (1 - copy_fraction) x their steps = the speedrun's steps
    speedrun = load_config("small", PRETRAIN_SET["small"]).train.max_steps
    for name in ("smeared_keys_copy_third", "smeared_keys_copy_text_third"):
        cfg = load_config("small", reading[name]["pretrain"])
        assert round(cfg.train.max_steps * (1 - cfg.data.copy_fraction)) == speedrun, name


def test_run_records_skips_and_shows(tmp_path, capsys):
    name = recipe(tmp_path)
    added = run(tmp_path, name, seeds=2)
    store = tmp_path / "results" / "mini.jsonl"
    lines = store.read_text().splitlines()
    assert len(lines) == len(added) == 4  # 2 seeds x (base, chat)
    for rec in map(json.loads, lines):
        assert set(rec) == FIELDS and rec["experiment"] == "mini" and rec["scale"] == "tiny"
        assert rec["command"] == (f"lmstack experiment run {name} --scale tiny --seeds 2 --out {tmp_path / 'runs'} "
                                  f"--results {tmp_path / 'results'}")
        folder = tmp_path / "runs" / "tiny" / "a" / f"seed{rec['seed']}"
        assert rec["model"] == str(folder / rec["stage"])
        with torch.device("meta"):
            model = GPT(read_config(folder / "base"))
        assert rec["D"] == 6 * 2048 and rec["N"] == model.num_params(False) and rec["N_total"] == model.num_params()
        assert rec["flops"] == model.flops_per_token(64) * rec["D"] and 0 < rec["val_loss"] < 8
        tasks = {"base": {"reversal_rank", "copy"}, "chat": {"facts_qa"}}[rec["stage"]]
        assert set(rec["metrics"]) == tasks
        for m in rec["metrics"].values():
            assert METRIC <= set(m) and len(m["ci"]) == 2 and m["n"] > 0
        if rec["stage"] == "base":
            rank = rec["metrics"]["reversal_rank"]
            assert rank["baseline"] is not None and rank["slices"] and rank["n"] == 20  # the tiny scale's limit
            assert all(s["baseline"] is not None for s in rank["slices"].values())
            assert rec["metrics"]["copy"]["better"] == "lower" and rec["metrics"]["copy"]["chance"] == 1.0
        else:
            qa = rec["metrics"]["facts_qa"]
            assert qa["baseline"] is None and {"split=train", "split=heldout"} <= set(qa["slices"])
    # the world and training seeds follow the seed
    worlds = [json.loads((tmp_path / "runs" / "tiny" / "a" / f"seed{k}" / "world" / "world.json").read_text())
              for k in (0, 1)]
    assert [w["config"]["seed"] for w in worlds] == [0, 1] and worlds[0]["people"] != worlds[1]["people"]

    weights = tmp_path / "runs" / "tiny" / "a" / "seed0" / "base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert run(tmp_path, name, seeds=2) == []  # all finished: nothing trained, nothing added
    assert "2 in the store, 0 to run" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == before and store.read_text().splitlines() == lines

    assert main(["experiment", "show", name, "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "a @ tiny: seeds 0, 1" in out and "base reversal_rank group+direction=reversal/parent_to_child" in out
    assert "chat facts_qa split=heldout" in out and "base copy" in out and " sd " in out
    assert f"re-run: lmstack experiment run {name} --scale tiny --seeds 2" in out
    assert main(["experiment", "list", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "mini           2 run(s) (tiny)" in out
    for builtin in builtin_names():
        assert f"{builtin} " in out and "0 run(s)" in out


def test_a_stopped_run_goes_on(tmp_path, monkeypatch, capsys):
    """Killed mid-pretraining (a checkpoint at step 3 of 6): the next call resumes it; killed during the
    evaluation: the next call trains nothing and records the run."""
    name = recipe(tmp_path)
    real = xrun.pretrain

    def stopped(preset, data, out, overrides, resume):  # trains 3 steps, saves, then "the kill"
        real(preset, data, out, [*overrides, "train.max_steps=3"], resume=resume)
        raise KeyboardInterrupt

    monkeypatch.setattr(xrun, "pretrain", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, name)
    folder = tmp_path / "runs" / "tiny" / "a" / "seed0"
    assert set(json.loads((folder / "experiment.json").read_text())["done"]) == {"world", "tokenizer", "data"}

    def no_eval(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(xrun, "pretrain", real)
    monkeypatch.setattr(xrun, "evaluate", no_eval)
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, name)
    assert "steps 3->6" in capsys.readouterr().out  # resumed from the checkpoint, not from step 0
    steps = [json.loads(line)["step"] for line in (folder / "base" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "results" / "mini.jsonl").exists()

    def no_training(*a, **kw):
        raise AssertionError("a finished stage ran again")

    monkeypatch.undo()
    for stage in ("pretrain", "sft", "generate", "world_tokenizer", "prepare"):
        monkeypatch.setattr(xrun, stage, no_training)
    records = run(tmp_path, name)
    assert [r["stage"] for r in records] == ["base", "chat"]
    assert [r["stage"] for r in read_records(tmp_path / "results" / "mini.jsonl")] == ["base", "chat"]


def test_the_store_keeps_whole_lines(tmp_path, capsys):
    path = tmp_path / "x.jsonl"
    rec = {"variant": "a", "scale": "tiny", "seed": 0, "stage": "base", "metrics": {}}
    append_records(path, [rec, {**rec, "seed": 1}])
    with open(path, "a") as f:
        f.write('{"variant": "a", "sc')  # a line torn by a crash mid-write
    append_records(path, [{**rec, "seed": 2}, {"not": "a record"}])
    assert json.loads(path.read_text().splitlines()[-2]) == {**rec, "seed": 2}
    assert [r["seed"] for r in read_records(path)] == [0, 1, 2]
    assert "passed over 2 line(s)" in capsys.readouterr().out
    with pytest.raises(ValueError):  # never NaN in the store: strict JSON
        append_records(path, [{**rec, "metrics": float("nan")}])


def error(capsys, *args) -> str:
    assert main(["experiment", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: ") and err.count("\n") == 1, err
    return err


def test_the_reader_stage_learns_look_ups_of_people_it_never_saw(tmp_path):
    """stages up to "reader": the chat model fine-tuned on look-ups (the world's and a practice
    world's, none about a person of the world by name), scored as `reader`."""
    text = (MINI.replace('description = "a test"', 'description = "a test"\nstages = ["world", "tokenizer", "data", '
                         '"pretrain", "sft", "reader"]')
            .replace('"base copy"]', '"reader facts_qa split=heldout"]')
            .replace('chat = ["facts_qa"]', 'chat = ["facts_qa"]\nreader = ["facts_qa"]')
            + '\n[variants.r]\nreader = { lookups = "retrieved" }\n[variants.p]\nreader = { practice_lookups = 5 }\n')
    added = run(tmp_path, recipe(tmp_path, text, "rd"))
    assert [r["stage"] for r in added] == ["base", "chat", "reader"] * 3
    folder = tmp_path / "runs" / "tiny" / "a" / "seed0"
    settings = json.loads((folder / "experiment.json").read_text())["settings"]
    assert settings["reader"] == [*READER_SET["tiny"], "train.seed=0"] and "reader" not in run_settings(
        load_recipe(recipe(tmp_path)).variants[0], "tiny", 0)  # other recipes' runs keep their settings
    rows = [json.loads(line) for line in (folder / "lookups.jsonl").read_text().splitlines()]
    names = {p["name"] for p in json.loads((folder / "world" / "world.json").read_text())["people"]}
    assert len(rows) == PRACTICE_PEOPLE["tiny"] and all(xrun._looks_up(r) for r in rows)  # tiny's world has none
    assert not any(n in xrun._text(r) for r in rows for n in names)
    lineage = json.loads((folder / "reader" / "sft.json").read_text())
    assert lineage["base"] == str(folder / "chat") and lineage["data"][0] == str(folder / "lookups.jsonl")
    # reader = { lookups = "retrieved" }: the same look-ups, the passage before the question
    other = tmp_path / "runs" / "tiny" / "r" / "seed0"
    assert json.loads((other / "experiment.json").read_text())["settings"]["reader_lookups"] == "retrieved"
    assert "reader_lookups" not in settings
    shown = [json.loads(line) for line in (other / "lookups.jsonl").read_text().splitlines()]
    assert len(shown) == len(rows) and all(as_retrieved(r["messages"]) == s["messages"] for r, s in zip(rows, shown))
    for r in shown:
        msgs = [m for m in r["messages"] if m["role"] != "system"]
        assert [m["role"] for m in msgs] == ["assistant", "tool", "user", "assistant"] and msgs[0]["weight"] == 0
        assert msgs[2]["content"] in msgs[0]["tool_calls"][0]["function"]["arguments"]  # the question, asked plainly
    # reader = { practice_lookups = 5 }: 5 more fact look-ups about the practice world's people
    more = tmp_path / "runs" / "tiny" / "p" / "seed0"
    assert json.loads((more / "experiment.json").read_text())["settings"]["reader_practice_lookups"] == 5
    assert "reader_practice_lookups" not in settings
    extra = [json.loads(line) for line in (more / "lookups.jsonl").read_text().splitlines()]
    assert len(extra) == len(rows) + 5 and all(xrun._looks_up(r) for r in extra)
    assert not any(n in xrun._text(r) for r in extra for n in names)
    assert [r for r in extra if r not in rows] == [r for r in extra if '"call_p' in json.dumps(r)]
    plain = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    assert as_retrieved(plain) == plain  # not a look-up: as it is
    assert xrun._looks_up({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "search", "arguments": "{}"}}]}]})
    assert not xrun._looks_up({"messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "calculator", "arguments": "{}"}}]}, {"role": "user", "content": "search"}]})


def test_the_tokenizer_fits_the_conversations_too_unless_a_knob_says_not(tmp_path):
    """By default a run's tokenizer is trained on its world's pretraining text and conversations;
    tokenizer = { conversations = false } (the speedrun's --set tokenizer.conversations=false) on
    the text alone, and the settings say so."""
    text = """
description = "tokenizers"
stages = ["world", "tokenizer", "data", "pretrain"]
headline = ["base copy"]
world = { people = 40 }
pretrain = ["train.max_steps=1"]

[eval]
base = ["copy"]

[variants.plain]

[variants.text_only]
tokenizer = { conversations = false }
"""
    run(tmp_path, recipe(tmp_path, text, "tk"))
    folders = {v: tmp_path / "runs" / "tiny" / v / "seed0" for v in ("plain", "text_only")}
    settings = {v: json.loads((f / "experiment.json").read_text())["settings"] for v, f in folders.items()}
    assert settings["text_only"]["tokenizer"] == {"conversations": False} and "tokenizer" not in settings["plain"]
    world = folders["plain"] / "world"
    assert (world / "sft.jsonl").read_bytes() == (folders["text_only"] / "world" / "sft.jsonl").read_bytes()
    world_tokenizer(world, tmp_path / "with", "tiny", conversations=True)
    world_tokenizer(world, tmp_path / "without", "tiny", conversations=False)
    tokens = {v: (f / "tokenizer" / "tokenizer.json").read_bytes() for v, f in folders.items()}
    assert tokens["plain"] == (tmp_path / "with" / "tokenizer.json").read_bytes() != tokens["text_only"]
    assert tokens["text_only"] == (tmp_path / "without" / "tokenizer.json").read_bytes()
    chats = [" ".join(m["content"] or "" for m in json.loads(line)["messages"])
             for line in (world / "sft.jsonl").read_text().splitlines()]
    count = {v: sum(len(Tokenizer.load(f / "tokenizer").encode(c)) for c in chats) for v, f in folders.items()}
    assert count["plain"] < count["text_only"]  # the conversations take fewer tokens


def test_bad_input_is_one_line(tmp_path, capsys):
    ok = recipe(tmp_path)
    (tmp_path / "file").write_text("x")
    cases = [
        (["run", "nope"], "unknown experiment 'nope'"),
        (["run", tmp_path / "missing.toml"], "does not exist"),
        (["run", recipe(tmp_path, "description = [", "bad")], "not readable TOML"),
        (["run", recipe(tmp_path, MINI + "colour = 1\n", "key")], "unknown key 'colour'"),
        (["run", recipe(tmp_path, MINI.replace("people", "persons"), "knob")], "unknown world knob world.persons"),
        (["run", recipe(tmp_path, MINI.replace('"copy"]', '"copy", "refusal"]'), "chat")], "needs a chat model"),
        (["run", recipe(tmp_path, MINI.replace('"copy"]', '"copyy"]'), "task")], "unknown task 'copyy'"),
        (["run", recipe(tmp_path, MINI.replace("split=heldout", "colour=red"), "slice")], "facts_qa's slices"),
        (["run", recipe(tmp_path, MINI.replace("people = 40", "people = 4.5"), "type")], "must be int"),
        (["run", recipe(tmp_path, MINI.replace("people = 40", "people = 40, permute = 1"), "bool")], "must be bool"),
        (["run", recipe(tmp_path, MINI + "tokenizer = { vocab = 9 }\n", "tk1")], "unknown tokenizer knob "
         "variants.a.tokenizer.vocab"),
        (["run", recipe(tmp_path, MINI + "tokenizer = { conversations = 1 }\n", "tk2")], "must be bool"),
        (["run", recipe(tmp_path, MINI + "tokenizer = 1\n", "tk3")], "must be a table of tokenizer knobs"),
        (["run", recipe(tmp_path, MINI + 'reader = { lookups = "retrieved" }\n', "rd1")],
         "reader knobs need the reader stage"),
        (["run", recipe(tmp_path, 'stages = ["world", "tokenizer", "data", "pretrain", "sft", "reader"]\n' + MINI
                        + 'reader = { lookups = "after" }\n', "rd2")],
         "reader.lookups must be one of called, retrieved"),
        (["run", recipe(tmp_path, MINI + 'reader = { shape = "x" }\n', "rd3")], "unknown reader knob"),
        (["run", recipe(tmp_path, 'stages = ["world", "tokenizer", "data", "pretrain", "sft", "reader"]\n' + MINI
                        + 'reader = { practice_lookups = -1 }\n', "rd4")], "reader.practice_lookups must be >= 0"),
        (["run", recipe(tmp_path, 'stages = ["world", "tokenizer", "data", "pretrain", "sft", "reader"]\n' + MINI
                        + 'reader = { practice_lookups = "many" }\n', "rd5")], "reader.practice_lookups must be int"),
        (["run", recipe(tmp_path, MINI.replace("[variants.a]", ""), "none")], "at least one variant"),
        (["run", recipe(tmp_path, MINI.replace('"train.max_steps=3"', '"train.max_stepz=3"'), "set")],
         "unknown config key 'train.max_stepz'"),
        (["run", recipe(tmp_path, 'stages = ["world", "pretrain"]\n' + MINI, "stages")], "stages must be"),
        (["run", recipe(tmp_path, MINI.replace('chat = ["facts_qa"]', 'reader = ["facts_qa"]'), "noreader")],
         "the reader stage does not run"),
        (["run", ok, "--scale", "huge"], "--scale huge: unknown preset"),
        (["run", ok, "--scale", "tiny", "--seeds", "0"], "--seeds must be at least 1"),
        (["run", ok, "--scale", "tiny", "--variants", "b"], "variants are a"),
        (["run", ok, "--scale", "tiny", "--out", tmp_path / "file"], "is a file"),
        (["run", ok, "--scale", "tiny", "--results", tmp_path / "file"], "is a file"),
        (["show", "nope"], "unknown experiment 'nope'"),
    ]
    for args, message in cases:
        assert message in error(capsys, *args), args
    # a run folder made by another recipe (or this one before it changed) is not reused
    folder = tmp_path / "runs" / "tiny" / "a" / "seed0"
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"settings": {"world": {"people": 41}}, "done": {}}))
    assert "other settings" in error(capsys, "run", ok, "--scale", "tiny", "--out", tmp_path / "runs",
                                     "--results", tmp_path / "results")
    assert main(["experiment", "show", ok, "--results", str(tmp_path / "results")]) == 0
    assert "no runs yet" in capsys.readouterr().out
