"""A scaling sweep: a grid of model sizes x compute budgets, each run pretrained once, recorded once.

    lmstack scaling sweep --data runs/data --out runs/sweep --depths 2,3,4,5,6 --budgets 3e12,1e13,3e13
    torchrun --nproc_per_node=8 -m lmstack scaling sweep ... --only d4-c1e13-s0     (one run per launch)

- One dial sets the shape (as nanochat's depth): depth L -> n_layer L, d_model = aspect * L,
  heads of `head_dim`; everything else comes from the preset (`--preset`, `--set`).
- A budget C is FLOPs: the run trains on D = C / F tokens, F the model's exact training FLOPs per
  token (`GPT.flops_per_token`: 6 x the matmul weights, the head included, plus attention), rounded
  to whole optimizer steps; its learning-rate schedule (warmup, then cosine to min_lr) is fitted to
  its own horizon. The data must hold D training tokens: a run that would repeat data is refused
  before anything trains (Chinchilla's laws assume one pass).
- Every finished run appends one line to SWEEP/results.jsonl: its name, depth, seed, N (with and
  without embeddings), F, steps, D, C, the final validation loss (and train loss, bits per byte),
  its wall time and the code's commit. A run already there is skipped; a run that was interrupted
  resumes from its last checkpoint (the loop's --resume). SWEEP/sweep.json holds the settings: a
  second call must use the same data and preset (more depths, budgets or seeds are welcome).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmstack.config import load_config
from lmstack.data import load_manifest
from lmstack.model import GPT
from lmstack.utils import UserError, atomic_write_json, commit, read_json, read_jsonl

SETTINGS = "sweep.json"
RESULTS = "results.jsonl"
# The run shape's fixed parts (the sweep's own, unless --set says otherwise)
DEFAULTS = ["train.eval_batches=16", "train.log_every=10", "optim.schedule=cosine"]


@dataclass
class Point:
    depth: int
    budget: float  # FLOPs asked for
    seed: int

    @property
    def name(self) -> str:
        return f"d{self.depth}-c{self.budget:g}-s{self.seed}".replace("+", "")  # 1e13 -> c1e13, 1.4e9 -> c1.4e09


def shape(depth: int, aspect: int, head_dim: int) -> list[str]:
    """The dial: n_layer = depth, d_model = aspect * depth, heads of head_dim (at least one)."""
    d = aspect * depth
    return [f"model.n_layer={depth}", f"model.d_model={d}", f"model.n_head={max(1, d // head_dim)}",
            f"model.n_kv_head={max(1, d // head_dim)}"]


def plan_run(settings: dict, p: Point, vocab: int) -> tuple[list[str], dict]:
    """A grid point -> (its --set overrides, what it will be: N, F, steps, D, C)."""
    base = DEFAULTS + list(settings["overrides"]) + shape(p.depth, settings["aspect"], settings["head_dim"])
    cfg = load_config(settings["preset"], base, vocab_size=vocab)
    with torch.device("meta"):
        model = GPT(cfg.model)
    tc = cfg.train
    f = model.flops_per_token(tc.seq_len)
    steps = max(1, round(p.budget / f / tc.batch_tokens))
    run = {"name": p.name, "depth": p.depth, "seed": p.seed, "n_layer": cfg.model.n_layer,
           "d_model": cfg.model.d_model, "n_head": cfg.model.n_head, "N": model.num_params(),
           "N_ne": model.num_params(include_embeddings=False), "flops_per_token": f, "steps": steps,
           "batch_tokens": tc.batch_tokens, "D": steps * tc.batch_tokens, "C": steps * tc.batch_tokens * f,
           "C_target": p.budget, "lr": cfg.optim.lr}
    warmup = min(cfg.optim.warmup_steps, max(1, steps // 10))  # a short run is not all warmup
    every = max(1, steps // 4)  # checkpoints to resume from; the last step is evaluated anyway
    sets = base + [f"train.max_steps={steps}", f"train.seed={p.seed}", f"optim.warmup_steps={warmup}",
                   f"train.eval_every={steps}", f"train.save_every={every}", "train.keep_last=1"]
    return sets, run


def read_results(sweep_dir) -> list[dict]:
    """The finished runs of a sweep folder (results.jsonl), in the order they finished."""
    path = Path(sweep_dir) / RESULTS
    if not Path(sweep_dir).is_dir():
        raise UserError(f"sweep folder {sweep_dir} does not exist (run `lmstack scaling sweep` first)")
    return [row for _, row in read_jsonl(path, "sweep results")] if path.is_file() else []


def _settings(data, out: Path, preset: str, overrides, aspect: int, head_dim: int) -> dict:
    settings = {"data": str(Path(data).resolve()), "preset": preset, "overrides": list(overrides),
                "aspect": aspect, "head_dim": head_dim}
    old = read_json(out / SETTINGS)
    if old is not None:
        same = {k: old.get(k) for k in settings}
        if same != settings:
            diff = next(k for k in settings if same[k] != settings[k])
            raise UserError(f"{out} is a sweep with another {diff} ({same[diff]!r}, not {settings[diff]!r}); "
                            "use the same settings to add runs to it, or another --out")
    return settings


def sweep(data, out, depths, budgets, seeds: int = 1, preset: str = "small", overrides=(), aspect: int = 32,
          head_dim: int = 32, only: str | None = None, allow_repeat: bool = False) -> list[dict]:
    """Train every grid point not yet in OUT/results.jsonl (or only the one named); returns all results."""
    from lmstack.train.pretrain import pretrain

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a sweep folder")
    manifest = load_manifest(data)
    if not depths or not budgets or seeds < 1:
        raise UserError("a sweep needs at least one depth, one budget and one seed")
    if any(d < 1 for d in depths) or any(not (c > 0 and math.isfinite(c)) for c in budgets):
        raise UserError("depths must be >= 1 and budgets positive FLOP counts (e.g. 1e13)")
    if aspect < 1 or head_dim < 1:
        raise UserError("--aspect and --head-dim must be >= 1")
    if not manifest["tokens"].get("val"):
        raise UserError(f"{data} has no validation split, and each run is scored on it: prepare it with "
                        "`lmstack data prepare --val-fraction 0.01`")
    settings = _settings(data, out, preset, overrides, aspect, head_dim)
    points = [Point(d, c, s) for c in sorted(set(budgets)) for d in sorted(set(depths)) for s in range(seeds)]
    if len({p.name for p in points}) < len(points):
        raise UserError("two budgets are too close to tell apart in a run's name (give them distinct values, "
                        "e.g. 1e13 and 1.5e13)")
    if only is not None:
        points = [p for p in points if p.name == only]
        if not points:
            raise UserError(f"--only {only}: no such run in this grid")
    plans = [(p, *plan_run(settings, p, manifest["vocab_size"])) for p in points]
    have = manifest["tokens"].get("train", 0)
    for p, _, run in plans:
        if abs(run["C"] / p.budget - 1) > 0.25:  # whole steps: a budget below a few steps is another budget
            step = run["flops_per_token"] * run["batch_tokens"]
            raise UserError(f"run {p.name}: one optimizer step of depth {p.depth} is {step:.3g} FLOPs, so a budget "
                            f"of {p.budget:.3g} trains {run['C']:.3g}; raise the budget or lower train.batch_tokens")
        if run["D"] > have and not allow_repeat:
            raise UserError(f"run {p.name} needs {run['D']:,} training tokens; {data} holds {have:,}, so it would "
                            "repeat data (the laws assume one pass): prepare more (e.g. `lmstack world --people "
                            "100000`), drop that budget, or pass --allow-repeat")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SETTINGS, settings)
    done = {r["name"] for r in read_results(out)}
    todo = [(p, sets, run) for p, sets, run in plans if p.name not in done]
    main = int(os.environ.get("RANK", "0")) == 0
    code = commit()  # the code that trains these runs (read now: a checkout can move while a sweep runs)
    if main:
        print(f"scaling sweep: {len(plans)} runs, {len(plans) - len(todo)} done, {len(todo)} to train -> {out}",
              flush=True)
    for k, (p, sets, run) in enumerate(todo, 1):
        folder = out / "runs" / p.name
        if main:
            print(f"[{k}/{len(todo)}] {p.name}: N {run['N']:,} ({run['N_ne']:,} non-embedding), "
                  f"{run['steps']} steps, D {run['D']:,} tokens, C {run['C']:.3g} FLOPs", flush=True)
        t0 = time.time()
        record = pretrain(preset, data, str(folder), sets, resume=folder.is_dir() and any(folder.iterdir()))
        if not main:
            continue
        if record.get("val_loss") is None:
            raise UserError(f"run {p.name} has no validation loss: {data} needs a validation split "
                            "(`lmstack data prepare --val-fraction`)")
        run.update(loss=record["val_loss"], train_loss=record.get("loss"), val_bpb=record.get("val_bpb"),
                   time_s=round(time.time() - t0, 1), commit=code, folder=str(folder))
        with open(out / RESULTS, "a") as f:  # one whole line per finished run
            f.write(json.dumps(run) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return read_results(out)
