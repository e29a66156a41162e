"""Preference data, shared by `lmstack reward train` and `lmstack dpo`: comparisons (jsonl rows
{"prompt", "chosen", "rejected", "reason"?, "meta"?}, from the world's simulated labeller, the
web app or an AI judge; an answer is its text, or an assistant message object such as a reply
that only calls a tool), rendered with the model's chat format, held out by prompt, served as
pair batches; and `prepare`, what every preference stage checks and loads before it trains.

A pair longer than `max_len` loses prompt tokens from the left (the same for both answers:
they must be judged on the same context); one whose answers alone do not fit is skipped and
counted. Pairs are held out by a hash of their prompt, so held-out accuracy is on prompts the
model never trained on (README: Alignment, how the stages are built).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmstack.chatformat import ChatFormat, chat_format, prompt_messages, prompt_problem, reply_problem
from lmstack.config import ModelConfig, RunConfig, stage_config
from lmstack.data import IGNORE_INDEX
from lmstack.modelio import STAGE, load_model_and_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.utils import UserError, describe_counts, read_jsonl

# --------------------------------------------------------------------------- rows


def _check_row(row) -> str | None:
    """Why a comparison row is malformed (None when it is fine)."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        return (f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                "(rows are {prompt, chosen, rejected})")
    for k in ("chosen", "rejected"):
        why = reply_problem(row[k])
        if why:
            return f"{k} {why}"
    why = prompt_problem(row["prompt"])
    if why:
        return why
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return "meta must be an object"
    return None


def _files(data) -> list:
    """--data (one path or several) -> a list of paths."""
    return [data] if isinstance(data, (str, Path)) else list(data or [])


def load_comparisons(files) -> list[tuple[dict, str]]:
    """Every row of the comparison files, validated: [(row, "file:line")]. A missing file (read_jsonl
    says so) or a malformed row is a UserError naming its file (and line)."""
    files = _files(files)
    if not files:
        raise UserError("--data needs at least one comparisons jsonl file")
    rows = []
    for f in files:
        for n, row in read_jsonl(f, "comparisons file"):
            why = _check_row(row)
            if why:
                raise UserError(f"{f}:{n}: {why}")
            rows.append((row, f"{f}:{n}"))
    return rows


# --------------------------------------------------------------------------- rendering


def render_answers(tok: Tokenizer, prompt, answers: list, max_len: int, fmt: ChatFormat | None = None):
    """The prompt + each answer through the chat template -> [(ids, mask)] (mask 1 on the
    final answer and its end of turn), all with the same prompt, cut from the left (after the
    first token, BOS in lmstack's format) so the longest fits `max_len` tokens. Returns (seqs,
    prompt tokens dropped), or None when the answers alone do not fit. `fmt`: the model's chat
    format (default chat_format(tok); a caller rendering many rows passes one)."""
    fmt = fmt or chat_format(tok)
    seqs = fmt.render_replies(prompt_messages(prompt), answers)  # only the answer is trained on
    drop = max(len(ids) for ids, _ in seqs) - max_len
    if drop <= 0:
        return seqs, 0
    # keep the first token, one of the prompt's and the reply's opening (<|assistant|>); never cut an answer
    if drop > min(mask.index(1) for _, mask in seqs) - 3:
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
    """Comparison files -> rendered pairs and stats (see `render_pairs`)."""
    return render_pairs(load_comparisons(files), tok, max_len)


def render_pairs(rows: list[tuple[dict, str]], tok: Tokenizer, max_len: int) -> tuple[list[Pair], dict]:
    """`load_comparisons`' rows -> rendered pairs and stats {rows, pairs, truncated, skipped:
    {why: n}, types: {type: n}}."""
    pairs, skipped, types, truncated = [], Counter(), Counter(), 0
    fmt = chat_format(tok)
    for row, where in rows:
        if row["chosen"] == row["rejected"]:
            skipped["chosen == rejected"] += 1
            continue
        got = render_answers(tok, row["prompt"], [row["chosen"], row["rejected"]], max_len, fmt)
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


def select_negatives(rows: list[tuple[dict, str]], negatives: str) -> tuple[list[tuple[dict, str]], dict]:
    """pref.negatives: "all" keeps every row; "own" only those whose meta.negative is "own" (or
    absent: a judge's or the web app's pair is two answers to its own prompt), dropping the
    world's rows whose worse answer is another kind's stock answer or another prompt's good one.
    Returns (kept rows, {why: n} dropped)."""
    if negatives == "all":
        return rows, {}
    kept, dropped = [], Counter()
    for row, where in rows:
        negative = (row.get("meta") or {}).get("negative", "own")
        if negative == "own":
            kept.append((row, where))
        else:
            dropped[f"meta.negative={negative}"] += 1
    return kept, dict(dropped)


def split_pairs(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Held out: the pairs whose prompt hash falls below `fraction` (deterministic, by prompt)."""
    train_pairs, val_pairs = [], []
    for p in pairs:
        (val_pairs if int(p.key[:8], 16) / 2 ** 32 < fraction else train_pairs).append(p)
    return train_pairs, val_pairs


def pair_tensors(pairs: list[Pair], pad_id: int):
    """B pairs -> (x, y, mask, last): 2B rows, the B chosen answers first, then the B rejected,
    right-padded to the longest row:
        x     [2B, T] token ids (every token of the sequence, final <|end|> included; pad after)
        y     [2B, T] next-token targets: y[t] = x[t+1] on answer tokens, -100 elsewhere
        mask  [2B, T] 1 where y is an answer token
        last  [2B]    index of the sequence's final token (the answer's <|end|>) in x
    DPO sums log p(y) over `mask`; the reward model reads the hidden state at `last`."""
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
    resume: bool  # a checkpoint in OUT to resume from


def pref_config(preset: str, overrides, model: ModelConfig) -> RunConfig:
    """A preference stage's config (`stage_config`: preset + --set, the model's own config)."""
    return stage_config(preset, overrides, model, "preference training")


def prepare(stage: str, model, data, out, overrides, resume: bool, preset: str) -> PrefRun:
    """Everything a preference stage checks and loads before training: the comparisons (read
    and validated first: a bad file fails before the model loads), the SFT model folder, its
    tokenizer, the config, the output folder, the pairs (rendered, split)."""
    base = Path(model)
    data = _files(data)
    rows = load_comparisons(data)
    net, tok = load_model_and_tokenizer(base, kind="chat")
    cfg = pref_config(preset, overrides, net.cfg)
    out_dir, resume = checkpoint.output_folder(out, resume)
    max_len = cfg.pref.max_len or cfg.model.max_seq_len
    kept, dropped = select_negatives(rows, cfg.pref.negatives)
    pairs, stats = render_pairs(kept, tok, max_len)
    stats.update(rows=len(rows), skipped={**dropped, **stats["skipped"]})
    if not pairs:
        why = describe_counts(stats["skipped"]) or "empty"
        raise UserError(f"no usable comparisons in {' '.join(map(str, data))} ({why})")
    train_pairs, val_pairs = split_pairs(pairs, cfg.pref.val_fraction)
    if not train_pairs:
        raise UserError(f"all {len(pairs)} pairs were held out for validation (lower pref.val_fraction)")
    info = {"stage": stage, "base": str(base), "chat": stage != "reward", "data": [str(f) for f in data],
            "max_len": max_len, **stats, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs)}
    if resume:
        checkpoint.check_resume(out_dir, stage, dataclasses.asdict(cfg.model), STAGE, info,
                                ("data", "max_len", "rows", "pairs", "skipped", "train_pairs"),
                                hint="; pass the same --data and pref.* settings")
    net.train()
    return PrefRun(base, net, tok, cfg, out_dir, train_pairs, val_pairs, info, resume)


def describe(run: PrefRun) -> str:
    i = run.info
    skipped, types = describe_counts(i["skipped"]), describe_counts(i["types"])
    return (f"{i['stage']} data: {i['pairs']:,} pairs of {i['rows']:,} rows ({types}); {i['train_pairs']:,} train, "
            f"{i['val_pairs']:,} held out" + (f"; {i['truncated']} prompts cut to fit {i['max_len']} tokens"
                                              if i["truncated"] else "")
            + (f"; skipped {skipped}" if skipped else ""))
