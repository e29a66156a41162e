"""`lmstack capabilities`: what models can do, task by task, against training compute.

    lmstack capabilities runs/speedrun --out runs/capabilities             # every model of a run folder
    lmstack capabilities runs/speedrun/base --checkpoints --out runs/cap   # and its saved checkpoints
    lmstack capabilities --results runs/results --out runs/cap             # the experiments' results store

A column is one point of training: a model folder (its newest `lmstack eval` results, or evaluated
now when it has none), each of its saved checkpoints (state/step_N, with --checkpoints: evaluated
once, the results kept in OUT/evals/), or a record of the experiment results store (one line of
RESULTS/*.jsonl). Columns are ordered by training compute: FLOPs = GPT.flops_per_token x tokens
trained, summed down the lineage (a chat model's includes its base's pretraining); beside it N, D
and the validation loss (eval's language-modelling loss where it was measured, else the run's last
validation loss).

Each (task, column) has exact match with its 95% Wilson interval and the continuous scores eval
records (the answer's mean log-probability; per-digit accuracy for arithmetic): a capability that
looks like it "emerges" under exact match is often smooth under a continuous score (Schaeffer et
al. 2023). A task has *emerged* in a column when its whole interval is above its bar: the higher of
chance (1 / options, or always the most common answer) and the answer's prior (the score with the
prompt's subject swapped, where the task has one); with neither, 0. A lower-is-better measure
(copying's loss ratio) has emerged when its whole interval is below its chance level.

OUT/capabilities.md (the columns, the task table, what fails at the largest scale measured with the
command that re-runs it larger), OUT/capabilities.json, and OUT/TASK.png per task (exact match and
each continuous score against training FLOPs and against validation loss).
"""

from __future__ import annotations

import math
from pathlib import Path

from lmstack.device import pick_device
from lmstack.engine import for_inference
from lmstack.eval.lm import ModelLM
from lmstack.eval.report import costs, find_stages, load_stage
from lmstack.eval.run import BUILTIN, WORLD_SPEC, evaluate
from lmstack.eval.tasks import load_specs
from lmstack.experiments.capabilities_report import (
    CONTINUOUS,
    fails,
    slug,
    write_report,
)
from lmstack.experiments.store import MEASURES, metrics, read_records
from lmstack.modelio import WEIGHTS, lineage, load_model_and_tokenizer, load_weights
from lmstack.train.checkpoint import checkpoints
from lmstack.utils import UserError, atomic_write_json, atomic_write_text, read_json

KEYS = ("acc", "ci", "n", "chance", "baseline", "mean_rank", *CONTINUOUS)


# --- the rule ---------------------------------------------------------------------------------

def scored(s: dict | None) -> bool:
    return bool(s) and isinstance(s.get("acc"), (int, float)) and not math.isnan(s["acc"]) and "ci" in s


def bar(s: dict, better: str = "higher") -> float | None:
    """The level a score must clear: the higher of chance and the answer's prior ("baseline"), 0
    with neither; lower is better: the lower of them, None with neither (no level to beat)."""
    levels = [x for x in (s.get("chance"), s.get("baseline")) if isinstance(x, (int, float))]
    if better == "lower":
        return min(levels) if levels else None
    return max(levels, default=0.0)


def emerged(s: dict, better: str = "higher") -> bool | None:
    """The whole 95% interval beyond the bar (None: not scored, or no bar)."""
    level = bar(s, better)
    if level is None or not scored(s):
        return None
    lo, hi = s["ci"]
    return hi < level if better == "lower" else lo > level


def cell(s: dict, better: str) -> dict:
    """One score (as the store keeps it) as the tracker shows it: the numbers, the bar and the verdict."""
    out = {k: s[k] for k in KEYS if s.get(k) is not None and not (isinstance(s[k], float) and math.isnan(s[k]))}
    return {**out, "bar": bar(out, better), "emerged": emerged(out, better)}


def task_cells(s: dict) -> dict:
    """A task's results (eval's or the store's) -> its cell and its slices' cells."""
    better = s.get("better", "higher")
    return {**cell(s, better), "better": better,
            "slices": {k: cell(v, better) for k, v in (s.get("slices") or {}).items()}}


def results_tasks(results: dict) -> dict:
    """`lmstack eval` results -> task -> cells, through the store's reading of them (the built-in
    measures such as copying as lower-is-better scores)."""
    names = [*(results.get("tasks") or {}), *(m for m in MEASURES if m in results)]
    return {t: task_cells(s) for t, s in metrics(results, names).items()}


# --- the columns --------------------------------------------------------------------------------

def _preset(d: Path) -> str | None:
    """The preset a model folder was trained with, where its run folder's speedrun.json says."""
    rec = read_json(d.parent / "speedrun.json")
    return str(rec["preset"]) if isinstance(rec, dict) and rec.get("preset") else None


def _total_flops(d: Path, st: dict, step: int | None) -> tuple[float | None, int]:
    """Training FLOPs and tokens of a model folder (at `step` of its own stage), its bases' included."""
    own = costs({**st, "train": [r for r in st["train"] if step is None or r["step"] <= step]})
    flops, tokens = own["flops"], own["tokens"] or 0
    for s in lineage(d)["steps"]:
        base = Path(s["base"]) if s.get("base") else None
        if base is None or not (base / "metrics.jsonl").is_file():
            return None, tokens
        c = costs(load_stage(base, None))
        flops = None if flops is None or c["flops"] is None else flops + c["flops"]
        tokens += c["tokens"] or 0
    return flops, tokens


def _val_loss(st: dict, results: dict | None, step: int | None) -> tuple[float | None, str | None]:
    if results and isinstance(results.get("lm"), dict):
        return results["lm"]["loss"], "eval"
    val = [r for r in st["val"] if step is None or r["step"] <= step]
    return (val[-1]["val_loss"], "training") if val else (None, None)


def model_column(st: dict, results: dict, step: int | None, kind: str) -> dict:
    """A model folder's column (kind "model"), or one of its checkpoints' ("checkpoint"), at `step`."""
    d = st["dir"]
    flops, tokens = _total_flops(d, st, step)
    val, source = _val_loss(st, results, step)
    c = costs(st)
    label = _label(d) + (f" @{step}" if kind == "checkpoint" else "")
    return {"label": label, "kind": kind, "path": str(d), "step": step, "series": _label(d), "flops": flops,
            "N": c["params_ne"], "N_total": c["params"], "D": tokens, "val_loss": val, "val_source": source,
            "scale": _preset(d), "tasks": results_tasks(results)}


def record_column(rec: dict, store: Path) -> dict:
    name = f"{rec.get('experiment')}/{rec.get('variant')} {rec.get('stage')}"
    return {"label": f"{name} {rec.get('scale')} seed {rec.get('seed')}", "kind": "record", "path": str(store),
            "series": f"{name} seed {rec.get('seed')}", "experiment": rec.get("experiment"),
            "scale": rec.get("scale"), "flops": rec.get("flops"), "N": rec.get("N"), "N_total": rec.get("N_total"),
            "D": rec.get("D"), "val_loss": rec.get("val_loss"), "val_source": "training", "step": None,
            "command": rec.get("command"),
            "tasks": {t: task_cells(s) for t, s in rec["metrics"].items() if isinstance(s, dict)}}


def read_store(path: Path) -> list[dict]:
    """The records of a results store: a folder of *.jsonl, or one file."""
    return [r for f in ([path] if path.is_file() else sorted(path.glob("*.jsonl"))) for r in read_records(f)]


def find_inputs(inputs, results) -> tuple[list[dict], list[tuple[dict, Path]]]:
    """The model folders (a folder itself, or the models of a run folder), read as the report card
    reads a stage, and the store records, before any work: a path that does not exist or holds
    neither is one line."""
    stages, records = [], []
    paths = [(Path(p), False) for p in inputs] + ([(Path(results), True)] if results else [])
    for p, store in paths:
        if not p.exists():
            raise UserError(f"{p} does not exist")
        found = [] if store or p.is_file() else find_stages(p, read_json(p / "speedrun.json"))
        found = [load_stage(d, None) for d in found if d not in [st["dir"] for st in stages]]
        found = [st for st in found if st["scored"]]  # a reward model writes no answers
        recs = [] if found or (p.is_file() and p.suffix != ".jsonl") else read_store(p)
        if not found and not recs:
            raise UserError(f"{p} holds no model folder (model.safetensors and metrics.jsonl) and no results "
                            "(a results store: *.jsonl records of `lmstack experiment`)")
        stages += found
        records += [(r, p) for r in recs]
    return stages, records


def _label(d: Path) -> str:
    return f"{d.parent.name}/{d.name}" if d.parent.name else d.name


def checkpoint_results(d: Path, ckpt: Path, path: Path, tasks, limit, dtype: str, device: str, world=None) -> dict:
    """A saved checkpoint's eval results: cached in `path`, or evaluated now (the model folder's
    network with the checkpoint's weights) and written there."""
    asked = {"checkpoint": str(ckpt), "tasks": tasks, "limit": limit}
    cached = read_json(path)
    if isinstance(cached, dict) and cached.get("capabilities") == asked:
        return cached
    print(f"evaluating {ckpt}", flush=True)
    net, tok = load_model_and_tokenizer(d, pick_device(device))
    load_weights(net, ckpt / WEIGHTS)
    results = evaluate(ModelLM(for_inference(net, dtype), tok, name=str(d)), tasks=tasks, world=world, limit=limit,
                       out=path, quiet=True)
    results["capabilities"] = asked
    atomic_write_json(path, results)
    return results


def model_columns(st: dict, out: Path, with_checkpoints: bool, tasks, limit, dtype, device, world=None) -> list[dict]:
    """A model folder's column (evaluated now when it has no eval results) and, with
    `with_checkpoints`, one per checkpoint saved before its final weights (scored on the rows of
    the model's own results unless `limit` is given)."""
    d = st["dir"]
    saved = checkpoints(d)
    final = int(saved[-1].name[5:]) if saved else None  # the folder's weights are its latest checkpoint's
    results = st["results"]
    if results is None:
        print(f"evaluating {d} (it has no eval results yet)", flush=True)
        results = evaluate(d, tasks=tasks, world=world, limit=limit, dtype=dtype, device=device, quiet=True)
    columns = [model_column(st, results, final, "model")]
    limit = results.get("limit") if limit is None else limit  # the same rows as the model's own results
    for ckpt in saved[:-1] if with_checkpoints else []:
        path = out / "evals" / slug(_label(d)) / f"{ckpt.name}.json"
        r = checkpoint_results(d, ckpt, path, tasks, limit, dtype, device, world)
        columns.append(model_column(st, r, int(ckpt.name[5:]), "checkpoint"))
    return columns


# --- checks before any work -----------------------------------------------------------------------

def check_out(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file (name a folder for capabilities.md, .json and the plots)")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise UserError(f"--out {out}: {above} is a file, not a folder")
    return out


def task_names(tasks) -> tuple[list[str], list[str]] | None:
    """--tasks -> (the task names to show, those given by name): a .toml spec file stands for the
    tasks it defines."""
    if tasks is None:
        return None
    shown, named = [], []
    for t in (tasks.split(",") if isinstance(tasks, str) else tasks):
        t = t.strip()
        if t.endswith(".toml") or Path(t).is_file():
            shown += [s.name for s in load_specs(t, ".")]
        elif t:
            shown.append(t)
            named.append(t)
    if not shown:
        raise UserError("--tasks names no task")
    return shown, named


def check_tasks(named: list[str], columns: list[dict], evaluating: bool) -> None:
    """Every name is a task some column holds or, when models are evaluated now, one eval knows."""
    known = {t for c in columns for t in c["tasks"]}
    if evaluating:
        known |= {s.name for s in load_specs(WORLD_SPEC, ".")} | set(BUILTIN)
    unknown = [n for n in named if n not in known]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r} (tasks here: {', '.join(sorted(known)) or 'none'})")


# --- the command ----------------------------------------------------------------------------------

def capabilities(inputs=(), results=None, out=None, with_checkpoints: bool = False, tasks=None,
                 limit: int | None = None, dtype: str = "auto", device: str = "auto", world=None) -> dict:
    """Gather every column, write OUT/capabilities.md, .json and the plots; returns the JSON. `world`:
    the synthetic world the models are scored on when evaluated now (default: each one's lineage's)."""
    if not inputs and not results:
        raise UserError("lmstack capabilities needs model or run folders and/or --results DIR (a results store)")
    if out is None:
        raise UserError("lmstack capabilities needs --out DIR")
    if limit is not None and limit < 0:
        raise UserError("--limit must be >= 0 (0: every row)")
    out = check_out(out)
    asked = task_names(tasks)
    stages, records = find_inputs(inputs, results)
    columns = [record_column(r, p) for r, p in records]
    if asked is not None:
        check_tasks(asked[1], columns + [{"tasks": results_tasks(st["results"] or {})} for st in stages],
                    evaluating=with_checkpoints or any(st["results"] is None for st in stages))
    out.mkdir(parents=True, exist_ok=True)
    for st in stages:
        columns += model_columns(st, out, with_checkpoints, tasks, limit, dtype, device, world)
    if asked is not None:
        for c in columns:
            c["tasks"] = {t: v for t, v in c["tasks"].items() if t in asked[0]}
    columns.sort(key=lambda c: (c["flops"] is None, c["flops"] or 0, c["label"]))
    doc = {"columns": columns, "fails": fails(columns, out)}
    atomic_write_json(out / "capabilities.json", doc)
    atomic_write_text(out / "capabilities.md", write_report(doc, out))
    return doc
