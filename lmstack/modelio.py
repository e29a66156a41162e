"""The model folder, once: what is in it, how it is written and read, where it came from.

    MODEL/
      model.safetensors   the parameters (safetensors only; a tied head is stored once)
      config.json         the model config: enough to rebuild the network
      tokenizer.json      the tokenizer (lmstack's chat format goes with its special tokens)
      chat_format.json    (an imported model) its own chat template, special tokens, BOS policy, stops
      run.json            the resolved run config it was trained with
      metrics.jsonl       one JSON object per logged training step
      sft.json            (SFT) the base model, the data files, the rows used
      stage.json          (reward model, DPO, PPO, GRPO) the stage, its base model, its inputs
      imported.json       (lmstack import hf|gguf) where the model came from, its name and licence
      state/              checkpoints to --resume a run from (lmstack/train/checkpoint.py)

Everything that runs, evaluates, serves, exports or trains a model loads it through
`load_model_and_tokenizer(dir, device, kind)`: the network is built on the meta device (shapes
only: no memory, no random init) and materialised from the weights file, the tokenizer must
fit the vocabulary, and `kind` says which model the caller needs ("lm" or "chat": a language
model, never a reward model; "reward": a reward model). Every problem is one UserError line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmstack.config import ModelConfig, model_config_from_dict
from lmstack.device import check_fits
from lmstack.model import GPT, RewardModel
from lmstack.tokenizer import FORMAT_FILE, Tokenizer
from lmstack.utils import UserError, atomic_file, atomic_write_json, read_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STAGE = "stage.json"  # the alignment stages' record (lmstack/align/)
SFT = "sft.json"  # the SFT stage's record (lmstack/train/sft.py)
KINDS = ("lm", "chat", "reward")


# --- weights ----------------------------------------------------------------------------

def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Tensors to a safetensors file, written atomically and with a normal file's mode (safetensors'
    own writer makes it 0600: unreadable to the others who share a runs folder or an export)."""
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})


def save_weights(model, path: str | os.PathLike, state_dict: dict | None = None) -> None:
    """Weights to safetensors. A tied lm_head is the embedding itself, so it is left out
    (as Hugging Face does with tie_word_embeddings); loading puts it back. state_dict: the tensors
    to write instead of model.state_dict() (FSDP's whole model, gathered from the shards)."""
    sd = model.state_dict() if state_dict is None else state_dict
    sd = {k: v.detach().contiguous() for k, v in sd.items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_safetensors(sd, path)


def load_weights(model, path: str | os.PathLike) -> None:
    """Weights from safetensors into a model that exists (a checkpoint's, on --resume)."""
    sd = load_file(str(path), device=str(model.embed_tokens.weight.device))
    if model.cfg.tie_embeddings and "embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)


def materialise(model: GPT, state: dict[str, torch.Tensor]) -> GPT:
    """A model built on the meta device takes `state`'s tensors as its parameters (in fp32, the
    training dtype; on their device), its tied head points back at the embedding, its RoPE table
    is computed. A name missing or unexpected: ValueError naming the first."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    tied = model.cfg.tie_embeddings
    if tied:
        sd.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.lm_head.weight = model.embed_tokens.weight
    if missing or unexpected:
        raise ValueError(f"{'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    model.init_buffers()
    return model


# --- reading a model folder ---------------------------------------------------------------

def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """config.json of a model folder (UserError when the folder is not one)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model folder {d} does not exist")
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise UserError(f"{d} is not a model folder (no {name})")
    try:
        return model_config_from_dict(json.loads((d / CONFIG).read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / CONFIG} is not valid JSON: {e}") from None


def stage_of(model_dir: str | os.PathLike) -> str | None:
    """The alignment stage that wrote a model folder ("reward", "dpo", "ppo", "grpo"), if any."""
    rec = read_json(Path(model_dir) / STAGE)
    return rec.get("stage") if isinstance(rec, dict) else None


def load_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu", kind: str = "lm"):
    """A model folder -> the network in eval mode: a GPT (kind "lm" or "chat"), or a
    RewardModel (kind "reward"). Missing, corrupt or the wrong kind of folder -> UserError."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    d = Path(model_dir)
    cfg = read_config(d)
    is_reward = stage_of(d) == "reward"
    if kind == "reward" and not is_reward:
        raise UserError(f"{d} is not a reward model (no {STAGE} saying stage \"reward\"; "
                        "train one with `lmstack reward train`)")
    if kind != "reward" and is_reward:
        raise UserError(f"{d} is a reward model (it scores answers, it does not write them); "
                        f"this takes a {'chat (SFT)' if kind == 'chat' else 'language'} model folder")
    with torch.device("meta"):  # shapes only: no memory, no random init to overwrite
        model = (RewardModel if kind == "reward" else GPT)(cfg)
    device = torch.device(device)
    check_fits(4 * model.num_params(), device, f"{d} ({model.num_params():,} parameters in fp32)")
    try:
        model = materialise(model, load_file(str(d / WEIGHTS), device=str(device)))
    except Exception as e:  # safetensors header errors, truncated files, shape mismatches
        raise UserError(f"{d / WEIGHTS} is corrupt or does not match {CONFIG}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model.eval()


def load_model_and_tokenizer(model_dir: str | os.PathLike, device: str | torch.device = "cpu",
                             kind: str = "lm"):
    """(model, tokenizer) of a model folder, checked to fit each other (see `load_model`)."""
    model = load_model(model_dir, device, kind)
    tok = Tokenizer.load(model_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model.cfg.vocab_size}")
    return model, tok


# --- an imported model's folder -----------------------------------------------------------------

IMPORTED = "imported.json"


def grow_vocab(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Embedding (and head) rows appended up to `vocab` for special tokens an import adds: at the
    mean embedding, a neutral start that fine-tuning moves."""
    for key in ("embed_tokens.weight", "lm_head.weight"):
        if key in state and state[key].shape[0] < vocab:
            w = state[key]
            state[key] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab - w.shape[0], -1)])
    return state


def imported_model(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
    """An imported checkpoint's tensors (our names) as a GPT of `cfg`: rows appended for the
    special tokens the import added (`grow_vocab`), built on the meta device and materialised.
    ValueError (or RuntimeError, a shape) naming the first tensor that is missing, unexpected or wrong."""
    grow_vocab(state, cfg.vocab_size)
    with torch.device("meta"):  # shapes only: the weights are the file's
        model = GPT(cfg)
    return materialise(model, state)


def save_imported(tmp: Path, model: GPT, tok: Tokenizer, info: dict) -> None:
    """An imported model into the (temporary) folder `tmp`: model.safetensors, config.json,
    run.json, imported.json (`info`: source, model_type, name, license, ...), tokenizer.json and
    the model's own chat_format.json when it has one."""
    cfg = dataclasses.asdict(model.cfg)
    save_weights(model, tmp / WEIGHTS)
    atomic_write_json(tmp / CONFIG, cfg)
    atomic_write_json(tmp / "run.json", {"model": cfg, "imported": {k: info.get(k) for k in ("source", "model_type")}})
    atomic_write_json(tmp / IMPORTED, info)
    tok.save(tmp)


# --- writing a run's description ----------------------------------------------------------

def write_run_files(out: str | os.PathLike, run_config: dict, tokenizer_file: str | os.PathLike | None) -> None:
    """config.json, run.json and tokenizer.json (with the chat_format.json beside it, an imported
    model's own format), written once at the start of a run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG, run_config["model"])
    atomic_write_json(out / "run.json", run_config)
    if tokenizer_file is not None:
        files = [(Path(tokenizer_file), "tokenizer.json"), (Path(tokenizer_file).parent / FORMAT_FILE, FORMAT_FILE)]
        for src, name in files:
            if src.is_file():
                with atomic_file(out / name) as tmp:
                    shutil.copyfile(src, tmp)


# --- where a model came from ----------------------------------------------------------------

def world_above(path) -> Path | None:
    """The world folder (the one holding world.json) at or up to two levels above `path`, e.g.
    of WORLD/probes/arithmetic.jsonl or WORLD/sft.jsonl; None when there is none. (Here, not in
    lmstack.world: loading a model must not import the world generator.)"""
    if path is None:
        return None
    p = Path(path)
    for d in [p, *p.parents][:3]:
        if (d / "world.json").is_file():
            return d
    return None


def lineage(model_dir) -> dict:
    """What a model folder says about its training: {"chat": trained on conversations (or
    imported with a chat template of its own),
    "data": its pretraining token shards (if still there), "world": the synthetic world
    it was trained on (if any), "steps": the stages that made it from its root, newest first
    ({"stage", "data", "base": the folder it started from}), "imported": the root's imported.json
    when it was brought in}. Paths are as recorded (relative to where training ran)."""
    d = Path(model_dir)
    info = {"chat": False, "data": None, "world": None, "steps": [], "imported": None}
    for _ in range(8):  # follow base -> base (SFT of an SFT, later stages)
        sft = _stage_record(d / SFT)
        if sft is None:
            stage = _stage_record(d / STAGE)  # later stages (preference training, RL) record their base
            if stage and stage.get("base"):
                info["chat"] = info["chat"] or bool(stage.get("chat", True))
                info["steps"].append({"stage": str(stage.get("stage")), "data": stage.get("data") or [],
                                      "base": stage["base"]})
                d = Path(stage["base"])
                continue
            break
        info["chat"] = True
        info["steps"].append({"stage": "sft", "data": sft.get("data") or [], "base": sft.get("base")})
        for f in sft.get("data") or []:
            info["world"] = info["world"] or world_above(f)
        if not sft.get("base"):
            break
        d = Path(sft["base"])
    imported = read_json(d / IMPORTED)
    info["imported"] = imported if isinstance(imported, dict) else None
    own = read_json(d / FORMAT_FILE)
    if isinstance(own, dict) and own.get("template"):  # an imported model with a chat template of its own chats
        info["chat"] = True
    run = read_json(d / "run.json") or {}
    data = (run.get("data") or {}).get("dir")
    if data and (Path(data) / "manifest.json").is_file():
        info["data"] = Path(data)
        for f in (read_json(Path(data) / "manifest.json") or {}).get("inputs", []):
            info["world"] = info["world"] or world_above(f)
    return info


def _stage_record(path: Path) -> dict | None:
    """sft.json or stage.json as `lineage` follows it: None when missing or not JSON (as any
    optional run file); a UserError when it is not what lmstack writes."""
    rec = read_json(path)
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise UserError(f"{path} is malformed: not a JSON object")
    if not isinstance(rec.get("base") or "", str):
        raise UserError(f"{path} is malformed: its \"base\" is not a model folder's path")
    data = rec.get("data") or []
    if not isinstance(data, list) or not all(isinstance(f, str) for f in data):
        raise UserError(f"{path} is malformed: its \"data\" is not a list of paths")
    return rec
