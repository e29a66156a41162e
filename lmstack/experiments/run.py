"""`lmstack experiment run | list | show`: named experiments over the existing stages, recorded.

    lmstack experiment run reversal --scale small --seeds 3     # every variant x seed not yet in the store
    lmstack experiment list                                     # the built-in experiments, runs stored
    lmstack experiment show reversal                            # mean over seeds of the headline metrics

A run is one (variant, scale, seed): the speedrun's stages (world -> tokenizer -> data -> pretrain
[-> sft [-> reader]]) with the recipe's knobs, the speedrun's settings for that scale (world size, vocabulary,
SFT settings, rows per task), seed k for the world and for training; then `lmstack eval`'s tasks
on the models the recipe names, one line per model in the store (store.py). Its folder,
OUT/SCALE/VARIANT/seedK, holds every stage's output and experiment.json (the run's settings and
the stages done). Run again, the same command skips the runs in the store, and a run that was
stopped goes on: finished stages are kept, an interrupted training resumes from its last
checkpoint (or restarts, when it stopped before one), a half-written world, tokenizer or data
folder is written again.
"""

from __future__ import annotations

import json
import random
import shlex
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from lmstack.data import prepare
from lmstack.eval.run import evaluate
from lmstack.experiments.recipe import (
    LOOKUP_SHAPES,
    MODELS,
    READER_MIX,
    Recipe,
    builtin_names,
    check_scale,
    load_recipe,
    reader_settings,
    run_settings,
)
from lmstack.experiments.store import (
    MEASURES,
    append_records,
    metrics,
    model_size,
    read_records,
    rounded,
    run_key,
    store_path,
)
from lmstack.sources import message_contents
from lmstack.speedrun import EVAL_LIMIT, VAL_FRACTION, sft_mix, world_tokenizer
from lmstack.tools.search import SearchIndex
from lmstack.train.pretrain import pretrain
from lmstack.train.sft import sft
from lmstack.utils import UserError, atomic_write_json, atomic_write_text, commit, read_json, read_jsonl
from lmstack.world import generate
from lmstack.world.assistant import as_retrieved, search_chat, with_system
from lmstack.world.library import INDEX, search_result
from lmstack.world.templates import QUESTIONS

MARKER = "experiment.json"  # in a run folder: its settings and the stages done
RUNS = Path("runs/experiments")  # default --out: RUNS/NAME
RESULTS = "runs/results"  # default --results
# The reader stage's practice world, per scale: people whose look-ups it also learns from (pretraining
# never saw them, so only the passage answers).
PRACTICE_PEOPLE = {"tiny": 40, "small": 1000}
PRACTICE_SEED = 10_000  # + the run's seed: a world of other people


# --------------------------------------------------------------------------- one run

def _started(folder: Path) -> bool:
    """Does a training output hold anything of a run (then it resumes, or restarts if it has no checkpoint)?"""
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir())


def _final(record: dict, model_dir: Path) -> dict:
    """A training stage's last metrics record: the one it returned, or (a run that had finished all
    its steps when it was stopped, so resuming it trained none) the last one it logged."""
    if record:
        return record
    logged = [row for _, row in read_jsonl(model_dir / "metrics.jsonl", "metrics")]
    return logged[-1] if logged else {}


def _looks_up(row: dict) -> bool:
    """Is a conversation a look-up (the assistant calls `search`)?"""
    return any(c["function"]["name"] == "search" for m in row["messages"] for c in m.get("tool_calls") or [])


def _text(row: dict) -> str:
    return " ".join(message_contents(row["messages"]))


def _mentions(row: dict, names: set[str]) -> bool:
    """Does a conversation name any of `names`?"""
    text = _text(row)
    return any(name in text for name in names)


def _practice_lookups(practice: Path, n: int, seed: int, names: set[str]) -> list[dict]:
    """`n` more fact look-ups about the practice world's people: a person and a fact drawn at
    random, asked and answered as the world's look-ups are (one that names any of `names`, the
    world's people, is drawn again)."""
    people = [p for p in read_json(practice / "world.json")["people"] if p["name"] not in names]
    rng, attrs, rows = random.Random(f"lmstack-practice-lookups:{seed}"), sorted(QUESTIONS), []
    with SearchIndex(practice / INDEX) as index:
        for i in range(100 * n):  # (bounded: a world whose every passage names one of `names` gives fewer)
            row = {"messages": with_system(search_chat(rng.choice(people), rng.choice(attrs), rng,
                                                       lambda q: search_result(index, q), f"call_p{i}"), rng)}
            rows += [] if _mentions(row, names) else [row]
            if len(rows) == n:
                break
    return rows


def _lookups(run: Path, scale: str, seed: int, shape: str = LOOKUP_SHAPES[0], extra: int = 0) -> Path:
    """The reader stage's look-ups: the world's own, and those of a practice world of other people
    (any whose name is one of the world's is left out) with `extra` more about its people, shuffled,
    in `shape` ("retrieved": each turned into retrieval done for the model,
    lmstack.world.assistant.as_retrieved); written to run/lookups.jsonl."""
    n = PRACTICE_PEOPLE.get(Path(scale).stem, PRACTICE_PEOPLE["small"])
    practice = generate(run / "practice", people=n, seed=PRACTICE_SEED + seed, skill_people=n, force=True,
                        progress=False)
    names = {p["name"] for p in read_json(run / "world" / "world.json")["people"]}
    rows = [row for _, row in read_jsonl(run / "world" / "sft.jsonl", "conversations") if _looks_up(row)]
    rows += [row for _, row in read_jsonl(practice / "sft.jsonl", "conversations")
             if _looks_up(row) and not _mentions(row, names)]
    rows += _practice_lookups(practice, extra, seed, names) if extra else []
    random.Random(seed).shuffle(rows)
    if shape == "retrieved":
        rows = [{**row, "messages": as_retrieved(row["messages"])} for row in rows]
    atomic_write_text(run / "lookups.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return run / "lookups.jsonl"


def _stages(run: Path, scale: str, sets: dict) -> dict:
    """Stage name -> what does it (returning the final metrics of a training stage)."""
    world, base, chat, reader = run / "world", run / "base", run / "chat", run / "reader"
    return {
        "world": lambda: generate(world, **sets["world"], force=True, progress=False),
        "tokenizer": lambda: world_tokenizer(world, run / "tokenizer", Path(scale).stem, force=True,
                                             **sets.get("tokenizer", {})),
        "data": lambda: prepare([world / "pretrain.jsonl"], tokenizer=run / "tokenizer", out=run / "data",
                                val_fraction=VAL_FRACTION, force=True),
        "pretrain": lambda: _final(pretrain(scale, run / "data", base, sets["pretrain"], resume=_started(base)), base),
        "sft": lambda: _final(sft(base, [world / "sft.jsonl"], chat, sets["sft"], resume=_started(chat),
                                  **sft_mix(Path(scale).stem, run / "data")), chat),
        "reader": lambda: _final(sft(chat, [_lookups(run, scale, sets["world"]["seed"],
                                                     sets.get("reader_lookups", LOOKUP_SHAPES[0]),
                                                     sets.get("reader_practice_lookups", 0)),
                                            world / "sft.jsonl"], reader,
                                     sets.get("reader", []), resume=_started(reader),
                                     **sft_mix(Path(scale).stem, run / "data", READER_MIX)), reader),
    }


def run_one(recipe: Recipe, variant, scale: str, seed: int, run: Path, models: list[str], about: dict) -> list[dict]:
    """Train what is not yet done in the run folder, score the models; returns their store records."""
    sets = run_settings(variant, scale, seed)
    if "reader" in recipe.stages:
        sets["reader"] = reader_settings(scale, seed)
        if variant.reader.get("lookups", LOOKUP_SHAPES[0]) != LOOKUP_SHAPES[0]:  # (runs of before still match)
            sets["reader_lookups"] = variant.reader["lookups"]
        if variant.reader.get("practice_lookups"):
            sets["reader_practice_lookups"] = variant.reader["practice_lookups"]
    settings = {"experiment": recipe.name, "variant": variant.name, "scale": scale, "seed": seed, **sets,
                "stages": recipe.stages}
    state = read_json(run / MARKER) or {"settings": settings, "done": {}}
    if state.get("settings") != settings:
        raise UserError(f"{run} holds a run with other settings than this recipe's (it changed?): delete the "
                        "folder to run it again, or pass another --out")
    stages = _stages(run, scale, sets)
    for stage in recipe.stages:
        if stage in state["done"]:
            continue
        print(f"\n== {recipe.name} / {variant.name} / {scale} / seed {seed}: {stage} ==", flush=True)
        t0 = time.time()
        final = stages[stage]()
        state["done"][stage] = {"seconds": round(time.time() - t0, 1),
                                **({"final": final} if stage in MODELS.values() else {})}
        atomic_write_json(run / MARKER, state)
    size = model_size(run / "base")
    val_loss = rounded(state["done"]["pretrain"]["final"].get("val_loss"))
    limit = EVAL_LIMIT.get(Path(scale).stem)
    records = []
    for model in models:
        print(f"-- eval {model}: {', '.join(recipe.eval[model])} --", flush=True)
        r = evaluate(run / model, tasks=recipe.eval[model], world=run / "world", limit=limit, quiet=True)
        records.append({"experiment": recipe.name, "variant": variant.name, "scale": about["scale"], "seed": seed,
                        "commit": about["commit"], "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "model": str(run / model), "stage": model, **size, "val_loss": val_loss,
                        "metrics": metrics(r, recipe.eval[model]), "command": about["command"]})
    return records


# --------------------------------------------------------------------------- the command

def _command(name: str, scale: str, seeds: int, out, results, variants) -> str:
    """The one command that runs this again (the same name, scale, seeds and folders)."""
    args = ["lmstack", "experiment", "run", name, "--scale", scale, "--seeds", str(seeds)]
    for flag, value in (("--variants", variants), ("--out", out), ("--results", results)):
        if value is not None:
            args += [flag, str(value)]
    return shlex.join(args)


def _folder(path, flag: str) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    return path


def run_experiment(name: str, scale: str = "small", seeds: int = 1, out=None, results=None,
                   variants: str | None = None) -> list[dict]:
    """Run every (variant, seed) of an experiment at a scale that the store does not hold yet;
    returns the records this call added."""
    recipe = load_recipe(name)
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    chosen = recipe.variants
    if variants is not None:
        names = [v.strip() for v in variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in {x.name for x in recipe.variants}]
        if unknown or not names:
            raise UserError(f"--variants {variants}: {recipe.name}'s variants are "
                            f"{', '.join(v.name for v in recipe.variants)}")
        chosen = [v for v in recipe.variants if v.name in names]
    check_scale(recipe, scale)
    root = _folder(out or RUNS / recipe.name, "--out")
    store = store_path(_folder(results or RESULTS, "--results"), recipe.name)
    scale_name = Path(scale).stem
    have = {}
    for r in read_records(store):
        have.setdefault(run_key(r), set()).add(r["stage"])
    # (variant, seed, the models it has still to score): a run is finished when each model is in the store
    todo = [(v, s, [m for m in recipe.eval if m not in have.get((v.name, scale_name, s), ())])
            for v in chosen for s in range(seeds)]
    todo = [t for t in todo if t[2]]
    about = {"scale": scale_name, "commit": commit(),  # read once: a checkout can move while it runs
             "command": _command(name, scale, seeds, out, results, variants)}
    print(f"experiment {recipe.name}: {len(chosen)} variant(s) x {seeds} seed(s) at scale {scale_name}: "
          f"{len(chosen) * seeds - len(todo)} in the store, {len(todo)} to run -> {store}", flush=True)
    added = []
    for v, seed, models in todo:
        records = run_one(recipe, v, scale, seed, root / scale_name / v.name / f"seed{seed}", models, about)
        append_records(store, records)
        added += records
        for line in headline_lines(recipe, records):
            print(f"  {v.name} seed {seed}: {line}", flush=True)
    return added


# --------------------------------------------------------------------------- list and show

def _value(task: str, x) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if task in MEASURES else f"{100 * x:.1f}%"


def _cells(recipe: Recipe, records: list[dict]):
    """(headline label, its metrics over the records' seeds) for every headline number."""
    for h in recipe.headline:
        ms = [r["metrics"][h.task] for r in records if r["stage"] == h.model and h.task in r["metrics"]]
        if not ms:
            continue
        for key in h.keys(ms[0]):
            found = [m if key is None else m.get("slices", {}).get(key) for m in ms]
            found = [m for m in found if m and m["acc"] is not None]
            if found:
                yield f"{h.model} {h.task}" + (f" {key}" if key else ""), h.task, found


def _summary(task: str, ms: list[dict]) -> str:
    """Metrics of one headline over seeds -> "mean  spread  swapped  chance": the spread is the 95%
    interval for one seed, the standard deviation and range over several."""
    accs = [m["acc"] for m in ms]
    if len(ms) == 1:
        spread = f"[{_value(task, ms[0]['ci'][0])}, {_value(task, ms[0]['ci'][1])}]"
    else:
        spread = f"sd {_value(task, statistics.stdev(accs))}, {_value(task, min(accs))}-{_value(task, max(accs))}"
    base = [m["baseline"] for m in ms if m.get("baseline") is not None]
    text = f"{_value(task, statistics.mean(accs)):>7s}  {spread}"
    text += f"  swapped {_value(task, statistics.mean(base))}" if base else ""
    return text + (f"  chance {_value(task, ms[0]['chance'])}" if ms[0].get("chance") is not None else "")


def headline_lines(recipe: Recipe, records: list[dict]) -> list[str]:
    """A header, then one line per headline number over the records (one per seed)."""
    rows = [(label, _summary(task, ms)) for label, task, ms in _cells(recipe, records)]
    if not rows:
        return []
    width = max(len(label) for label, _ in rows)
    seeds = len({r["seed"] for r in records})
    head = f"{'headline':{width}s} {'mean':>7s}  {'95% CI' if seeds == 1 else f'sd over {seeds} seeds, min-max'}"
    return [head] + [f"{label:{width}s} {text}" for label, text in rows]


def show(name: str, results=None) -> None:
    recipe = load_recipe(name)
    store = store_path(results or RESULTS, recipe.name)
    records = read_records(store)
    print(f"{recipe.name}: {recipe.description}\n({store}: {len({run_key(r) for r in records})} run(s))")
    if not records:
        print(f"no runs yet: lmstack experiment run {name} --scale tiny   (seconds; --scale small: minutes)")
        return
    order = {v.name: i for i, v in enumerate(recipe.variants)}
    groups = {}
    for r in records:
        groups.setdefault((r["variant"], r["scale"]), []).append(r)
    for (variant, scale), rs in sorted(groups.items(), key=lambda g: (order.get(g[0][0], len(order)), g[0][1])):
        seeds = sorted({r["seed"] for r in rs})
        base = [r for r in rs if r["stage"] == "base"] or rs
        losses = [r["val_loss"] for r in base if r.get("val_loss") is not None]
        loss = f", val_loss {statistics.mean(losses):.3f}" if losses else ""
        print(f"\n{variant} @ {scale}: seeds {', '.join(map(str, seeds))}; N {base[0]['N']:,} (non-embedding), "
              f"D {base[0]['D']:,} tokens, {base[0]['flops']:.3g} FLOPs{loss}")
        for line in headline_lines(recipe, rs):
            print(f"  {line}")
        print(f"  re-run: {rs[-1]['command']}")


def list_experiments(results=None) -> None:
    """The built-in experiments, each with its description and the runs the store holds."""
    results = Path(results or RESULTS)
    names = builtin_names()
    stored = sorted(p.stem for p in results.glob("*.jsonl")) if results.is_dir() else []
    for name in names + [n for n in stored if n not in names]:
        records = read_records(store_path(results, name))
        runs = {run_key(r) for r in records}
        scales = ", ".join(sorted({r["scale"] for r in records}))
        about = load_recipe(name).description if name in names else "(not built in: a recipe file)"
        print(f"{name:12s} {len(runs):3d} run(s) {f'({scales})' if scales else '':14s} {about}")
    print(f"store: {results}; run one: lmstack experiment run NAME --scale tiny | small | gpt2 --seeds K")

