"""An experiment's recipe: a TOML file of data, read and checked before any work.

    description = "one line for `lmstack experiment list`"
    stages = ["world", "tokenizer", "data", "pretrain", "sft"]   # or stop after "pretrain", or go on to "reader"
    headline = ["base reversal_rank group+direction=reversal/parent_to_child", "chat arithmetic digits=*"]
    world = { people = 40 }            # world knobs for every variant (default: the scale's world)
    tokenizer = { conversations = true }  # tokenizer knobs (the speedrun's --set tokenizer.KEY)
    pretrain = ["train.max_steps=10"]  # --set overrides for every variant's pretraining
    sft = []                           # ... and its SFT
    reader = { lookups = "retrieved" } # the reader stage's look-ups: "called" (default) or "retrieved"

    [eval]                             # the model -> the tasks it is scored on
    base = ["reversal_rank"]
    chat = ["reversal_rank", "reversal_qa"]

    [variants.single]                  # at least one; the same keys, added to the shared ones
    world = { bios_per_person = 1, permute = false }

The "reader" stage fine-tunes the chat model further on look-up conversations (a search call, its
result, the answer), the world's and as many about the people of a practice world it never saw
(READER_SET and READER_MIX below, PRACTICE_PEOPLE in run.py): the README's "reader", which
`[eval] reader` scores.
A headline is "MODEL TASK [SLICE]": SLICE is one of the task's slices as eval names them
("split=heldout", "group+direction=reversal/parent_to_child"), or "FIELD=*" for each value of it.
A count knob may be written "K per person" (K x the world's people). Tasks are the world's
(lmstack/eval/world.toml) and eval's built-in measures (MEASURES in store.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmstack.config import load_config, model_config_from_dict, read_preset
from lmstack.eval.run import WORLD_SPEC
from lmstack.eval.tasks import load_specs
from lmstack.experiments.store import MEASURES
from lmstack.speedrun import PEOPLE, TOKENIZER_KEYS, VOCAB, WORLD_KEYS, knob_settings, split_overrides
from lmstack.train.sft import PRESET as SFT_PRESET
from lmstack.train.sft import sft_config
from lmstack.utils import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).parent
STAGES = ["world", "tokenizer", "data", "pretrain", "sft", "reader"]
DEFAULT_STAGES = STAGES[:5]
MODELS = {"base": "pretrain", "chat": "sft", "reader": "reader"}  # the model folder -> the stage that makes it
# World knobs a recipe may set, with their types: the world's size, and the text knobs the speedrun's
# --set world.KEY=VALUE takes (lmstack.world.generate's keywords).
WORLD_KNOBS = {"people": int, **WORLD_KEYS}
COUNTS = {"arithmetic", "stories", "copy_docs", "reading_docs"}  # may be "K per person"
# The reader stage's SFT settings per scale (`lmstack sft --set`): 600 steps at half the chat
# stage's learning rate on the small model, the README's reader ("More reader steps": 200 until
# 2026-12-06, 15 points fewer with retrieval over three seeds); tiny checks the plumbing.
READER_SET = {"tiny": ["train.max_steps=4", "train.batch_tokens=2048", "train.eval_every=0", "train.save_every=0",
                       "optim.lr=1e-3"],
              "small": ["train.max_steps=600", "optim.lr=5e-4", "train.eval_every=200"]}
READER_MIX = {"small": 0.2}  # its share of pretraining windows (as the speedrun's SFT_MIX)
# The reader stage's knobs: `lookups`, the shape its look-ups are learnt in: "called" (the model calls
# search, the result after the question: the world's conversations as they are) or "retrieved" (the
# result before the question, as retrieval done for the model shows it: README, "Retrieval before
# the question"); `practice_lookups`, how many fact look-ups about the practice world's people it
# learns besides those of both worlds' conversations (0: none; README, "Retrieval before the question").
READER_KNOBS = {"lookups": str, "practice_lookups": int}
LOOKUP_SHAPES = ("called", "retrieved")
TOP_KEYS = {"description", "stages", "headline", "eval", "world", "tokenizer", "pretrain", "sft", "reader", "variants"}
VARIANT_KEYS = {"world", "tokenizer", "pretrain", "sft", "reader"}


@dataclass
class Variant:
    name: str
    world: dict  # world knobs (the shared ones, then this variant's)
    pretrain: list[str]  # --set overrides of pretraining
    sft: list[str]  # --set overrides of SFT
    tokenizer: dict = field(default_factory=dict)  # tokenizer knobs (TOKENIZER_KEYS)
    reader: dict = field(default_factory=dict)  # the reader stage's knobs (READER_KNOBS)


@dataclass
class Headline:
    model: str  # "base" | "chat" | "reader"
    task: str
    slice: str | None = None  # a slice key, or "FIELD=*"

    def __str__(self) -> str:
        return f"{self.model} {self.task}" + (f" {self.slice}" if self.slice else "")

    def keys(self, metric: dict) -> list[str | None]:
        """The slice keys of a stored metric this headline names (None: the task's overall score)."""
        if self.slice is None:
            return [None]
        if self.slice.endswith("=*"):
            return sorted((k for k in metric.get("slices", {}) if k.startswith(self.slice[:-1])), key=_natural)
        return [self.slice]


@dataclass
class Recipe:
    name: str
    path: Path
    description: str
    stages: list[str]
    eval: dict[str, list[str]]  # model -> tasks
    headline: list[Headline]
    variants: list[Variant] = field(default_factory=list)


def _natural(key: str):
    """Slice keys in reading order: digits=2 before digits=10."""
    value = key.partition("=")[2]
    return (0, int(value), key) if value.isdigit() else (1, 0, key)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def recipe_path(name: str) -> Path:
    """NAME (a built-in experiment) or a path to a recipe .toml file."""
    path = Path(name)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise UserError(f"experiment file {path} does not exist")
        return path
    path = BUILTIN_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown experiment {name!r} (built in: {', '.join(builtin_names())}; or a path to a "
                        ".toml recipe)")
    return path


def load_recipe(name: str) -> Recipe:
    """Read and check a recipe (every problem a one-line UserError naming the file)."""
    path = recipe_path(name)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"experiment {path}: not readable TOML: {e}") from None
    where = f"experiment {path}"
    _known_keys(doc, TOP_KEYS, where)
    stages = doc.get("stages", DEFAULT_STAGES)
    if stages not in (STAGES[:4], STAGES[:5], STAGES):
        raise UserError(f"{where}: stages must be {STAGES[:4]}, {STAGES[:5]} or {STAGES} (got {stages!r})")
    evals = _eval_table(doc.get("eval"), stages, where)
    tasks = _tasks()
    for model, names in evals.items():
        for t in names:
            if t not in tasks:
                raise UserError(f"{where}: [eval] {model}: unknown task {t!r} (tasks: {', '.join(tasks)})")
            if model == "base" and tasks[t][0] == "chat":
                raise UserError(f"{where}: [eval] base: task {t} needs a chat model (score it on chat)")
    headline = [_headline(h, evals, tasks, where) for h in _list(doc.get("headline", []), "headline", where)]
    if not isinstance(doc.get("variants"), dict) or not doc["variants"]:
        raise UserError(f"{where}: no [variants.NAME] table (a recipe needs at least one variant)")
    shared = _settings(doc, "", where)
    variants = []
    for vname, table in doc["variants"].items():
        if not isinstance(table, dict):
            raise UserError(f"{where}: variants.{vname} is not a table")
        _known_keys(table, VARIANT_KEYS, f"{where}: variants.{vname}")
        own = _settings(table, f"variants.{vname}.", where)
        variants.append(Variant(vname, {**shared[0], **own[0]}, shared[1] + own[1], shared[2] + own[2],
                                {**shared[3], **own[3]}, {**shared[4], **own[4]}))
    if "reader" not in stages and any(v.reader for v in variants):
        raise UserError(f"{where}: reader knobs need the reader stage (stages = {STAGES})")
    return Recipe(path.stem, path, str(doc.get("description", "")), stages, evals, headline, variants)


def _known_keys(table: dict, allowed: set, where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise UserError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(allowed))})")


def _list(value, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: {key} must be a list of strings (got {value!r})")
    return value


def _tasks() -> dict[str, tuple[str, list]]:
    """The tasks a recipe may name -> (what they need: "chat" or "", their slices)."""
    return {**{s.name: (s.needs, s.slices) for s in load_specs(WORLD_SPEC, ".")}, **{m: ("", []) for m in MEASURES}}


def _eval_table(table, stages: list[str], where: str) -> dict[str, list[str]]:
    if not isinstance(table, dict) or not table:
        raise UserError(f"{where}: needs an [eval] table (base = [TASKS], chat = [TASKS])")
    _known_keys(table, set(MODELS), f"{where}: [eval]")
    for model, names in table.items():
        if MODELS[model] not in stages:
            raise UserError(f"{where}: [eval] {model}: the {MODELS[model]} stage does not run (stages = {stages})")
        if not _list(names, f"[eval] {model}", where):
            raise UserError(f"{where}: [eval] {model} names no task")
    return table


def _headline(text: str, evals: dict, tasks: dict, where: str) -> Headline:
    parts = text.split()
    if len(parts) not in (2, 3):
        raise UserError(f"{where}: headline {text!r} is not 'MODEL TASK [SLICE]'")
    h = Headline(*parts)
    if h.task not in evals.get(h.model, []):
        raise UserError(f"{where}: headline {text!r}: {h.task} is not scored on {h.model} ([eval])")
    slices = tasks[h.task][1]
    key, eq, _ = (h.slice or "").partition("=")
    if h.slice is not None and not (eq and key in slices):
        raise UserError(f"{where}: headline {text!r}: the slice must be FIELD=VALUE or FIELD=*, FIELD one of "
                        f"{h.task}'s slices ({', '.join(slices) or 'none'})")
    return h


def _settings(table: dict, prefix: str, where: str) -> tuple[dict, list[str], list[str], dict, dict]:
    """(world knobs, pretrain --set, sft --set, tokenizer knobs, reader knobs) of a recipe's top
    level or a variant."""
    reader = _knobs(table, "reader", READER_KNOBS, prefix, where)
    if reader.get("lookups", LOOKUP_SHAPES[0]) not in LOOKUP_SHAPES:
        raise UserError(f"{where}: {prefix}reader.lookups must be one of {', '.join(LOOKUP_SHAPES)} "
                        f"(got {reader['lookups']!r})")
    if reader.get("practice_lookups", 0) < 0:
        raise UserError(f"{where}: {prefix}reader.practice_lookups must be >= 0 (got {reader['practice_lookups']})")
    return (_knobs(table, "world", WORLD_KNOBS, prefix, where),
            _list(table.get("pretrain", []), f"{prefix}pretrain", where),
            _list(table.get("sft", []), f"{prefix}sft", where),
            _knobs(table, "tokenizer", TOKENIZER_KEYS, prefix, where), reader)


def _knobs(table: dict, key: str, knobs: dict, prefix: str, where: str) -> dict:
    """The table `key` of knobs (name -> type), checked."""
    values = table.get(key, {})
    if not isinstance(values, dict):
        raise UserError(f"{where}: {prefix}{key} must be a table of {key} knobs")
    for k, v in values.items():
        if k not in knobs:
            raise UserError(f"{where}: unknown {key} knob {prefix}{key}.{k} (knobs: {', '.join(knobs)})")
        if not _knob_ok(knobs[k], k, v):
            raise UserError(f"{where}: {prefix}{key}.{k} must be {knobs[k].__name__}"
                            + (" or 'K per person'" if k in COUNTS else "") + f" (got {v!r})")
    return values


def _knob_ok(typ: type, knob: str, v) -> bool:
    if isinstance(v, bool):  # (a bool is an int to Python, not to a recipe)
        return typ is bool
    if typ is float:
        return isinstance(v, (int, float))
    return isinstance(v, typ) or (knob in COUNTS and _per_person(v) is not None)


def _per_person(v) -> float | None:
    """"2 per person" -> 2.0; anything else -> None."""
    if isinstance(v, str) and v.endswith(" per person"):
        try:
            return float(v[:-len(" per person")])
        except ValueError:
            return None
    return None


def run_settings(variant: Variant, scale: str, seed: int) -> dict:
    """One run's settings: {"world": lmstack.world.generate's keywords, "pretrain", "sft": --set
    overrides, and "tokenizer": its knobs where a recipe sets any}. What the speedrun does at this
    scale comes first (its world size, its world and SFT settings for the preset), then the variant's
    (a count "K per person" counted), then the seed (the world's, and train.seed, which like the
    speedrun's shared keys reaches both training stages)."""
    people = variant.world.get("people", PEOPLE.get(Path(scale).stem, PEOPLE["small"]))

    def text(v) -> str:  # a knob as the speedrun's --set world.KEY=VALUE reads it
        k = _per_person(v)
        return str(v).lower() if isinstance(v, bool) else str(v if k is None else round(k * people))

    items = [*(f"world.{k}={text(v)}" for k, v in variant.world.items() if k != "people"), *variant.pretrain,
             *(f"sft.{s}" for s in variant.sft), *(f"tokenizer.{k}={text(v)}" for k, v in variant.tokenizer.items()),
             f"train.seed={seed}"]
    sets = split_overrides(Path(scale).stem, items)
    tokenizer = knob_settings("tokenizer", sets["tokenizer"])
    return {"world": {"people": people, "seed": seed, **knob_settings("world", sets["world"])},
            "pretrain": sets["pretrain"], "sft": sets["sft"],
            **({"tokenizer": tokenizer} if tokenizer else {})}  # (a run of before, without the key, still matches)


def reader_settings(scale: str, seed: int) -> list[str]:
    """The reader stage's --set overrides at a scale (the same for every variant), with the seed."""
    return [*READER_SET.get(Path(scale).stem, READER_SET["small"]), f"train.seed={seed}"]


def check_scale(recipe: Recipe, scale: str) -> None:
    """Build every variant's pretraining and SFT config at this scale (a bad --scale or --set
    fails now, in one line, not after the first variant trained)."""
    try:
        read_preset(scale)
    except UserError as e:
        raise UserError(f"--scale {scale}: {e}") from None
    for v in recipe.variants:
        try:
            sets = run_settings(v, scale, 0)
            cfg = load_config(scale, sets["pretrain"], vocab_size=VOCAB.get(Path(scale).stem, 4096))
            sfts = {"sft": sets["sft"], "reader": reader_settings(scale, 0)}
            for stage in ("sft", "reader"):
                if stage in recipe.stages:
                    sft_config(SFT_PRESET, sfts[stage], model_config_from_dict(cfg.to_dict()["model"]))
        except UserError as e:
            raise UserError(f"experiment {recipe.name}, variant {v.name}: {e}") from None
