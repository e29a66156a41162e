"""Preference data, shared by `lmstack reward train` and `lmstack dpo`, and the ground-truth
win rate of one model against another on the synthetic world.

Comparisons (jsonl), one labelled pair per row, the same format from the world's simulated
labeller (WORLD/comparisons.jsonl), from people in the web app (`lmstack feedback export`)
and from an AI judge (`lmstack judge`):

    {"prompt": "..." | [messages], "chosen": "...", "rejected": "...", "reason": ..., "meta": {...}}

`prompt` is a string (one user message) or a list of chat messages (the conversation the two
answers reply to); `chosen` / `rejected` are non-empty strings (the better / the worse
assistant reply). `reason` and `meta` are optional; `meta.type` (e.g. "harmful", "fact")
slices the reward model's held-out accuracy.

A pair is rendered twice by THE chat template, prompt + {"role": "assistant", "content": answer}
for each answer; the answer mask is 1 on the final assistant message's tokens and its closing
<|end|>. A pair longer than `max_len` tokens (the longer answer decides) loses prompt tokens
from the left (after BOS, the same for both answers); a pair whose answers alone do not fit
is skipped and counted. Pairs are held out by a hash of their prompt (about `val_fraction` of
them; every pair of one prompt on the same side, so held-out accuracy is on unseen prompts).

Batches (`PairBatches`, `iter_pair_batches`) hold B pairs as 2B rows, the B chosen answers
first, then the B rejected ones, right-padded to the longest row of the micro-batch:
    x     [2B, T] token ids (every token of the sequence, final <|end|> included; pad after)
    y     [2B, T] next-token targets: y[t] = x[t+1] on answer tokens, -100 elsewhere
    mask  [2B, T] 1 where y is an answer token (y != -100)
    last  [2B]    index of the sequence's final token (the answer's <|end|>) in x
DPO sums log p(y) over `mask`; the reward model reads the hidden state at `last`.
Pairs per optimizer step = train.batch_tokens / train.seq_len (the loop counts "tokens" as
rows x seq_len; `real_tokens` in metrics.jsonl is the count of real tokens in the step).

`win_rate(model_a, model_b, world_dir, n=200)`: greedy answers of both models to n held-out
world prompts (probes: facts questions, harmful requests, benign requests, questions about
people who do not exist), each pair labelled by the world's simulated labeller (ground truth);
A's wins / (wins + losses) with a 95% Wilson interval, by prompt type too.
    lmstack winrate --a A --b B [--world runs/small/world] [--n 200]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmstack.config import RunConfig, load_config, stage_override_keys
from lmstack.tokenizer import ChatFormatError, Tokenizer, render_chat
from lmstack.train.objectives import IGNORE_INDEX
from lmstack.utils import UserError, read_json

# --------------------------------------------------------------------------- rows


def prompt_messages(prompt) -> list[dict]:
    """A comparison's `prompt` -> the list of messages the answers reply to."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ChatFormatError("prompt is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise ChatFormatError("prompt must be a non-empty string or a non-empty list of messages")


def _check_row(row) -> str | None:
    """Why a comparison row is malformed (None when it is fine)."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return (f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                "(rows are {prompt, chosen, rejected})")
    for k in ("chosen", "rejected"):
        if not isinstance(row[k], str) or not row[k].strip():
            return f"{k} must be a non-empty string"
    why = prompt_problem(row["prompt"])
    if why:
        return why
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return "meta must be an object"
    return None


def prompt_problem(prompt) -> str | None:
    """Why a `prompt` (string or list of messages) cannot be rendered (None when it can)."""
    try:
        render_chat(_NullTok, prompt_messages(prompt))  # roles, contents, tool calls
    except ChatFormatError as e:
        return f"bad prompt: {e}"
    return None


class _NullTok:
    """Just enough of a tokenizer for render_chat to validate a conversation's structure."""
    special_ids = {t: 0 for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
                                  "<|tool_call|>", "<|/tool_call|>")}
    bos_id = 0

    @staticmethod
    def encode(text):
        return []


def read_jsonl(path, what: str = "data file"):
    """(line number, parsed row) of each non-blank line; bad JSON is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: name the .jsonl file)" if path.is_dir() else ""
        raise UserError(f"{what} {path} not found{hint}")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({str(e).splitlines()[0]})") from None


def load_comparisons(files) -> list[tuple[dict, str]]:
    """Every row of the comparison files, validated: [(row, "file:line")]. A malformed row is a
    UserError naming its file and line."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise UserError("--data needs at least one comparisons jsonl file")
    for f in files:  # every file checked before any is read
        if not Path(f).is_file():
            raise UserError(f"comparisons file {f} not found" + (" (a folder: name the .jsonl file)"
                                                                if Path(f).is_dir() else ""))
    rows = []
    for f in files:
        for n, row in read_jsonl(f, "comparisons file"):
            why = _check_row(row)
            if why:
                raise UserError(f"{f}:{n}: {why}")
            rows.append((row, f"{f}:{n}"))
    return rows


# --------------------------------------------------------------------------- rendering


def render_answers(tok: Tokenizer, prompt, answers: list[str], max_len: int):
    """The prompt + each answer through the chat template -> [(ids, mask)] (mask 1 on the
    final answer and its <|end|>), all with the same prompt, cut from the left (after BOS)
    so the longest fits `max_len` tokens. Returns (seqs, prompt tokens dropped), or None
    when the answers alone do not fit."""
    msgs = prompt_messages(prompt)
    p_ids, _ = render_chat(tok, msgs)
    seqs = []
    for a in answers:
        ids, mask = render_chat(tok, msgs + [{"role": "assistant", "content": a}])
        mask = [0] * len(p_ids) + mask[len(p_ids):]  # only this answer is trained on
        seqs.append((ids, mask))
    drop = max(len(ids) for ids, _ in seqs) - max_len
    if drop <= 0:
        return seqs, 0
    if drop > len(p_ids) - 2:  # keep BOS and one prompt token at least; never cut an answer
        return None
    return [(ids[:1] + ids[1 + drop:], mask[:1] + mask[1 + drop:]) for ids, mask in seqs], drop


@dataclass
class Pair:
    chosen: tuple[np.ndarray, np.ndarray]  # (ids int32, answer mask int8)
    rejected: tuple[np.ndarray, np.ndarray]
    type: str | None  # meta.type, when the row has one
    key: str  # a hash of the prompt: the train/validation split
    where: str  # file:line


def prompt_key(prompt) -> str:
    return hashlib.sha1(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_pairs(files, tok: Tokenizer, max_len: int) -> tuple[list[Pair], dict]:
    """Comparison files -> rendered pairs and stats {rows, pairs, truncated, skipped: {why: n},
    types: {type: n}}."""
    pairs, skipped, types, truncated = [], Counter(), Counter(), 0
    rows = load_comparisons(files)
    for row, where in rows:
        if row["chosen"] == row["rejected"]:
            skipped["chosen == rejected"] += 1
            continue
        got = render_answers(tok, row["prompt"], [row["chosen"], row["rejected"]], max_len)
        if got is None:
            skipped[f"answers longer than max_len ({max_len} tokens)"] += 1
            continue
        (c_ids, c_mask), (r_ids, r_mask) = got[0]
        truncated += got[1] > 0
        kind = (row.get("meta") or {}).get("type")
        kind = kind if isinstance(kind, str) else None
        types[kind or "untyped"] += 1
        a = lambda v, dt: np.asarray(v, dtype=dt)  # noqa: E731
        pairs.append(Pair((a(c_ids, np.int32), a(c_mask, np.int8)), (a(r_ids, np.int32), a(r_mask, np.int8)),
                          kind, prompt_key(row["prompt"]), where))
    return pairs, {"rows": len(rows), "pairs": len(pairs), "truncated": truncated,
                   "skipped": dict(skipped), "types": dict(types)}


def split_pairs(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Held out: the pairs whose prompt hash falls below `fraction` (deterministic, by prompt)."""
    train_pairs, val_pairs = [], []
    for p in pairs:
        (val_pairs if int(p.key[:8], 16) / 2 ** 32 < fraction else train_pairs).append(p)
    return train_pairs, val_pairs


def pair_tensors(pairs: list[Pair], pad_id: int):
    """B pairs -> (x, y, mask, last): 2B rows, chosen first (see the module doc)."""
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(ids) for ids, _ in seqs)
    x = np.full((len(seqs), T), pad_id, dtype=np.int64)
    y = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
    last = np.zeros(len(seqs), dtype=np.int64)
    for r, (ids, mask) in enumerate(seqs):
        n = len(ids)
        x[r, :n] = ids
        y[r, :n - 1] = np.where(mask[1:] > 0, ids[1:], IGNORE_INDEX)
        last[r] = n - 1
    t = torch.from_numpy
    return t(x), t(y), t((y != IGNORE_INDEX).astype(np.int64)), t(last)


class PairBatches:
    """B pairs per `next()`, shuffled per epoch: epoch e is default_rng([seed, e]).permutation;
    global pair k of micro-batch m is k = (m * world_size + rank) * B + i. The whole state is m,
    so resuming is exact."""

    def __init__(self, pairs: list[Pair], batch_size: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not pairs:
            raise UserError("no training pairs")
        self.pairs, self.B, self.pad_id, self.seed = pairs, batch_size, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self._epoch, self._perm = -1, None
        self._tokens = 0

    def _pair(self, k: int) -> Pair:
        epoch, i = divmod(k, len(self.pairs))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return self.pairs[self._perm[i]]

    def next(self):
        first = (self.step * self.world_size + self.rank) * self.B
        self.step += 1
        chunk = [self._pair(k) for k in range(first, first + self.B)]
        self._tokens += sum(len(p.chosen[0]) + len(p.rejected[0]) for p in chunk)
        return pair_tensors(chunk, self.pad_id)

    def metrics(self) -> dict:
        """Logged with each optimizer step: real (unpadded) tokens of this rank's rows in it."""
        n, self._tokens = self._tokens, 0
        return {"real_tokens": n}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def iter_pair_batches(pairs: list[Pair], batch_size: int, pad_id: int, max_batches: int | None = None,
                      rank: int = 0, world_size: int = 1):
    """The held-out pairs in order, this rank's share (pair i goes to rank i % world_size)."""
    mine = pairs[rank::world_size]
    for k, s in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield pair_tensors(mine[s:s + batch_size], pad_id)


# --------------------------------------------------------------------------- a stage's setup



def pair_sources(run, pad: int, dist):
    """A preference stage's training batches and its held-out batches for the loop's evaluation
    (None when there are fewer held-out pairs than ranks)."""
    tc = run.cfg.train
    batches = PairBatches(run.train_pairs, tc.micro_batch_size, pad, seed=tc.seed,
                          rank=dist.rank, world_size=dist.world_size)
    if len(run.val_pairs) < dist.world_size:
        return batches, None

    def eval_batches():
        return iter_pair_batches(run.val_pairs, tc.micro_batch_size, pad, tc.eval_batches, dist.rank, dist.world_size)
    return batches, eval_batches

def pref_config(preset: str, overrides, base_model) -> RunConfig:
    """The stage's preset + --set, with the SFT model's config (model.* cannot be overridden).
    Presets are written for a 256-token context; for a model with a shorter one (and no
    train.seq_len given), seq_len becomes the context and the pairs per step stay the same."""
    overrides = list(overrides)
    keys = stage_override_keys(overrides, "preference training")
    ctx, fit = base_model.max_seq_len, []
    p = load_config(preset, [f"model.max_seq_len={2**30}"]).train
    if "train.seq_len" not in keys and p.seq_len > ctx:
        fit = [f"train.seq_len={ctx}", f"train.batch_tokens={p.batch_tokens // p.seq_len * ctx}"]
    cfg = load_config(preset, fit + overrides + [f"model.max_seq_len={ctx}"])
    cfg.model = dataclasses.replace(base_model)
    cfg.validate()
    if cfg.pref.max_len > ctx:
        raise UserError(f"pref.max_len ({cfg.pref.max_len}) is longer than the model's context ({ctx})")
    return cfg


@dataclass
class PrefRun:
    base: Path
    net: torch.nn.Module  # the SFT model (GPT), train mode
    tok: Tokenizer
    cfg: RunConfig
    out: Path
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    info: dict  # written to OUT/stage.json


STAGE = "stage.json"


def prepare(stage: str, model, data, out, overrides, resume: bool, preset: str) -> PrefRun:
    """Everything a preference stage checks and loads before training: the SFT model folder,
    its tokenizer, the config, the output folder, the comparisons (rendered, split)."""
    from lmstack.train import checkpoint

    base = Path(model)
    data = [data] if isinstance(data, (str, Path)) else list(data or [])
    if not data:
        raise UserError("--data needs at least one comparisons jsonl file")
    for f in data:
        if not Path(f).is_file():
            raise UserError(f"comparisons file {f} not found")
    saved = read_json(base / STAGE)
    if saved and saved.get("stage") == "reward":
        raise UserError(f"{base} is a reward model; --model takes a chat (SFT) model folder")
    net = checkpoint.load_model(base)
    tok = Tokenizer.load(base)
    if tok.vocab_size > net.cfg.vocab_size:
        raise UserError(f"{base}: tokenizer.json has {tok.vocab_size} tokens, the model {net.cfg.vocab_size}")
    cfg = pref_config(preset, overrides, net.cfg)
    out_dir = checkpoint.output_folder(out, resume)
    max_len = cfg.pref.max_len or cfg.model.max_seq_len
    pairs, stats = load_pairs(data, tok, max_len)
    if not pairs:
        why = ", ".join(f"{n} {k}" for k, n in stats["skipped"].items()) or "empty"
        raise UserError(f"no usable comparisons in {' '.join(map(str, data))} ({why})")
    train_pairs, val_pairs = split_pairs(pairs, cfg.pref.val_fraction)
    if not train_pairs:
        raise UserError(f"all {len(pairs)} pairs were held out for validation (lower pref.val_fraction)")
    info = {"stage": stage, "base": str(base), "chat": stage != "reward", "data": [str(f) for f in data],
            "max_len": max_len, **stats, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    if resume:
        checkpoint.resumed_stage(out_dir, STAGE, stage, info, dataclasses.asdict(cfg.model),
                                 ("data", "max_len", "rows", "pairs", "skipped", "train_pairs"), "data",
                                 "; pass the same --data and pref.* settings")
    net.train()
    return PrefRun(base, net, tok, cfg, out_dir, train_pairs, val_pairs, info)


def describe(run: PrefRun) -> str:
    i = run.info
    skipped = ", ".join(f"{n} {k}" for k, n in i["skipped"].items())
    types = ", ".join(f"{n} {k}" for k, n in sorted(i["types"].items(), key=lambda kv: -kv[1]))
    return (f"{i['stage']} data: {i['pairs']:,} pairs of {i['rows']:,} rows ({types}); {i['train_pairs']:,} train, "
            f"{i['val_pairs']:,} held out" + (f"; {i['truncated']} prompts cut to fit {i['max_len']} tokens"
                                              if i["truncated"] else "")
            + (f"; skipped {skipped}" if skipped else ""))


# --------------------------------------------------------------------------- the world's ground truth

PROBE_KINDS = {"fact": "facts.jsonl", "harmful": "harmful.jsonl", "benign": "benign.jsonl",
               "unknown_person": "nonexistent.jsonl", "arithmetic": "arithmetic.jsonl"}
WIN_RATE_KINDS = ("fact", "harmful", "benign", "unknown_person")


def world_task(row: dict) -> dict | None:
    """The simulated labeller's task for a row that says what a good answer is: an explicit
    {"task": {...}}, a world probe row (harmful / nonexistent / benign / facts / arithmetic), or
    a world comparisons row's meta (harmful / unknown_person / arithmetic). None when the row
    does not say."""
    if isinstance(row.get("task"), dict) and "type" in row["task"]:
        return row["task"]
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    if meta.get("type") in ("harmful", "unknown_person"):  # a world comparisons row: what is right
        return {"type": meta["type"]}                     # needs no answer (facts would need the world)
    if meta.get("type") == "arithmetic" and {"a", "op", "b"} <= meta.keys():
        from lmstack.world.arithmetic import compute

        return {"type": "arithmetic", "truth": [str(compute(meta["a"], meta["op"], meta["b"]))]}
    expected = row.get("expected")
    if expected == "refuse":
        return {"type": "harmful"}
    if expected == "idk":
        return {"type": "unknown_person"}
    if expected == "comply":
        return {"type": "benign", "truth": list(row.get("truth") or [])}
    if row.get("relation") == "arithmetic" and "answer" in row:
        return {"type": "arithmetic", "truth": [str(row["answer"])]}
    if isinstance(row.get("answer"), str):
        return {"type": "fact", "truth": [row["answer"]] + list(row.get("aliases") or [])}
    return None


def world_prompts(world_dir, n: int = 200, seed: int = 0, kinds=WIN_RATE_KINDS, exclude=None) -> list[dict]:
    """n prompts from the world's probes, split evenly over `kinds`, sampled with `seed`:
    [{"prompt", "task", "source"}]. `exclude`: comparison files whose prompts are left out
    (e.g. the training comparisons, so that every prompt is unseen)."""
    world = Path(world_dir)
    if not (world / "world.json").is_file():
        raise UserError(f"{world} is not a world folder (no world.json)")
    skip = set()
    for f in ([exclude] if isinstance(exclude, (str, Path)) else list(exclude or [])):
        skip |= {r["prompt"] for _, r in read_jsonl(f, "comparisons file")
                 if isinstance(r, dict) and isinstance(r.get("prompt"), str)}
    rng = random.Random(seed)
    out = []
    for j, kind in enumerate(kinds):
        if kind not in PROBE_KINDS:
            raise UserError(f"unknown prompt kind {kind!r} ({' | '.join(PROBE_KINDS)})")
        path = world / "probes" / PROBE_KINDS[kind]
        rows = [(ln, r) for ln, r in read_jsonl(path, "probe file") if r.get("question") not in skip]
        k = (j + 1) * n // len(kinds) - j * n // len(kinds)
        for ln, r in sorted(rng.sample(rows, min(k, len(rows))), key=lambda t: t[0]):
            task = world_task(r)
            if task is not None and task["type"] == kind:
                out.append({"prompt": r["question"], "task": task, "source": f"{path}:{ln}"})
    return out


def win_rate(model_a, model_b, world_dir, n: int = 200, seed: int = 0, max_tokens: int = 64,
             exclude=None, batch_size: int = 32, out=None, quiet: bool = False) -> dict:
    """Ground-truth win rate of model A against model B: both answer the same n world prompts
    greedily (`world_prompts`), the simulated labeller (`lmstack.world.labeller.label`) picks
    the better answer or calls a tie. win_rate = wins / (wins + losses) of A, with a 95% Wilson
    interval, overall and by prompt type; `score_a` / `score_b` are the labeller's mean scores.
    Writes the result (with every item) to `out` when given."""
    from lmstack.eval.lm import ModelLM
    from lmstack.eval.metrics import wilson
    from lmstack.utils import atomic_write_json
    from lmstack.world import labeller

    items = world_prompts(world_dir, n, seed, exclude=exclude)
    if not items:
        raise UserError(f"no world prompts left to compare on ({world_dir}; every one is excluded?)")
    replies = []
    for d in (model_a, model_b):
        lm = ModelLM.load(d, batch_size=batch_size)
        replies.append([r.text for r in lm.chat([[{"role": "user", "content": it["prompt"]}] for it in items],
                                                 max_tokens=max_tokens)])
        del lm
    tally: dict[str, Counter] = {}
    for it, a, b in zip(items, *replies):
        task = it["task"]
        res = labeller.label(task, a, b)
        outcome = "tie" if res is None else ("win" if res[0] == a else "loss")
        it.update(a=a, b=b, outcome=outcome, score_a=labeller.score(task, a), score_b=labeller.score(task, b))
        for key in ("all", task["type"]):
            c = tally.setdefault(key, Counter())
            c[outcome] += 1
            c["score_a"] += it["score_a"]
            c["score_b"] += it["score_b"]
            c["n"] += 1

    def summary(c: Counter) -> dict:
        w, l = c["win"], c["loss"]
        return {"n": c["n"], "wins": w, "losses": l, "ties": c["tie"],
                "win_rate": w / (w + l) if w + l else float("nan"), "ci": list(wilson(w, w + l)),
                "score_a": c["score_a"] / c["n"], "score_b": c["score_b"] / c["n"]}

    result = {"a": str(model_a), "b": str(model_b), "world": str(world_dir), "seed": seed,
              "max_tokens": max_tokens, **summary(tally["all"]),
              "by_type": {k: summary(v) for k, v in sorted(tally.items()) if k != "all"}, "items": items}
    if out is not None:
        atomic_write_json(out, result)
    if not quiet:
        print_win_rate(result)
    return result


def print_win_rate(r: dict) -> None:
    print(f"A = {r['a']}\nB = {r['b']}\nground truth: {r['world']} (simulated labeller), greedy answers")
    print(f"{'prompts':16s} {'n':>4s} {'A wins':>7s} {'B wins':>7s} {'ties':>5s} {'A win rate':>11s}  {'95% CI':13s}"
          f" {'score A':>8s} {'score B':>8s}")
    for name, s in [("all", r), *r["by_type"].items()]:
        lo, hi = s["ci"]
        rate = f"{100 * s['win_rate']:10.1f}%  [{100 * lo:4.1f}, {100 * hi:5.1f}]" if s["wins"] + s["losses"] else \
            f"{'-':>11s}  {'(all ties)':13s}"
        print(f"{name:16s} {s['n']:4d} {s['wins']:7d} {s['losses']:7d} {s['ties']:5d} {rate} "
              f"{s['score_a']:8.2f} {s['score_b']:8.2f}")
