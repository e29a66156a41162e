"""`lmstack speedrun`: the whole pipeline on the synthetic world, one stage after another.

    world -> tokenizer -> token shards -> pretrain -> SFT
          -> RL prompts -> labels -> reward model -> DPO -> PPO -> GRPO      (skipped with --no-align)
          -> eval (every model) -> win rates -> report card

Each stage writes its own folder under the run folder (world/, tokenizer/, data/, base/,
chat/, rl_prompts/, labels/, rm/, dpo/, ppo/, grpo/), each model's evaluation goes to MODEL/eval/, the
ground-truth win rate of DPO and PPO against the SFT model to MODEL/winrate/vs_chat.json, the
report card to report.md, and `speedrun.json` (rewritten after every stage) records what ran,
how long it took and the headline numbers. The alignment stages all start from chat/: the
labeller compares pairs of chat/'s own samples on the comparisons' prompts (labels/chat.jsonl),
the reward model learns from those and the world's comparisons, DPO from the world's
comparisons, PPO against the reward model on the
comparisons' prompts, GRPO on arithmetic problems that are not among the held-out probes.
`--set KEY=VALUE` configures pretraining (train.dtype/device/compile/seed apply to every
stage); `--set STAGE.KEY=VALUE` one later stage only, STAGE one of sft, rm, dpo, ppo, grpo
(e.g. sft.train.max_steps=50, dpo.pref.beta=0.2, grpo.rl.group_size=4); `--set world.KEY=VALUE`
the world's text (WORLD_KEYS, e.g. world.qa_docs=0); `--set tokenizer.conversations=false` fits the
tokenizer to the world's pretraining text alone, not its conversations too (TOKENIZER_KEYS). Every
--set is checked before any work starts.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

from lmstack.align.dpo import dpo
from lmstack.align.judge import judge
from lmstack.align.pairs import pref_config
from lmstack.align.reward import reward_train
from lmstack.align.rl import grpo, ppo, rl_config
from lmstack.align.rollout import tool_registry
from lmstack.config import load_config, model_config_from_dict
from lmstack.data import prepare
from lmstack.eval.lm import ModelLM
from lmstack.eval.report import report
from lmstack.eval.run import evaluate
from lmstack.eval.winrate import win_rate
from lmstack.tokenizer import train_tokenizer
from lmstack.tools import default_registry
from lmstack.train.pretrain import pretrain
from lmstack.train.sft import sft, sft_config
from lmstack.utils import UserError, atomic_write_json
from lmstack.world import generate
from lmstack.world.rl_prompts import arithmetic_prompts

# Per preset: world size, tokenizer vocabulary, the world's text, pretraining and SFT settings, and
# probe questions to score. small is tuned so that the base learns its world within the CPU budget
# (the README's "The default model learns its world" has the measurements behind each choice):
# 300 people, each named in every sentence of their biographies, the train people's Q/A pairs
# mixed into pretraining; 1,500 steps of 2,048 tokens at lr 1e-3 (the optimizer steps that fill
# the 15-minute budget with SFT on 2 CPU cores), warmup-stable-decay rather than cosine; a short SFT at
# lr 1e-3 with 30% pretraining windows mixed in.
# tiny's world keeps the old skill data (sized by its 200 people, no thinking/python/search
# conversations): a plumbing check whose 20-step chat model must still learn to end its turn.
PEOPLE = {"tiny": 200, "small": 300, "gpt2": 50_000}
VOCAB = {"tiny": 1024, "small": 4096, "gpt2": 32768}
WORLD_SET = {"tiny": {"skill_people": 0, "basic_skills": True}, "small": {"qa_docs": 1, "full_names": True}}
PRETRAIN_SET = {"small": ["train.batch_tokens=2048", "train.micro_batch_size=8", "train.max_steps=1500",
                          "optim.warmup_steps=50", "optim.lr=1e-3", "optim.schedule=wsd",
                          "train.eval_every=150", "train.save_every=150"]}
SFT_SET = {"tiny": ["train.max_steps=20", "train.batch_tokens=2048", "train.eval_every=0",
                    "train.save_every=0", "optim.lr=3e-3"],
           "small": ["train.max_steps=150", "optim.lr=1e-3", "train.eval_every=50"]}
# The fraction of SFT's sequences that are pretraining windows from the run's data/ (lmstack sft
# --mix-fraction), so that fine-tuning does not wreck the base's prose.
SFT_MIX = {"small": 0.3}
# The alignment stages: --set prefix -> (preset, model folder). Each starts from chat/.
ALIGN = {"rm": ("reward", "rm"), "dpo": ("dpo", "dpo"), "ppo": ("ppo", "ppo"), "grpo": ("grpo", "grpo")}
# Their settings per preset; "small" (and gpt2) run the presets unchanged: they are the recipes
# measured in the README. "tiny" checks the plumbing in a few seconds a stage: a few steps of small batches
# (pairs per step = batch_tokens / seq_len, 128 on the tiny model), short rollouts.
_TINY_STEPS = ["train.eval_every=0", "train.save_every=0", "optim.warmup_steps=1"]
ALIGN_SET = {"tiny": {
    "rm": ["train.max_steps=6", "train.batch_tokens=1024", "train.micro_batch_size=8", *_TINY_STEPS],
    "dpo": ["train.max_steps=6", "train.batch_tokens=1024", "train.micro_batch_size=8", *_TINY_STEPS],
    "ppo": ["train.max_steps=2", "train.micro_batch_size=8", "rl.prompts_per_step=8", "rl.epochs=1",
            "rl.max_new_tokens=16", *_TINY_STEPS],
    "grpo": ["train.max_steps=2", "train.micro_batch_size=8", "rl.prompts_per_step=4", "rl.group_size=4",
             "rl.epochs=1", "rl.max_new_tokens=16", *_TINY_STEPS]}}
GRPO_DIGITS = (1, 2, 3)  # operand sizes of GRPO's arithmetic prompts (lmstack.world.rl_prompts)
GRPO_TOOLS = "calculator"  # rl.tools of the GRPO stage ("" = none): it learns to use the calculator
LABEL_LIMIT = {"tiny": 200}  # comparisons' prompts whose pairs of chat/'s samples are labelled (default: all)
WINRATE_N = {"tiny": 40}  # world prompts per win rate (default: win_rate's own, 200)
EVAL_LIMIT = {"tiny": 20}  # rows per task (default: each task's own limit, lmstack/eval/world.toml)
VAL_FRACTION = 0.02  # of the world's documents held out as pretraining's validation split
# The world's text knobs (lmstack.world.generate's arguments) --set world.KEY=VALUE may change.
WORLD_KEYS = {"bios_per_person": int, "qa_docs": int, "copy_docs": int, "reading_docs": int, "permute": bool,
              "full_names": bool, "skill_people": int, "basic_skills": bool,
              "arithmetic": int, "stories": int, "heldout_fraction": float}
# The tokenizer's knobs (--set tokenizer.KEY=VALUE): conversations=false trains its merges on the world's
# pretraining text alone, not on its conversations (sft.jsonl) as well (README: "The assistant's words").
TOKENIZER_KEYS = {"conversations": bool}
KNOBS = {"world": WORLD_KEYS, "tokenizer": TOKENIZER_KEYS}  # the stages whose --set items are knobs, not config
SHARED = ("train.dtype", "train.device", "train.compile", "train.seed")  # --set keys every stage inherits
MODELS = ("base", "chat", "dpo", "ppo", "grpo")  # the model folders `lmstack eval` scores
MARKER = "speedrun.json"


def _prepare_run_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"run folder {out} is not empty (use --force to start it over)")
        if not (out / MARKER).exists():  # never rm -rf a folder we did not make
            raise UserError(f"{out} is not a speedrun folder (no {MARKER}); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def split_overrides(name: str, overrides) -> dict[str, list[str]]:
    """--set items -> {"pretrain", "world", "tokenizer", "sft", "rm", "dpo", "ppo", "grpo": its overrides}:
    `STAGE.KEY=V` goes to that stage only, anything else to pretraining, the SHARED keys to every
    training stage. The speedrun's own settings for the preset come first, so a --set wins over them."""
    sets = {"pretrain": list(PRETRAIN_SET.get(name, [])),
            "world": [f"{k}={v}" for k, v in WORLD_SET.get(name, {}).items()], "tokenizer": [],
            "sft": list(SFT_SET.get(name, [])),
            **{s: list(ALIGN_SET.get(name, {}).get(s, [])) for s in ALIGN}}
    sets["grpo"].append(f"rl.tools={GRPO_TOOLS}")
    for item in overrides:
        key = item.partition("=")[0].strip()
        stage = key.partition(".")[0]
        if stage in sets and stage != "pretrain" and "." in key:
            sets[stage].append(item.strip()[len(stage) + 1:])
        else:
            sets["pretrain"].append(item)
            if key in SHARED:
                for s in sets:
                    if s != "pretrain" and s not in KNOBS:
                        sets[s].append(item)
    return sets


def sft_mix(name: str, data: Path, shares: dict = SFT_MIX) -> dict:
    """lmstack.train.sft.sft's mixing arguments for a preset: its share (SFT_MIX, or another such
    table) of pretraining windows from `data`."""
    f = shares.get(name, 0.0)
    return {"mix_data": data, "mix_fraction": f} if f > 0 else {}


def knob_settings(stage: str, items: list[str]) -> dict:
    """STAGE.KEY=VALUE items (without the prefix) of a knob stage (KNOBS) -> {KEY: typed value}: for
    "world", lmstack.world.generate's keyword arguments; for "tokenizer", world_tokenizer's."""
    keys, out = KNOBS[stage], {}
    for item in items:
        key, eq, value = (x.strip() for x in item.partition("="))
        if key not in keys or not eq:
            raise UserError(f"--set {stage}.{item}: the {stage}'s keys are {', '.join(keys)} ({stage}.KEY=VALUE)")
        kind = keys[key]
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            raise UserError(f"--set {stage}.{item}: {key} takes {'true or false' if kind is bool else kind.__name__}")
    return out


def world_tokenizer(world: Path, out: Path, name: str, conversations: bool = True, force: bool = False):
    """The tokenizer stage: a BPE of the preset's vocabulary (VOCAB) on the world's pretraining text
    and, with `conversations` (tokenizer.conversations, the default), on the text of its
    conversations too: the assistant's own words ("sorry", "language") are then tokens, not letters
    the model must learn to spell (README: "The assistant's words")."""
    return train_tokenizer([world / "pretrain.jsonl"], vocab_size=VOCAB.get(name, 4096), out=out, force=force,
                           conversations=[world / "sft.jsonl"] if conversations else [])


def check_settings(model_cfg, sets: dict, align: bool) -> None:
    """Build every later stage's config from its overrides (UserError, one line, on a bad one),
    so that a typo fails now and not after pretraining."""
    checks = [("sft", lambda: sft_config("sft", sets["sft"], model_cfg))]
    if align:
        checks += [(s, lambda s=s: pref_config(ALIGN[s][0], sets[s], model_cfg)) for s in ("rm", "dpo")]
        checks += [("ppo", lambda: rl_config("ppo", sets["ppo"], model_cfg)),
                   ("grpo", lambda: tool_registry(rl_config("grpo", sets["grpo"], model_cfg).rl.tools))]
    for stage, check in checks:
        try:
            check()
        except UserError as e:
            raise UserError(f"speedrun's {stage} stage (--set {stage}.KEY=VALUE): {e}") from None


def speedrun(out="runs/speedrun", preset="small", people=None, overrides=(), force=False,
             align: bool = True) -> dict:
    """Run the whole pipeline into the run folder `out` (see the module doc); align=False stops
    after SFT (base and chat only). Returns what speedrun.json holds."""
    name = Path(preset).stem
    overrides = list(overrides)
    sets = split_overrides(name, overrides)
    if not align:
        extra = [o for o in overrides if o.partition(".")[0].strip() in ALIGN and "." in o.partition("=")[0]]
        if extra:
            raise UserError(f"--set {extra[0]}: the {extra[0].partition('.')[0].strip()} stage does not run "
                            "with --no-align")
    # Bad preset or --set: fail now, before any work.
    cfg = load_config(preset, sets["pretrain"], vocab_size=VOCAB.get(name, 4096))
    check_settings(model_config_from_dict(cfg.to_dict()["model"]), sets, align)
    world_kw, tokenizer_kw = knob_settings("world", sets["world"]), knob_settings("tokenizer", sets["tokenizer"])
    out = Path(out)
    _prepare_run_folder(out, force)
    people = people or PEOPLE.get(name, PEOPLE["small"])
    summary = {"preset": preset, "people": people, "world": world_kw, "tokenizer": tokenizer_kw,
               "overrides": overrides, "align": align, "stages": {}}
    atomic_write_json(out / MARKER, summary)
    world, chat = out / "world", out / "chat"
    comparisons = world / "comparisons.jsonl"
    stages = [
        ("world", lambda: generate(world, people=people, seed=0, **world_kw)),
        ("tokenizer", lambda: world_tokenizer(world, out / "tokenizer", name, **tokenizer_kw)),
        ("data", lambda: prepare([world / "pretrain.jsonl"], tokenizer=out / "tokenizer",
                                 out=out / "data", val_fraction=VAL_FRACTION)),
        ("pretrain", lambda: pretrain(preset, out / "data", out / "base", overrides=sets["pretrain"])),
        ("sft", lambda: sft(out / "base", [world / "sft.jsonl"], chat, overrides=sets["sft"],
                            **sft_mix(name, out / "data"))),
    ]
    if align:
        rl_prompts = out / "rl_prompts" / "arithmetic.jsonl"
        labels = out / "labels" / "chat.jsonl"
        stages += [
            ("rl_prompts", lambda: arithmetic_prompts(world, rl_prompts, digits=GRPO_DIGITS)),
            ("labels", lambda: judge(chat, comparisons, labels, seed=0, limit=LABEL_LIMIT.get(name, 0),
                                           use_labeller=True)),
            ("reward", lambda: reward_train(chat, [comparisons, labels], out / "rm", overrides=sets["rm"])),
            ("dpo", lambda: dpo(chat, comparisons, out / "dpo", overrides=sets["dpo"])),
            ("ppo", lambda: ppo(chat, out / "rm", comparisons, out / "ppo", overrides=sets["ppo"])),
            ("grpo", lambda: grpo(chat, rl_prompts, "arithmetic", out / "grpo", overrides=sets["grpo"])),
        ]
    stages.append(("eval", lambda: evaluate_stages(out, EVAL_LIMIT.get(name))))
    if align:
        stages.append(("winrate", lambda: win_rates(out, WINRATE_N.get(name))))
    stages.append(("report", lambda: report(out)))
    for i, (stage, fn) in enumerate(stages, 1):
        print(f"\n== stage {i}/{len(stages)}: {stage} ==", flush=True)
        t0 = time.time()
        result = fn()
        entry = summary["stages"][stage] = {"seconds": round(time.time() - t0, 1)}
        if stage in ("pretrain", "sft", "dpo"):
            entry["final"] = result
        elif stage == "reward":
            entry["final"] = {k: v for k, v in result.items() if k != "reward_eval"}
            entry["held_out"] = _brief(result["reward_eval"]["held_out"], "n", "accuracy", "ci", "margin")
        elif stage in ("ppo", "grpo"):
            entry["final"] = {k: v for k, v in result.items() if k != "heldout"}
            entry["held_out_reward"] = {k: (v or {}).get("mean") for k, v in (result.get("heldout") or {}).items()}
        elif stage in ("rl_prompts", "labels", "eval", "winrate"):
            entry.update(result)
        elif stage == "report":
            entry["path"] = str(result)
        atomic_write_json(out / MARKER, summary)
    print_summary(out, summary)
    return summary


def _brief(d: dict, *keys) -> dict:
    """The named entries of d, NaN as None (speedrun.json stays strict JSON)."""
    return {k: None if isinstance(d.get(k), float) and math.isnan(d[k]) else d.get(k) for k in keys}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def print_summary(out: Path, summary: dict) -> None:
    st = summary["stages"]
    base = st["pretrain"]["final"]
    ev = st["eval"]
    total = sum(s["seconds"] for s in st.values())
    tasks = {k: v["tasks"] for k, v in ev.items() if isinstance(v, dict) and "tasks" in v}
    lines = [
        f"\nspeedrun done in {total / 60:.1f} min ({total:.0f}s) -> {out}",
        f"  base model: val_loss {base.get('val_loss', float('nan')):.3f}, "
        f"val_bpb {base.get('val_bpb', float('nan')):.3f}; facts ranked first of 10 "
        f"{tasks['base'].get('facts_rank', float('nan')):.0%} (chance 10%)  ({out / 'base'})",
        f"  assistant:  facts of people seen in SFT {ev['chat'].get('facts_qa_train', float('nan')):.0%} "
        f"exact match (most common answer {ev['chat'].get('facts_qa_train_chance', float('nan')):.0%}), "
        f"refuses {tasks['chat'].get('refusal', float('nan')):.0%} of harmful requests, hallucinates on "
        f"{tasks['chat'].get('hallucination', float('nan')):.0%} of unknown people, "
        f"{ev['chat'].get('format', float('nan')):.0%} of replies closed with <|end|>  ({out / 'chat'})"]
    if "reward" in st:
        h = st["reward"]["held_out"]
        ci = f" [{_pct(h['ci'][0])}-{_pct(h['ci'][1])}]" if h.get("ci") else ""
        labelled = st.get("labels", {}).get("pairs")
        lines.append(f"  reward model: held-out pairwise accuracy {_pct(h.get('accuracy'))}{ci} of "
                     f"{h.get('n') or 0} pairs (chance 50%)"
                     + (f"; it also learnt from {labelled:,} labelled pairs of chat's own samples" if labelled else "")
                     + f"  ({out / 'rm'})")
    for m, label in (("dpo", "DPO"), ("ppo", "PPO")):
        w = st.get("winrate", {}).get(m)
        if w:
            t, c = tasks.get(m, {}), tasks["chat"]  # refusals: the win rate ties a refused benign request
            refusals = (f"; refuses {_pct(t.get('refusal'))} of harmful requests (chat {_pct(c.get('refusal'))}) and "
                        f"{_pct(t.get('false_refusal'))} of benign near-misses (chat {_pct(c.get('false_refusal'))})"
                        if "refusal" in t else "")
            lines.append(f"  {label}: win rate vs chat {_pct(w['win_rate'])} [{_pct(w['ci'][0])}-{_pct(w['ci'][1])}] "
                         f"({w['wins']} wins, {w['losses']} losses, {w['ties']} ties on {w['n']} unseen world "
                         f"prompts, ground truth){refusals}  ({out / m})")
    if "grpo" in tasks:
        g, c = tasks["grpo"], tasks["chat"]
        held = st.get("grpo", {}).get("held_out_reward", {})
        rl = (f"; held-out RL prompts {_pct(held.get('before'))} -> {_pct(held.get('after'))}"
              if held.get("after") is not None else "")
        lines.append(f"  GRPO: arithmetic {_pct(g.get('arithmetic'))} (chat {_pct(c.get('arithmetic'))}), with the "
                     f"calculator {_pct(g.get('arithmetic_tool'))} (chat {_pct(c.get('arithmetic_tool'))}){rl}  "
                     f"({out / 'grpo'})")
    lines.append(f"  report card: {st['report']['path']}")
    print("\n".join(lines))
    others = [str(out / m) for m in ("dpo", "ppo", "grpo") if m in tasks]
    print(f"talk to it: lmstack chat --model {out / 'chat'}"
          + (f"  (or an aligned model: --model {' | '.join(others)})" if others else ""))


# --------------------------------------------------------------------------- evaluation

def show_samples(model_dir, world_dir, seed: int = 0) -> None:
    """Three conversations with the assistant: a world fact, a sum, a greeting (greedy)."""
    lm = ModelLM.load(model_dir, dtype="auto", device="auto")
    facts = [json.loads(line) for line in open(Path(world_dir) / "probes" / "facts.jsonl", encoding="utf-8")]
    arith = [json.loads(line) for line in open(Path(world_dir) / "probes" / "arithmetic.jsonl", encoding="utf-8")]
    rng = random.Random(seed)
    q = rng.choice([r for r in facts if r["split"] == "train"])
    a = rng.choice([r for r in arith if r["digits"] <= 2] or arith)
    asks = [(q["question"], q["answer"]), (a["question"], a["answer"]), ("Hello!", None)]
    replies = lm.chat([[{"role": "user", "content": text}] for text, _ in asks], max_tokens=48,
                      tools=default_registry())
    for (text, truth), r in zip(asks, replies):
        print(f"user:      {text}\nassistant: {r.text}{'' if r.closed else ' [no <|end|>]'}"
              + (f" [used the calculator {r.tool_calls}x]" if r.tool_calls else "")
              + (f"\n           [truth: {truth}]" if truth else "") + "\n", flush=True)


def evaluate_stages(out: Path, limit: int | None) -> dict:
    """`lmstack eval` on every model folder of the run (MODELS that exist: the world's tasks +
    bits per byte); the headline numbers go to speedrun.json, the full results to MODEL/eval/."""
    show_samples(out / "chat", out / "world")
    summary = {}
    for stage in MODELS:
        if not (out / stage / "model.safetensors").is_file():
            continue
        print(f"-- {stage} model --", flush=True)
        r = evaluate(out / stage, world=out / "world", limit=limit)
        summary[stage] = {"results": r["path"], "seconds": r["seconds"],
                          "tasks": {name: round(t["acc"], 4) for name, t in r["tasks"].items()}}
        if "lm" in r:
            summary[stage]["val_bpb"] = round(r["lm"]["bpb"], 4)
        if "format" in r:
            summary[stage]["format"] = round(r["format"]["acc"], 4)
        if "spelling" in r:  # chat replies whose words are all the world's (eval/spelling.py)
            summary[stage]["spelling"] = round(r["spelling"]["all"]["acc"], 4)
        facts = r["tasks"].get("facts_qa")
        if facts:  # exact match on people seen in SFT, and its most-common-answer baseline
            summary[stage]["facts_qa_train"] = facts["slices"]["split=train"]["acc"]
            summary[stage]["facts_qa_train_chance"] = facts["slices"]["split=train"]["chance"]
    return summary


def win_rates(out: Path, n: int | None) -> dict:
    """Ground-truth win rate of DPO and PPO against the SFT model on world prompts that are not
    in the training comparisons (eval/winrate.py), to MODEL/winrate/vs_chat.json."""
    summary = {}
    for m in ("dpo", "ppo"):
        if not (out / m / "model.safetensors").is_file():
            continue
        print(f"-- {m} vs chat --", flush=True)
        path = out / m / "winrate" / "vs_chat.json"
        r = win_rate(out / m, out / "chat", out / "world", exclude=out / "world" / "comparisons.jsonl", out=path,
                     **({"n": n} if n else {}))
        summary[m] = {**_brief(r, "n", "wins", "losses", "ties", "win_rate", "ci"), "path": str(path)}
    return summary
