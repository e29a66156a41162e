"""Supervised fine-tuning = pretraining's loop and loss, with a mask and packed conversations.

    lmstack sft --model runs/base --data runs/world/sft.jsonl --out runs/chat
    lmstack sft --model runs/base --data a.jsonl b.jsonl --out runs/chat --mix-data runs/data --mix-fraction 0.1
    lmstack chat --model runs/chat

Rows (jsonl, the column names the ecosystem uses):
  {"messages": [{role, content, tool_calls?}, ...]}   rendered by the model's chat format
  {"prompt": "...", "completion": "..."}             a user message and the assistant's reply
                                                     (either may also be a list of messages)
  {"text": "..."}                                    a plain document, trained on every token
Each row becomes (ids, mask); mask is 1 on the tokens the model must learn to write
(assistant content, tool calls, the closing <|end|>). Rows are packed greedily into
seq_len+1-token windows; a document id per token keeps packed rows from attending to each
other (model.doc_causal_mask), and the loss counts masked-in targets only.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lmstack import distributed
from lmstack.chatformat import ChatFormat, ChatFormatError, chat_format, split_row
from lmstack.config import ModelConfig, RunConfig, stage_config
from lmstack.data import TokenBatches, load_manifest
from lmstack.model import doc_causal_mask
from lmstack.modelio import SFT, load_model_and_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.train.loop import seed_everything, train
from lmstack.train.objectives import token_losses
from lmstack.utils import UserError, atomic_write_json, describe_counts, read_jsonl

PRESET = "sft"
VAL_FRACTION = 0.02  # every 50th usable row is held out: val_loss on assistant tokens
INFO = SFT  # sft.json in the model folder: base, data files, row counts (checked on --resume)


# --------------------------------------------------------------------------- rows -> docs

def _reason(err: ChatFormatError) -> str:
    """'message 3 (user): empty content' -> 'empty content', so reasons count together."""
    text = re.sub(r"^message \d+(?: \(\w+\))?: ", "", str(err))
    return "missing or unknown role" if text.startswith("role must be") else text


def row_kind(row) -> str | None:
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt/completion"
    return "text" if "text" in row else None


def render_row(tok: Tokenizer, row, fmt: ChatFormat | None = None) -> tuple[list[int], list[int]]:
    """One jsonl row -> (ids, mask); ChatFormatError says why a row is unusable. `fmt`: the
    model's chat format (default chat_format(tok); `load_docs` passes one for all its rows)."""
    kind = row_kind(row)
    if kind is None:
        raise ChatFormatError("row is not a JSON object" if not isinstance(row, dict)
                              else "no messages, prompt/completion or text field")
    if kind == "text":
        text = row["text"]
        if not isinstance(text, str) or not text.strip():
            raise ChatFormatError("empty content")
        ids = tok.document(tok.encode(text))  # as pretraining packs it: BOS first, or EOS last; every token a target
        return ids, [0] * len(tok.bos) + [1] * (len(ids) - len(tok.bos))
    prompt, answer = split_row(row)
    ids, mask = (fmt or chat_format(tok)).render(prompt + answer)
    if not any(mask):
        raise ChatFormatError("no assistant message (nothing to train on)")
    return ids, mask


def load_docs(files, tok: Tokenizer, max_len: int) -> tuple[list, dict]:
    """Read and render every row of `files`; returns (docs, stats).

    docs: (ids, mask) int32 arrays, in file order. stats: counts by row kind and skipped
    rows by reason. Rows longer than `max_len` tokens cannot be trained without cutting a
    conversation, so they are skipped too. A missing file is a UserError.
    """
    files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    for f in files:
        if not f.is_file():
            hint = " (a folder: name the .jsonl files)" if f.is_dir() else ""
            raise UserError(f"SFT data file {f} not found{hint}")
    docs, kinds, skipped, fmt = [], Counter(), Counter(), chat_format(tok)
    for f in files:
        for _, row in read_jsonl(f, "SFT data file", skipped):
            try:
                ids, mask = render_row(tok, row, fmt)
            except ChatFormatError as e:
                skipped[_reason(e)] += 1
                continue
            if len(ids) > max_len:
                skipped[f"longer than the context ({max_len} tokens)"] += 1
                continue
            kinds[row_kind(row)] += 1
            docs.append((np.array(ids, dtype=np.int32), np.array(mask, dtype=np.int8)))
    return docs, {"rows": dict(kinds), "skipped": dict(skipped)}


def split_val(docs: list, fraction: float = VAL_FRACTION) -> tuple[list, list]:
    """Row i is held out when floor((i+1)f) > floor(if): exactly a fraction f, evenly spread."""
    train_docs, val_docs = [], []
    for i, d in enumerate(docs):
        (val_docs if int((i + 1) * fraction) > int(i * fraction) else train_docs).append(d)
    return train_docs, val_docs


# --------------------------------------------------------------------------- packing

def pack(lengths, order, capacity: int) -> list[list[int]]:
    """Greedy packing: docs in `order` fill a window until the next one does not fit."""
    windows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > capacity:
            windows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += lengths[i]
    if current:
        windows.append(current)
    return windows


def window_tensors(docs: list, windows: list[list[int]], seq_len: int, pad_id: int):
    """Windows of doc indices -> (x, y, mask, doc_ids), each [len(windows), seq_len].

    The tail after the last doc is padding: pad id, masked out, and its own document id
    (so it attends only to itself and nothing real attends to it)."""
    n = len(windows)
    ids = np.full((n, seq_len + 1), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len + 1), dtype=np.int64)
    doc = np.zeros((n, seq_len + 1), dtype=np.int64)
    for r, window in enumerate(windows):
        pos = 0
        for k, i in enumerate(window):
            d_ids, d_mask = docs[i]
            ids[r, pos:pos + len(d_ids)] = d_ids
            mask[r, pos:pos + len(d_ids)] = d_mask
            doc[r, pos:pos + len(d_ids)] = k
            pos += len(d_ids)
        doc[r, pos:] = len(window)
    t = torch.from_numpy
    # mask[t] says whether token t is a target, so the loss mask is aligned with y = ids[1:].
    return t(ids[:, :-1]).contiguous(), t(ids[:, 1:]).contiguous(), t(mask[:, 1:]).contiguous(), \
        t(doc[:, :-1]).contiguous()


class PackedBatches:
    """Packed SFT windows (x, y, mask, doc_ids), optionally mixed with pretraining windows.

    Epoch e shuffles the docs with default_rng([seed, e]) and packs them; the stream of
    windows runs through epoch 0, 1, 2, ... Global row k of micro-batch m is
    k = m * world_size * B + rank * B + i; with a mix fraction f, row k is a pretraining
    window when floor((k+1)f) > floor(kf) (exactly f, evenly spread), and the j-th such row is
    TokenBatches step j (batch size 1). So the whole state is m, and resuming is exact.
    """

    def __init__(self, docs: list, batch_size: int, seq_len: int, pad_id: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mix_data=None, mix_fraction: float = 0.0):
        assert docs and 0 <= rank < world_size
        self.docs, self.B, self.T, self.pad_id, self.seed = docs, batch_size, seq_len, pad_id, seed
        self.rank, self.world_size = rank, world_size
        self.lengths = np.array([len(d[0]) for d in docs])
        self.mix_fraction = mix_fraction if mix_data is not None else 0.0
        self.mix = (TokenBatches(mix_data, batch_size=1, seq_len=seq_len, seed=seed)
                    if self.mix_fraction > 0 else None)
        self.step = 0
        self._epoch, self._epoch_start, self._windows = 0, 0, self._pack(0)

    def _pack(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
        return pack(self.lengths, order, self.T + 1)

    def _window(self, i: int) -> list[int]:
        """The i-th SFT window of the stream (epochs are re-packed on demand)."""
        if i < self._epoch_start:  # only after load_state_dict: start over from epoch 0
            self._epoch, self._epoch_start, self._windows = 0, 0, self._pack(0)
        while i >= self._epoch_start + len(self._windows):
            self._epoch_start += len(self._windows)
            self._epoch += 1
            self._windows = self._pack(self._epoch)
        return self._windows[i - self._epoch_start]

    def next(self):
        f, first = self.mix_fraction, (self.step * self.world_size + self.rank) * self.B
        self.step += 1
        rows = []  # ("sft", i-th SFT window) or ("mix", j-th pretraining window)
        for k in range(first, first + self.B):
            before = int(k * f)  # pretraining rows before global row k
            rows.append(("mix", before) if int((k + 1) * f) > before else ("sft", k - before))
        sft = [self._window(i) for kind, i in rows if kind == "sft"]
        x, y, mask, doc = window_tensors(self.docs, sft, self.T, self.pad_id)
        if len(sft) == self.B:
            return x, y, mask, doc
        parts, r = [], 0
        for kind, i in rows:
            if kind == "sft":
                parts.append((x[r], y[r], mask[r], doc[r]))
                r += 1
            else:  # a pretraining window: every token a target, one "document" (as in pretraining)
                self.mix.step = i
                mx, my = self.mix.next()
                parts.append((mx[0], my[0], torch.ones_like(my[0]), torch.zeros_like(my[0])))
        return tuple(torch.stack(t) for t in zip(*parts))

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def iter_val_batches(docs: list, batch_size: int, seq_len: int, pad_id: int, max_batches: int,
                     rank: int = 0, world_size: int = 1):
    """The held-out docs packed in order; global batch k = the next world_size*B windows,
    rank r takes its share (the tail is cut so every rank runs as many batches)."""
    windows = pack([len(d[0]) for d in docs], range(len(docs)), seq_len + 1)
    n = len(windows) // world_size * world_size
    per_batch = world_size * batch_size
    for k, first in enumerate(range(0, n, per_batch)):
        if k >= max_batches:
            return
        rows = (min(first + per_batch, n) - first) // world_size
        start = first + rank * rows
        yield window_tensors(docs, windows[start:start + rows], seq_len, pad_id)


def packed_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token loss over packed rows: each token attends to its own document only."""
    x, y, mask, doc = batch
    loss, counted = token_losses(model(x, attn_mask=doc_causal_mask(doc)), y, mask)
    return loss.sum(), counted.sum()


# --------------------------------------------------------------------------- config + entry point

def sft_config(preset: str, overrides, model: ModelConfig) -> RunConfig:
    """SFT's config (`stage_config`: preset + --set, the model's own config)."""
    return stage_config(preset, overrides, model, "SFT")


def sft(model: str, data, out: str, overrides=(), resume: bool = False, mix_data: str | None = None,
        mix_fraction: float = 0.0, preset: str = PRESET) -> dict:
    """Fine-tune the model folder `model` on jsonl `data` files into `out`; returns the last
    metrics record. The result is a model folder like pretraining's (sample/chat/eval take it)."""
    base = Path(model)
    data = [data] if isinstance(data, (str, Path)) else list(data)
    if not data:
        raise UserError("--data needs at least one jsonl file")
    net, tok = load_model_and_tokenizer(base)  # UserError when `model` is not a model folder
    cfg = sft_config(preset, overrides, net.cfg)
    if not 0 <= mix_fraction < 1:
        raise UserError(f"--mix-fraction must be in [0, 1), got {mix_fraction}")
    if mix_fraction > 0 and not mix_data:
        raise UserError("--mix-fraction needs --mix-data (a folder written by `lmstack data prepare`)")
    if mix_data:
        load_manifest(mix_data)  # UserError when missing
        if Tokenizer.load(mix_data).to_str() != tok.to_str():
            raise UserError(f"--mix-data {mix_data} was tokenized with another tokenizer than {base}")
        cfg.data.dir = str(mix_data)
    out_dir, resume = checkpoint.output_folder(out, resume)

    tc = cfg.train
    docs, stats = load_docs(data, tok, tc.seq_len + 1)
    if not docs:
        raise UserError(f"no usable rows in {' '.join(map(str, data))}"
                        + (f" (skipped {describe_counts(stats['skipped'])})" if stats["skipped"]
                           else " (empty)"))
    train_docs, val_docs = split_val(docs)
    info = {"base": str(base), "data": [str(f) for f in data], "mix_data": mix_data and str(mix_data),
            "mix_fraction": mix_fraction, **stats, "train_rows": len(train_docs), "val_rows": len(val_docs)}
    if resume:
        checkpoint.check_resume(out_dir, "SFT", dataclasses.asdict(cfg.model), INFO, info,
                                ("data", "rows", "skipped", "mix_data", "mix_fraction"),
                                hint="; pass the same --data and --mix-data/--mix-fraction")

    dist = distributed.init(tc.device)
    try:
        main = distributed.is_main()
        if main:
            n_tok = sum(len(d[0]) for d in docs)
            n_train = sum(int(d[1].sum()) for d in docs)
            print(f"sft data: {len(docs):,} rows used ({describe_counts(stats['rows'])}; "
                  f"{len(val_docs)} held out for validation), {n_tok:,} tokens, {n_train / n_tok:.0%} trained on"
                  + (f"; skipped {describe_counts(stats['skipped'])}" if stats["skipped"] else ""), flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out_dir / INFO, info)
        seed_everything(tc.seed)
        net.train()
        batches = PackedBatches(train_docs, tc.micro_batch_size, tc.seq_len, tok.pad_id, seed=tc.seed,
                                rank=dist.rank, world_size=dist.world_size, mix_data=mix_data,
                                mix_fraction=mix_fraction)
        eval_batches = None
        val_windows = len(pack([len(d[0]) for d in val_docs], range(len(val_docs)), tc.seq_len + 1))
        if val_windows >= dist.world_size:  # every rank evaluates at least one window
            def eval_batches():
                return iter_val_batches(val_docs, tc.micro_batch_size, tc.seq_len, tok.pad_id,
                                        tc.eval_batches, dist.rank, dist.world_size)
        return train(cfg, net, batches, packed_loss, out_dir, eval_batches=eval_batches,
                     token_bytes=tok.token_bytes(), tokenizer_file=base / "tokenizer.json", resume=resume)
    finally:
        distributed.cleanup()
