"""Saving and resuming a training run, atomically (the model folder itself: lmstack/modelio.py).

    OUT/
      model.safetensors   the latest weights, replaced at every checkpoint
      state/step_00000200/  what --resume needs, one folder per checkpoint (the last k kept):
          model.safetensors, optimizer.pt, rng.pt, trainer.json (step, data position, ...)

A checkpoint folder is written under a temporary name and renamed into place, and the
top-level weights are replaced with one os.replace, so a kill mid-save leaves the previous
checkpoint whole: a `state/step_*` folder exists only if it is complete.
Torch state (optimizer, RNG) is written with torch.save and read with weights_only=True.

A sharded checkpoint (train.parallel = "fsdp") holds `sharded/` (torch.distributed.checkpoint:
each rank's shards of the model and optimizer, and the metadata that lets any number of ranks,
or one process, load them) instead of optimizer.pt; its model.safetensors is still the whole
model (gathered), which every later stage reads. Every rank writes its shards into the same
temporary folder (on a file system all nodes share), DCP's metadata is written last, and rank 0
renames the folder into place after a barrier: the same commit point as above.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from lmstack import distributed
from lmstack.modelio import CONFIG, SFT, STAGE, WEIGHTS, load_weights, save_weights
from lmstack.tokenizer import FORMAT_FILE
from lmstack.utils import UserError, atomic_file, atomic_write_text, current_umask, fsync, read_json

STATE = "state"
SHARDED = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint folder


# --- checkpoints for resume ---------------------------------------------------------------

def checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    state = Path(out) / STATE
    if not state.is_dir():
        return []
    found = [p for p in state.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = checkpoints(out)
    return found[-1] if found else None


def output_folder(out: str | os.PathLike, resume: bool) -> tuple[Path, bool]:
    """A training run's --out, checked before any work: a folder with a checkpoint to --resume,
    or one that is new or empty (a finished run is never overwritten by accident). Returns (the
    folder, whether the run resumes from a checkpoint). --resume on a run that was killed before
    its first checkpoint (its run files but no weights yet) starts it again from step 0, and says so."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if resume and latest_checkpoint(out_dir) is None:
        if not _unfinished_start(out_dir):
            raise UserError(f"nothing to resume: {out_dir / STATE} has no checkpoint")
        print(f"{out_dir} holds a run that stopped before its first checkpoint: starting it again from step 0",
              flush=True)
        return out_dir, False
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        hint = ("it holds a run that stopped before its first checkpoint: --resume starts it again"
                if _unfinished_start(out_dir) else "use --resume to continue the run in it, or choose another --out")
        raise UserError(f"output folder {out_dir} is not empty ({hint})")
    return out_dir, resume


def _unfinished_start(out_dir: Path) -> bool:
    """What a run writes before its first checkpoint, and nothing else: its description (run.json,
    config.json, tokenizer.json, sft.json / stage.json), metrics, a state/ holding no checkpoint (at
    most the temporary of a first one that was being written when the run was killed), temporaries
    (alone, when it was killed while writing its first file)."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return False  # nothing there: a new folder, not a killed run
    start = {"run.json", CONFIG, "tokenizer.json", FORMAT_FILE, "metrics.jsonl", SFT, STAGE, STATE}
    entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    state = out_dir / STATE
    kept = [p for p in state.rglob("*")
            if p.is_file() and not any(x.startswith(".") for x in p.relative_to(state).parts)]
    return all(p.name in start for p in entries) and not checkpoints(out_dir) and not kept


def check_resume(out_dir: Path, run: str, model_config: dict, record_file: str | None = None,
                 record: dict | None = None, keys=(), what: str = "data", hint: str = "") -> dict:
    """On --resume, before any work, for every stage: out_dir must hold the same run. The same
    kind of run (`run` names it; a stage that records its inputs writes `record_file`, whose
    "stage" must be the one in `record`), the same model config, and the same inputs (`keys` of
    `record`, what this run would record; `what` names them for the user). Returns the record
    the run wrote ({} without one)."""
    record = record or {}
    saved = read_json(out_dir / CONFIG)
    old = read_json(out_dir / record_file) if record_file else {}
    if not isinstance(saved, dict) or not isinstance(old, dict) or old.get("stage") != record.get("stage"):
        raise UserError(f"{out_dir} holds no {run} run to resume (no readable {CONFIG}"
                        + (f" and {record_file}" if record_file else "") + ")")
    diff = [f"model.{k}: {saved.get(k)!r} in the run, {v!r} now" for k, v in model_config.items() if saved.get(k) != v]
    if diff:
        raise UserError(f"--resume with another model than the run in {out_dir} started from ("
                        + "; ".join(diff) + ")" + hint)
    changed = [k for k in keys if old.get(k) != record.get(k)]
    if changed:
        raise UserError(f"--resume with other {what} than the run in {out_dir} ({', '.join(changed)} differ){hint}")
    return old


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 2, sharded: bool = False) -> Path:
    """Write state/step_{step} atomically, point the top-level weights at it, prune old ones.
    sharded: every rank calls this (the model may be FSDP's); otherwise rank 0 alone does."""
    if sharded:
        return _save_sharded_checkpoint(Path(out), step, model, optimizer, trainer_state, keep_last)
    out = Path(out)
    state = out / STATE
    state.mkdir(parents=True, exist_ok=True)
    final = state / f"step_{step:08d}"
    if not final.exists():
        for stale in state.glob(".step_*"):  # leftovers of an earlier crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=state, prefix=f".step_{step:08d}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a model folder is not
            save_weights(model, tmp / WEIGHTS)
            _save_torch(optimizer.state_dict(), tmp / "optimizer.pt")
            _save_torch(_rng_state(), tmp / "rng.pt")
            atomic_write_text(tmp / "trainer.json", json.dumps({"step": step, **trainer_state}, indent=2,
                                                               default=_jsonable))
            os.rename(tmp, final)  # the commit point
            fsync(state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _publish(out, final, keep_last)
    return final


def _publish(out: Path, final: Path, keep_last: int) -> None:
    """Point the top-level weights at checkpoint `final`, delete all but the last keep_last."""
    with atomic_file(out / WEIGHTS) as tmp_file:  # the top-level weights: copied beside, then replaced
        shutil.copyfile(final / WEIGHTS, tmp_file)
    for old in checkpoints(out)[:-keep_last]:
        # Hidden first (one rename), then deleted: a kill mid-delete never leaves a visible
        # state/step_N without its weights; the hidden remains go with the next save.
        doomed = old.with_name(f".{old.name}.deleting")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _save_sharded_checkpoint(out: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int) -> Path:
    """save_checkpoint for FSDP: every rank writes its shards (torch.distributed.checkpoint) into one
    temporary folder, the whole model is gathered to rank 0 and written beside them, and rank 0
    renames the folder into place once every rank is done."""
    main = distributed.is_main()
    state = out / STATE
    final = state / f"step_{step:08d}"
    tmp = state / f".step_{step:08d}.tmp"  # one name every rank knows (mkdtemp's would differ per rank)
    if main and not final.exists():
        state.mkdir(parents=True, exist_ok=True)
        for stale in state.glob(".step_*"):  # leftovers of an earlier crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(mode=0o777 & ~current_umask())
    distributed.barrier()
    exists = final.exists()  # checked by every rank after rank 0 looked: they all agree
    if not exists:  # (so every rank takes part in both collectives, or none does)
        distributed.save_sharded(tmp / SHARDED, model, optimizer)
        full = distributed.full_state_dict(model)  # gathered on rank 0
    if main:
        try:
            if not exists:
                save_weights(model, tmp / WEIGHTS, state_dict=full)
                _save_torch(_rng_state(), tmp / "rng.pt")
                atomic_write_text(tmp / "trainer.json", json.dumps({"step": step, **trainer_state}, indent=2,
                                                                   default=_jsonable))
                os.rename(tmp, final)  # the commit point
                fsync(state)
            _publish(out, final, keep_last)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    distributed.barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer=None) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint folder; returns trainer.json.
    A sharded checkpoint loads on any number of ranks (every rank calls this); one written by
    a single process or DDP loads into a model that is not sharded."""
    path = Path(path)
    sharded = (path / SHARDED).is_dir()
    if not sharded and distributed.is_sharded(model):
        raise UserError(f"checkpoint {path} is not sharded (written with train.parallel=ddp): "
                        "resume it with train.parallel=ddp")
    # The checkpoint holds the moments; this run's settings (weight decay, betas, Muon's ns_steps and
    # lr_scale: a --set on resume) win over the hyperparameters saved with them, on either path.
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] if optimizer else []
    try:
        if sharded:
            distributed.load_sharded(path / SHARDED, model, optimizer)
        else:
            load_weights(model, path / WEIGHTS)
        if optimizer is not None and not sharded:
            state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            muon = isinstance(state, dict) and "muon" in state  # MuonAdamW's state holds both
            if muon != hasattr(optimizer, "muon"):
                raise ValueError(f"it was written with optim.optimizer={'muon' if muon else 'adamw'}")
            optimizer.load_state_dict(state)
        for group, settings in zip(optimizer.param_groups if optimizer else [], configured):
            group.update(settings)
        rng = torch.load(path / "rng.pt", weights_only=True)
        trainer_state = json.loads((path / "trainer.json").read_text())
    except Exception as e:  # missing/truncated files, unpickling refusals, shape mismatches
        raise UserError(f"checkpoint {path} is unreadable or does not match this run: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _set_rng_state(rng)
    return trainer_state


# --- helpers ------------------------------------------------------------------------------

def _save_torch(obj, path: Path) -> None:
    torch.save(obj, path)
    fsync(path)


def _rng_state() -> dict:
    """Every RNG a run touches, as tensors and plain types (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _jsonable(o):
    """trainer.json may hold a batch source's state: numpy scalars/arrays become plain JSON."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")
