"""Run configuration: dataclasses are the schema and the documentation.

A run is `RunConfig(model, optim, train, data)`. Presets are thin TOML files in
`lmstack/presets/` with one table per section; anything can be overridden from the
command line with `--set section.field=value`. Every user mistake (unknown preset,
unknown key, wrong type, bad value) raises `UserError` naming the key.

TOML has no null, so "choose for me" is spelled 0 (or "auto") and resolved here, so the
saved run.json / config.json always show the concrete values a run used.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from lmstack.utils import UserError

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    vocab_size: int = 0  # tokens in the vocabulary; 0 = take it from the data manifest
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads; head_dim = d_model / n_head
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head (plain MHA)
    d_model: int = 128  # residual stream width
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 256  # longest context (size of the RoPE table and of the KV cache)
    rope_theta: float = 10000.0  # RoPE base; larger = slower-rotating, longer-range positions
    tie_embeddings: bool = True  # share the input embedding with the output head (saves V*d params)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init; residual projections get std/sqrt(2*n_layer)
    # Smeared keys (Olsson et al. 2022): each key head mixes in the previous position's key, so one
    # layer can look up "the token after the last occurrence of this one" (an induction head).
    # Not a Llama: such a model exports to lmstack's own formats only.
    smear_keys: bool = False

    def resolve(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.ffn_hidden == 0:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)

    def validate(self) -> None:
        _positive(self, "model", ["n_layer", "n_head", "n_kv_head", "d_model", "ffn_hidden",
                                  "max_seq_len", "rope_theta", "norm_eps", "init_std"])
        _non_negative(self, "model", ["vocab_size"])  # 0 until the data manifest fills it in
        if self.d_model % self.n_head:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if (self.d_model // self.n_head) % 2:
            raise UserError(f"model.d_model / model.n_head = {self.d_model // self.n_head} must be even (RoPE rotates pairs)")
        if self.n_head % self.n_kv_head:
            raise UserError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")


@dataclass
class OptimConfig:
    # "adamw", or "muon": Muon (torch.optim.Muon, its update's RMS matched to AdamW's, so `lr` and
    # `weight_decay` mean the same) on the blocks' matrices, AdamW on the rest (embeddings, head, norms)
    optimizer: str = "adamw"
    muon_lr_scale: float = 1.0  # muon only: Muon's learning rate as a multiple of lr (AdamW's stays lr)
    # muon only: Newton-Schulz iterations that orthogonalise each update (its cost is per step, not per
    # token: on a CPU, at the speedrun's small batches, it is a large share of a step; README, "Muon")
    muon_ns_steps: int = 5
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of lr
    beta1: float = 0.9  # AdamW beta1 (momentum)
    beta2: float = 0.95  # AdamW beta2; 0.95 rather than 0.999 is the usual choice for LLMs (more stable)
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay, on matmul weights only (not norms or embeddings)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = no clipping
    warmup_steps: int = 10  # linear warmup from 0 to lr over this many steps
    schedule: str = "cosine"  # after warmup: "cosine" decay to min_lr, or "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd only: the last fraction of steps that decays linearly to min_lr

    def validate(self) -> None:
        _positive(self, "optim", ["lr", "eps", "muon_lr_scale"])
        _in_range(self, "optim", "muon_ns_steps", 1, 99)  # (torch's Muon refuses 100 or more)
        _in_range(self, "optim", "min_lr_ratio", 0.0, 1.0)
        _in_range(self, "optim", "beta1", 0.0, 1.0, hi_open=True)
        _in_range(self, "optim", "beta2", 0.0, 1.0, hi_open=True)
        _in_range(self, "optim", "decay_fraction", 0.0, 1.0)
        _non_negative(self, "optim", ["weight_decay", "grad_clip", "warmup_steps"])
        _choice(self, "optim", "schedule", ["cosine", "wsd"])
        _choice(self, "optim", "optimizer", ["adamw", "muon"])


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps in the whole run
    batch_tokens: int = 8192  # global batch in tokens per optimizer step (all micro-batches, all ranks)
    micro_batch_size: int = 8  # sequences per forward/backward on one rank; accumulation fills the rest
    seq_len: int = 128  # tokens per training sequence (<= model.max_seq_len)
    eval_every: int = 50  # validation loss and bits-per-byte every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # micro-batches of validation windows per evaluation (per rank)
    log_every: int = 1  # write a metrics.jsonl line every this many steps
    save_every: int = 100  # checkpoint (state/ for resume) every this many steps (and at the end); 0 = only at the end
    keep_last: int = 2  # checkpoints kept in state/; older ones are deleted
    seed: int = 0  # seeds the init, the data order and every RNG
    compile: bool = False  # torch.compile the model (faster on GPU after a warm-up; needs a C compiler on CPU)
    dtype: str = "auto"  # "auto" (bf16 autocast where the GPU/CPU does bf16 natively, else fp32), "fp32" or "bf16"
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = a table for known GPUs, an estimate on CPU
    # Under torchrun: "ddp" keeps a whole copy of the model per rank; "fsdp" (FSDP2) shards the
    # parameters, gradients and optimizer state over the ranks. "fsdp" checkpoints are sharded
    # (torch.distributed.checkpoint), in one process too, so they resume on any number of ranks.
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory, ~1/3 more compute)

    def validate(self) -> None:
        _positive(self, "train", ["max_steps", "batch_tokens", "micro_batch_size", "seq_len",
                                  "eval_batches", "log_every", "keep_last"])
        _non_negative(self, "train", ["eval_every", "save_every", "peak_flops"])
        _choice(self, "train", "dtype", ["auto", "fp32", "bf16"])
        _choice(self, "train", "device", ["auto", "cpu", "cuda"])
        _choice(self, "train", "parallel", ["ddp", "fsdp"])
        micro_tokens = self.micro_batch_size * self.seq_len
        if self.batch_tokens % micro_tokens:
            raise UserError(f"train.batch_tokens ({self.batch_tokens}) must be a multiple of "
                            f"train.micro_batch_size * train.seq_len ({micro_tokens})")


@dataclass
class DataConfig:
    dir: str = ""  # folder written by `lmstack data prepare` (set by --data)
    train_split: str = "train"  # split the model trains on
    val_split: str = "val"  # split for validation loss / bits-per-byte
    # Pretraining only: this fraction of the training rows is the copying task instead of text (a
    # fresh random token sequence, repeated; loss on the repeats), which teaches in-context copying.
    copy_fraction: float = 0.0
    # Of those copy rows, this share repeats a window of the training text instead of random tokens
    # (copying random tokens and copying the text's own tokens transfer little to each other; README).
    copy_text_share: float = 0.0
    # The copy rows at copy_fraction only in the first this many steps (0: throughout): a warm-up that
    # forms the induction head; from then on copy_fraction_after of the rows (0: all text again).
    copy_steps: int = 0
    copy_fraction_after: float = 0.0

    def validate(self) -> None:
        _in_range(self, "data", "copy_fraction", 0.0, 1.0, hi_open=True)
        _in_range(self, "data", "copy_text_share", 0.0, 1.0)
        _in_range(self, "data", "copy_fraction_after", 0.0, 1.0, hi_open=True)
        if self.copy_fraction_after and not self.copy_steps:
            raise UserError("data.copy_fraction_after is the copy rows' fraction after data.copy_steps: set that too")
        for key in ("copy_text_share", "copy_steps"):
            if getattr(self, key) and not self.copy_fraction:
                raise UserError(f"data.{key} is about the copy rows: set data.copy_fraction too")
        if self.copy_steps < 0:
            raise UserError(f"data.copy_steps must be >= 0 (0: copy rows throughout), got {self.copy_steps}")


@dataclass
class PrefConfig:
    """Preference training (`lmstack reward train`, `lmstack dpo`): pairs of answers to one prompt."""
    beta: float = 0.1  # DPO: strength of the implicit KL to the reference (higher = stay closer)
    nll_weight: float = 10.0  # DPO: weight of the chosen answer's mean token NLL added to the loss (RPO); 0 = plain DPO
    val_fraction: float = 0.05  # comparisons held out for pairwise accuracy
    max_len: int = 0  # prompt + answer tokens per sequence; 0 = the model's context
    # Which comparisons to train on, by the row's meta.negative (the world's rows say where their
    # worse answer came from): "all", or "own", only the rows whose worse answer is the prompt's own
    # kind of bad answer (a row without meta.negative counts as own). README: Alignment.
    negatives: str = "all"

    def validate(self) -> None:
        _choice(self, "pref", "negatives", ["all", "own"])
        _positive(self, "pref", ["beta"])
        _in_range(self, "pref", "val_fraction", 0.0, 0.5)
        _non_negative(self, "pref", ["max_len", "nll_weight"])


@dataclass
class RLConfig:
    """Reinforcement learning (`lmstack ppo`, `lmstack grpo`): rollouts from the current policy."""
    prompts_per_step: int = 16  # prompts sampled for each optimizer step's rollouts
    group_size: int = 4  # GRPO/RLOO: answers per prompt (their rewards are compared with each other)
    max_new_tokens: int = 48  # tokens per rollout answer
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts (1 = off)
    kl_coef: float = 0.05  # weight of the KL penalty to the frozen reference (per token)
    clip: float = 0.2  # PPO's ratio clip (and the value clip)
    epochs: int = 2  # optimisation passes over each batch of rollouts
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE lambda
    vf_coef: float = 0.5  # PPO: weight of the value loss
    method: str = "grpo"  # grpo | rloo (group advantages)
    tools: str = ""  # GRPO: comma-separated tools the rollouts may call (e.g. "calculator"); "" = none
    tool_rounds: int = 2  # GRPO with tools: tool results per rollout at most (then the reply must answer)
    ensemble: str = "min"  # PPO with several reward models: min | mean of their standardised scores
    ptx_coef: float = 0.0  # weight of the next-token loss on SFT conversations in each micro-batch (0 = off; "PPO-ptx")
    ptx_data: str = ""  # those conversations: comma-separated jsonl files; "" = the policy's own SFT data

    def validate(self) -> None:
        _positive(self, "rl", ["prompts_per_step", "group_size", "max_new_tokens", "epochs", "clip", "tool_rounds"])
        _non_negative(self, "rl", ["temperature", "kl_coef", "vf_coef", "ptx_coef"])
        _in_range(self, "rl", "top_p", 0.0, 1.0)
        _in_range(self, "rl", "gamma", 0.0, 1.0)
        _in_range(self, "rl", "lam", 0.0, 1.0)
        _choice(self, "rl", "method", ["grpo", "rloo"])
        _choice(self, "rl", "ensemble", ["min", "mean"])


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the network's shape
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and learning-rate schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # steps, batch, logging, checkpoints
    data: DataConfig = field(default_factory=DataConfig)  # where the tokens come from
    pref: PrefConfig = field(default_factory=PrefConfig)  # reward model / DPO settings
    rl: RLConfig = field(default_factory=RLConfig)  # PPO / GRPO settings

    def validate(self) -> None:
        self.model.resolve()
        for section in (self.model, self.optim, self.train, self.data, self.pref, self.rl):
            section.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise UserError(f"train.seq_len ({self.train.seq_len}) must be <= model.max_seq_len "
                            f"({self.model.max_seq_len})")
        if self.optim.optimizer == "muon" and self.train.parallel == "fsdp":
            raise UserError("optim.optimizer=muon needs whole matrices: use train.parallel=ddp, not fsdp")
        if self.pref.max_len > self.model.max_seq_len:
            raise UserError(f"pref.max_len ({self.pref.max_len}) is longer than the model's context "
                            f"({self.model.max_seq_len})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_preset(preset: str) -> dict:
    path = Path(preset)
    if path.suffix != ".toml" or not path.is_file():
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.is_file():
            raise UserError(f"unknown preset {preset!r} (choose {' | '.join(available_presets())}, "
                            "or give a path to a .toml file)")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # TOML is UTF-8
        raise UserError(f"preset {path}: invalid TOML: {e}") from None


def _field_types(cls) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _check_type(key: str, typ: type, value):
    """A TOML value for a field of type `typ`: ints are fine for floats, nothing else converts."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise UserError(f"{key} must be {typ.__name__}, got {type(value).__name__} {value!r}")


def _parse_cli(key: str, typ: type, text: str):
    """A `--set key=text` value, parsed by the field's type."""
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            try:
                return int(text)
            except ValueError:
                f = float(text)  # accept "1e6" when it is a whole number
                if not f.is_integer():
                    raise
                return int(f)
        if typ is float:
            return float(text)
        return text
    except ValueError:
        raise UserError(f"{key} must be {typ.__name__}, got {text!r}") from None


def _assign(cfg: RunConfig, key: str, value, from_cli: bool) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(f"unknown config key {key!r} (keys look like section.field; sections: "
                        f"{', '.join(SECTIONS)})")
    section = getattr(cfg, parts[0])
    types = _field_types(type(section))
    if parts[1] not in types:
        raise UserError(f"unknown config key {key!r} (fields of {parts[0]}: {', '.join(types)})")
    typ = types[parts[1]]
    value = _parse_cli(key, typ, value) if from_cli else _check_type(key, typ, value)
    setattr(section, parts[1], value)


def load_config(preset: str, overrides: list[str] = (), vocab_size: int | None = None,
                validate: bool = True) -> RunConfig:
    """Preset (a name in lmstack/presets or a .toml path) + `section.field=value` overrides.

    `vocab_size` (from the data manifest) fills model.vocab_size when neither the preset
    nor an override set it (without it, model.vocab_size may stay 0; building the model then
    fails). The result is resolved and validated (validate=False: parsed and typed only, for a
    caller that derives more fields first).
    """
    cfg = RunConfig()
    for section, table in read_preset(preset).items():
        if not isinstance(table, dict):
            raise UserError(f"preset {preset}: top-level key {section!r} is not a [section] table")
        for name, value in table.items():
            _assign(cfg, f"{section}.{name}", value, from_cli=False)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        _assign(cfg, key.strip(), value.strip(), from_cli=True)
    if cfg.model.vocab_size == 0 and vocab_size is not None:
        cfg.model.vocab_size = vocab_size
    if validate:
        cfg.validate()
    return cfg


def stage_config(preset: str, overrides, model: ModelConfig, stage: str, derive=None) -> RunConfig:
    """The config of a stage that starts from a model folder (SFT, the reward model, DPO, PPO,
    GRPO): its preset + --set, with the model's own config (`model.*` cannot be set: the stage
    takes the model as it is). Presets are written for a 256-token context: for a model with a
    shorter one (and no train.seq_len given), a sequence is the model's whole context and a step
    has as many sequences as the preset asks for (unless train.batch_tokens is given).
    `derive(cfg, keys)` sets what a stage computes from the rest (RL: the batch), before the
    whole config is validated; `keys` are the --set keys."""
    overrides = list(overrides)
    keys = [o.partition("=")[0].strip() for o in overrides]
    bad = [k for k in keys if k.startswith("model.")]
    if bad:
        raise UserError(f"--set {bad[0]}: {stage} starts from the model as it is (its config.json); "
                        "model.* cannot be changed")
    cfg = load_config(preset, overrides, validate=False)
    cfg.model = dataclasses.replace(model)
    tc, ctx = cfg.train, model.max_seq_len
    if "train.seq_len" not in keys and tc.seq_len > ctx > 0:
        if "train.batch_tokens" not in keys:
            tc.batch_tokens = tc.batch_tokens // tc.seq_len * ctx
        tc.seq_len = ctx
    if derive is not None:
        derive(cfg, keys)
    cfg.validate()
    return cfg


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from config.json content; raises UserError on unknown keys or bad values."""
    if not isinstance(d, dict):
        raise UserError("model config must be a JSON object")
    cfg = RunConfig()
    for name, value in d.items():
        _assign(cfg, f"model.{name}", value, from_cli=False)
    cfg.model.resolve()
    cfg.model.validate()
    if cfg.model.vocab_size == 0:
        raise UserError("model config has no vocab_size")
    return cfg.model


# --- small validators that name the key -------------------------------------------------

def _positive(obj, section: str, names: list[str]) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise UserError(f"{section}.{n} must be > 0, got {getattr(obj, n)!r}")


def _non_negative(obj, section: str, names: list[str]) -> None:
    for n in names:
        if not getattr(obj, n) >= 0:
            raise UserError(f"{section}.{n} must be >= 0, got {getattr(obj, n)!r}")


def _in_range(obj, section: str, name: str, lo: float, hi: float, hi_open: bool = False) -> None:
    v = getattr(obj, name)
    if not (lo <= v < hi if hi_open else lo <= v <= hi):
        raise UserError(f"{section}.{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v!r}")


def _choice(obj, section: str, name: str, choices: list[str]) -> None:
    v = getattr(obj, name)
    if v not in choices:
        raise UserError(f"{section}.{name} must be one of {' | '.join(choices)}, got {v!r}")
