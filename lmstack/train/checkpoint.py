"""The model directory, and saving / resuming a run, atomically.

    OUT/
      model.safetensors   latest weights (safetensors only; a tied head is stored once)
      config.json         the model config (enough to rebuild the network)
      tokenizer.json      the tokenizer the data was made with
      run.json            the resolved run config
      metrics.jsonl       one JSON object per logged step
      state/step_00000200/  what --resume needs, one folder per checkpoint (the last k kept):
          model.safetensors, optimizer.pt, rng.pt, trainer.json (step, data position, ...)

A checkpoint folder is written under a temporary name and renamed into place, and the
top-level weights are replaced with one os.replace, so a kill mid-save leaves the previous
checkpoint whole: a `state/step_*` folder exists only if it is complete.
Torch state (optimizer, RNG) is written with torch.save and read with weights_only=True.
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
from safetensors.torch import load_file, save_file

from lmstack.config import model_config_from_dict
from lmstack.utils import UserError, atomic_write_json, current_umask

STATE = "state"
WEIGHTS = "model.safetensors"


# --- weights ----------------------------------------------------------------------------

def save_weights(model, path: str | os.PathLike) -> None:
    """Weights to safetensors. A tied lm_head is the embedding itself, so it is left out
    (as Hugging Face does with tie_word_embeddings); load_weights puts it back."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path), metadata={"format": "pt"})
    _fsync(path)


def load_weights(model, path: str | os.PathLike) -> None:
    sd = load_file(str(path), device=str(model.embed_tokens.weight.device))
    if model.cfg.tie_embeddings and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """A model folder -> GPT in eval mode. Missing or corrupt folder -> UserError."""
    from lmstack.model import GPT

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model folder {d} does not exist")
    for name in ("config.json", WEIGHTS):
        if not (d / name).is_file():
            raise UserError(f"{d} is not a model folder (no {name})")
    try:
        cfg = model_config_from_dict(json.loads((d / "config.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / 'config.json'} is not valid JSON: {e}") from None
    model = GPT(cfg).to(device)
    try:
        load_weights(model, d / WEIGHTS)
    except Exception as e:  # safetensors header errors, truncated files, shape mismatches
        raise UserError(f"{d / WEIGHTS} is corrupt or does not match config.json: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model.eval()


# --- the run's description files ----------------------------------------------------------

def write_run_files(out: str | os.PathLike, run_config: dict, tokenizer_file: str | os.PathLike | None) -> None:
    """config.json, run.json and tokenizer.json, written once at the start of a run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", run_config["model"])
    atomic_write_json(out / "run.json", run_config)
    if tokenizer_file is not None:
        tmp = out / ".tokenizer.json.tmp"
        shutil.copyfile(tokenizer_file, tmp)
        os.replace(tmp, out / "tokenizer.json")


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


def output_folder(out: str | os.PathLike, resume: bool) -> Path:
    """A training run's --out, checked before any work: a folder with a checkpoint to --resume,
    or one that is new or empty (a finished run is never overwritten by accident)."""
    from lmstack.utils import UserError

    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if resume and latest_checkpoint(out_dir) is None:
        raise UserError(f"nothing to resume: {out_dir / STATE} has no checkpoint")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} is not empty (use --resume to continue the run "
                        "in it, or choose another --out)")
    return out_dir


def resumed_stage(out_dir: Path, stage_file: str, stage: str, info: dict, model_config: dict,
                  keys, what: str, hint: str = "") -> dict:
    """On --resume of a stage that records its inputs in `stage_file` (preference training, RL):
    what the run in out_dir recorded, after checking that it is the same stage, the same model
    and the same inputs (`keys` of `info`, the record this run would write; `what` names them)."""
    from lmstack.utils import UserError, read_json

    old = read_json(out_dir / stage_file) or {}
    if old.get("stage") != stage:
        raise UserError(f"{out_dir} holds no {stage} run to resume (no {stage_file} with stage {stage!r})")
    if read_json(out_dir / "config.json") != model_config:
        raise UserError(f"--resume with another model than the run in {out_dir} started from ({old.get('base')})")
    diff = [k for k in keys if old.get(k) != info.get(k)]
    if diff:
        raise UserError(f"--resume with other {what} than the run in {out_dir} ({', '.join(diff)} differ){hint}")
    return old


def save_checkpoint(out: str | os.PathLike, step: int, model, optimizer, trainer_state: dict,
                    keep_last: int = 2) -> Path:
    """Write state/step_{step} atomically, point the top-level weights at it, prune old ones."""
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
            (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2,
                                                         default=_jsonable))
            _fsync(tmp / "trainer.json")
            os.rename(tmp, final)  # the commit point
            _fsync(state)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    # Top-level weights: copy beside, then one atomic replace.
    fd, tmp_file = tempfile.mkstemp(dir=out, prefix=".model.", suffix=".safetensors.tmp")
    os.close(fd)
    try:
        os.chmod(tmp_file, 0o666 & ~current_umask())
        shutil.copyfile(final / WEIGHTS, tmp_file)
        _fsync(tmp_file)
        os.replace(tmp_file, out / WEIGHTS)
    except BaseException:
        Path(tmp_file).unlink(missing_ok=True)
        raise
    for old in checkpoints(out)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer=None) -> dict:
    """Restore weights, optimizer and RNG states from a checkpoint folder; returns trainer.json."""
    path = Path(path)
    try:
        load_weights(model, path / WEIGHTS)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
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
    _fsync(path)


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


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
