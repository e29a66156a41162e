"""Text in, token shards out, and the batch iterators that training reads them with.

    sources (.txt/.md files, .jsonl, .parquet, a Hugging Face dataset)
      -> sources.iter_documents()  one string per document, bad files skipped with a reason
      -> prepare()                 [bos] + encode(doc), in parallel, into flat shards
      -> TokenBatches / iter_eval_windows   (x, y) windows for the training loop

A prepared data folder holds `train_00000.bin ...`, `val_00000.bin ...` (raw little-endian
uint16, or uint32 for vocabularies above 65536), `manifest.json` and a copy of
`tokenizer.json`. Shards are memory-mapped, so a corpus larger than RAM trains fine.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmstack.sources import as_list, iter_documents, skip_summary
from lmstack.tokenizer import Tokenizer
from lmstack.utils import UserError, atomic_output_dir, atomic_write_json, check_output_dir

SHARD_TOKENS = 2**26  # ~64M tokens: 128 MiB per uint16 shard
IGNORE_INDEX = -100  # a target with this id counts for nothing (prompt tokens in SFT, padding)


# ---------------------------------------------------------------------------- prepare

_worker_tok: Tokenizer | None = None


def _init_worker(tok_json: str, own) -> None:
    global _worker_tok
    # Parallelism comes from the process pool; HF's own threads would oversubscribe cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tok = Tokenizer.from_str(tok_json, own)


def _encode_docs(texts: list[str], dtype: str, tok: Tokenizer | None = None):
    tok = tok or _worker_tok
    return [(np.array(tok.document(ids), dtype=dtype), len(text.encode("utf-8")))
            for text, ids in zip(texts, tok.encode_batch(texts))]


class _ShardWriter:
    """Appends documents to `{split}_00000.bin`, rolling to a new file every ~shard_tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict] = []
        self.docs = self.tokens = self.bytes = 0
        self._f = None

    def write(self, ids: np.ndarray, n_bytes: int) -> None:
        if self._f is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self.shards.append({"file": f"{self.split}_{len(self.shards):05d}.bin", "tokens": 0})
            self._f = open(self.folder / self.shards[-1]["file"], "wb")
        ids.tofile(self._f)
        self.shards[-1]["tokens"] += len(ids)
        self.docs, self.tokens, self.bytes = self.docs + 1, self.tokens + len(ids), self.bytes + n_bytes

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None


def prepare(inputs, tokenizer, out, text_field: str = "text", val_fraction: float = 0.01,
            workers: int = 0, force: bool = False, shard_tokens: int = SHARD_TOKENS,
            docs_per_task: int = 256, progress: bool = True) -> dict:
    """Tokenize documents into train/val shards under `out`; returns the manifest.

    Output is deterministic whatever the worker count: batches of documents are encoded
    in parallel but written in input order. Document i goes to validation when
    floor((i+1)*f) > floor(i*f) (exactly a fraction f, evenly spread through the corpus).
    """
    check_output_dir(out, force)
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    dtype = "<u2" if tok.vocab_size <= 2**16 else "<u4"
    skipped: list[dict] = []
    docs = iter_documents(inputs, text_field=text_field, skipped=skipped)
    workers = workers or os.cpu_count() or 1
    tasks = iter(lambda: list(itertools.islice(docs, docs_per_task)), [])

    def encoded():
        if workers == 1:
            for texts in tasks:
                yield _encode_docs(texts, dtype, tok)
            return
        with mp.Pool(workers, _init_worker, (tok.to_str(), tok.own)) as pool:
            # Pool.imap would read the whole corpus ahead into its queue; a bounded window
            # of in-flight tasks keeps memory flat and the results in order.
            inflight = deque()
            for texts in tasks:
                inflight.append(pool.apply_async(_encode_docs, (texts, dtype)))
                if len(inflight) >= 2 * workers:
                    yield inflight.popleft().get()
            while inflight:
                yield inflight.popleft().get()

    with atomic_output_dir(out, force) as tmp:
        train, val = _ShardWriter(tmp, "train", shard_tokens), _ShardWriter(tmp, "val", shard_tokens)
        held = None  # the latest train doc, held back: it becomes val if no doc was picked
        n = 0
        # delay: no bar for quick runs, nor before an error found in the first second
        with tqdm(unit=" docs", desc="tokenizing", disable=not progress, delay=1) as bar:
            for results in encoded():
                for doc in results:
                    if int((n + 1) * val_fraction) > int(n * val_fraction):
                        val.write(*doc)
                    else:
                        if held is not None:
                            train.write(*held)
                        held = doc
                    n += 1
                bar.update(len(results))
        if held is not None:
            (val if val.docs == 0 and n >= 2 and val_fraction > 0 else train).write(*held)
        train.close()
        val.close()
        if n == 0:
            raise UserError(f"no usable documents in {' '.join(map(str, as_list(inputs)))}"
                            + skip_summary(skipped))
        manifest = {
            "format": 1,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "text_field": text_field,
            "inputs": [str(x) for x in as_list(inputs)],
            "documents": {"train": train.docs, "val": val.docs},
            "tokens": {"train": train.tokens, "val": val.tokens},
            "bytes": {"train": train.bytes, "val": val.bytes},
            "shards": {"train": train.shards, "val": val.shards},
            "skipped": skipped,
        }
        tok.save(tmp)
        atomic_write_json(tmp / "manifest.json", manifest)
    n_tok = train.tokens + val.tokens
    print(f"data: {n} documents ({train.docs} train / {val.docs} val), {n_tok:,} tokens "
          f"({train.tokens:,} / {val.tokens:,}), {(train.bytes + val.bytes) / max(n_tok - n, 1):.2f} "
          f"bytes/token (BOS not counted), "
          f"{len(train.shards) + len(val.shards)} shard(s) -> {out}" + skip_summary(skipped, "manifest.json"))
    return manifest


# ---------------------------------------------------------------------------- reading shards


def load_manifest(data_dir) -> dict:
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data folder {d} not found (make one with `lmstack data prepare`)")
    f = d / "manifest.json"
    if not f.is_file():
        raise UserError(f"{d} has no manifest.json (is it a folder written by `lmstack data prepare`?)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {f}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != 1:
        raise UserError(f"{f}: not an lmstack data manifest (format 1)")
    return m


class TokenSplit:
    """The shards of one split seen as one long token array; slices read only what they need."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(len(self))
        assert step == 1, "TokenSplit supports contiguous slices only"
        parts = []
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            lo = start - self.starts[i]
            hi = min(stop - self.starts[i], len(self.arrays[i]))
            parts.append(self.arrays[i][lo:hi])
            start += hi - lo
            i += 1
        return np.concatenate(parts) if parts else np.empty(0, self.arrays[0].dtype)


def open_split(data_dir, split: str) -> TokenSplit:
    """Memory-map every shard of `split` ("train" or "val")."""
    m = load_manifest(data_dir)
    if split not in m["shards"]:
        raise UserError(f"unknown split {split!r} (have: {', '.join(m['shards'])})")
    if not m["shards"][split]:
        raise UserError(f"{data_dir} has no {split} tokens (prepare it with more documents "
                        "or a --val-fraction above 0)")
    dtype = np.dtype(m["dtype"]).newbyteorder("<")
    arrays = []
    for shard in m["shards"][split]:
        f = Path(data_dir) / shard["file"]
        size = f.stat().st_size if f.is_file() else -1
        if size != shard["tokens"] * dtype.itemsize:
            raise UserError(f"shard {f} is missing or truncated ({size} bytes, "
                            f"manifest says {shard['tokens']} tokens)")
        arrays.append(np.memmap(f, dtype=dtype, mode="r"))
    return TokenSplit(arrays)


def _windows(data: TokenSplit, offsets, seq_len: int):
    buf = torch.from_numpy(np.stack([data[o:o + seq_len + 1] for o in offsets]).astype(np.int64))
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class TokenBatches:
    """Random (x, y) windows for training; the state is just the step counter.

    Step s draws the offsets of the GLOBAL batch (world_size * batch_size windows) from
    default_rng([seed, s]) and rank r takes rows [r*B, (r+1)*B): so 2 ranks of B see exactly
    what 1 rank of 2B sees, and resuming needs nothing but the step.
    """

    def __init__(self, data_dir, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, copy_fraction: float = 0.0,
                 copy_ids: np.ndarray | None = None, copy_text_share: float = 0.0, copy_steps: int = 0,
                 copy_fraction_after: float = 0.0):
        assert 0 <= rank < world_size and batch_size > 0 and seq_len > 0
        assert copy_fraction == 0 or (0 < copy_fraction < 1 and copy_ids is not None and len(copy_ids) > 1)
        self.data = open_split(data_dir, split)
        if len(self.data) < seq_len + 1:
            raise UserError(f"{split} split of {data_dir} has {len(self.data)} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; use more data or a shorter sequence")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.copy_fraction, self.copy_ids, self.copy_text_share = copy_fraction, copy_ids, copy_text_share
        # copy_fraction of the rows in steps < copy_steps (0: in every step), copy_fraction_after from then on
        self.copy_steps, self.copy_fraction_after = copy_steps, copy_fraction_after
        self.step = 0

    def next(self) -> tuple[torch.Tensor, ...]:
        """(x, y), or (x, y, mask) when some rows are the copying task (copy_fraction > 0; after
        copy_steps with no copy_fraction_after, the mask is all True, so every batch has one form)."""
        B, T = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, self.step])
        offsets = rng.integers(0, len(self.data) - T, size=self.world_size * B)  # last start: N-T-1
        self.step += 1
        x, y = _windows(self.data, offsets[self.rank * B:(self.rank + 1) * B], T)
        if not self.copy_fraction:
            return x, y
        mask = torch.ones_like(y, dtype=torch.bool)
        f, share = self.copy_fraction, self.copy_text_share
        if self.copy_steps and self.step > self.copy_steps:
            f = self.copy_fraction_after
            if not f:
                return x, y, mask
        first = (self.step - 1) * self.world_size * B  # rows counted over the steps, so that a fraction
        for i, k in enumerate(range(self.rank * B, (self.rank + 1) * B)):  # below 1/rows is kept too
            g = first + k  # this row's number in the stream of global batches (k: in this one)
            if _evenly(g, f):  # exactly a fraction f of the rows, evenly spread
                rng = np.random.default_rng([self.seed, self.step, k])
                # A share of the copy rows (int(g * f): this one's number among them) repeats the start of its own text window.
                ids = x[i].numpy() if _evenly(int(g * f), share) else None
                x[i], y[i], mask[i] = _copy_row(rng, self.copy_ids, T, text=ids)
        return x, y, mask

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def _evenly(k: int, fraction: float) -> bool:
    """Whether item k is picked when exactly `fraction` of the items are, evenly spread."""
    return int((k + 1) * fraction) > int(k * fraction)


def _copy_row(rng: np.random.Generator, ids: np.ndarray, seq_len: int, text: np.ndarray | None = None):
    """One row of the copying task (what induction heads do; TokenBatches' copy_fraction): a fresh
    random sequence of 8 .. seq_len/2 distinct tokens from `ids`, repeated to fill the row, counted
    in the loss only where looking back predicts it: from the repeat's second token on (the first
    occurrence, fresh in every row, can be neither predicted nor memorised; nor can the token that
    starts a repeat, which follows a token seen nowhere earlier). With `text` (a window of training
    tokens; copy_text_share), the sequence is that window's first tokens instead: the text's own
    tokens, copied. Returns (x, y, mask)."""
    n = int(rng.integers(8, max(9, seq_len // 2 + 1)))
    seq = rng.choice(ids, n, replace=len(ids) < n) if text is None else text[:n]
    row = torch.from_numpy(np.tile(seq, -(-(seq_len + 1) // n))[:seq_len + 1].astype(np.int64))
    mask = torch.arange(seq_len) >= n  # x[j] = row[j] occurred at j - n, followed by y[j] = row[j + 1]
    return row[:-1], row[1:], mask


def iter_eval_windows(data_dir, split: str = "val", batch_size: int = 8, seq_len: int = 256,
                      max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """Yield (x, y) over consecutive non-overlapping windows of a split, in order.

    Window j predicts tokens j*T+1 .. j*T+T, so the windows tile the split. Global batch k
    holds the next world_size*B windows and rank r takes its share of rows; the tail is cut
    to a multiple of world_size so every rank runs the same number of batches (a rank that
    stopped early would hang the others in the all-reduce).
    """
    assert 0 <= rank < world_size and batch_size > 0 and seq_len > 0
    data = open_split(data_dir, split)
    n = (len(data) - 1) // seq_len // world_size * world_size
    if n == 0:
        raise UserError(f"{split} split of {data_dir} has {len(data)} tokens, too few for "
                        f"{world_size} window(s) of seq_len {seq_len}")
    per_batch = world_size * batch_size
    for k, first in enumerate(range(0, n, per_batch)):
        if max_batches is not None and k >= max_batches:
            return
        rows = (min(first + per_batch, n) - first) // world_size
        starts = (first + rank * rows + np.arange(rows)) * seq_len
        yield _windows(data, starts, seq_len)


def target_bytes(batch, token_bytes: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes of the counted target tokens of a (x, y[, mask]) batch, for bits-per-byte.

    token_bytes[i] is the byte length of token i (0 for special tokens), so bpb
    = sum of nats / (ln 2 * bytes) compares models with different tokenizers fairly.
    """
    y = batch[1]
    counted = y != IGNORE_INDEX
    if len(batch) > 2:
        counted &= batch[2] != 0
    return (token_bytes[y.clamp_min(0)] * counted).sum()


# ---------------------------------------------------------------------------- in-context copying

def ordinary_ids(tok: Tokenizer) -> np.ndarray:
    """Every id that is not a control token (what random sequences are drawn from: never a special)."""
    return np.array([i for i in range(tok.vocab_size) if i not in tok.control_ids])


def copy_probe(tok: Tokenizer, ctx: int, sequences: int = 64, length: int = 64, seed: int = 0,
               pool: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """The in-context copying probe (what induction heads do): `sequences` rows, each the scoring
    head (BOS, or EOS), `length` random distinct ordinary tokens (fewer when a row would not fit
    a context of `ctx`), then the same tokens again. Distinct, so that in the second copy every
    token has one continuation to look up. With `pool` (ids and their counts: text_pool), the
    tokens are drawn as often as the text uses them, instead of uniformly from the vocabulary."""
    length = min(length, (ctx - len(tok.scoring_head)) // 2)
    rng = np.random.default_rng(seed)
    ids, p = (ordinary_ids(tok), None) if pool is None else (pool[0], pool[1] / pool[1].sum())
    if pool is not None:
        length = min(length, len(ids))
    rows = []
    for _ in range(sequences):
        seq = rng.choice(ids, length, replace=pool is None and len(ids) < length, p=p).tolist()
        rows.append(tok.scoring_head + seq + seq)
    return torch.tensor(rows, dtype=torch.long)


def text_pool(data_dir, split: str, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray] | None:
    """The ordinary ids of a split's first ICL_SCAN tokens and how often each occurs (copy_probe's
    pool: the text's own tokens); None when the split has none."""
    ids, counts = np.unique(open_split(data_dir, split)[:ICL_SCAN], return_counts=True)
    keep = ~np.isin(ids, list(tok.control_ids))
    return (ids[keep].astype(np.int64), counts[keep]) if keep.any() else None


@torch.no_grad()
def copy_losses(model, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean loss (nats/token) on the first copy and on the second (a copy_probe batch,
    whose rows are one head token and two copies)."""
    x = probe.to(next(model.parameters()).device)
    length = (x.shape[1] - 1) // 2
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).float().transpose(1, 2), x[:, 1:], reduction="none")
    start = x.shape[1] - 2 * length - 1  # the position that predicts the first copy's first token
    return loss[:, start:start + length].mean(1).cpu(), loss[:, start + length:start + 2 * length].mean(1).cpu()


# Olsson et al.'s in-context learning score: the loss late in a context minus the loss early in
# it (they compare the 500th token with the 50th), here as bands of the context: tokens
# [ctx/16, ctx/8) and the last ctx/8. Negative = later tokens are easier: the model uses its context.
ICL_EARLY, ICL_LATE = (1 / 16, 1 / 8), (7 / 8, 1.0)
ICL_SCAN = 4_000_000  # tokens of a split searched for document starts


def icl_probe(data_dir, split: str, tok: Tokenizer, ctx: int, windows: int = 64) -> torch.Tensor | None:
    """Up to `windows` rows of ctx + 1 tokens of a split, each starting where a document starts
    (at its BOS, or after the EOS that ends the one before), spread evenly over the split's first
    ICL_SCAN tokens; None when no document start leaves a whole context after it."""
    data = open_split(data_dir, split)
    head = data[0:min(len(data), ICL_SCAN)]
    starts = (np.flatnonzero(head == tok.bos[0]) if tok.bos else
              np.flatnonzero(head == tok.eos_id) + 1 if tok.eos_id is not None else np.zeros(1, np.int64))
    starts = starts[starts + ctx + 1 <= len(head)]
    if len(starts) == 0:
        return None
    pick = np.unique(starts[np.linspace(0, len(starts) - 1, min(windows, len(starts))).astype(int)])
    return torch.from_numpy(np.stack([head[s:s + ctx + 1] for s in pick]).astype(np.int64))


@torch.no_grad()
def icl_losses(model, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean loss (nats/token) early in its context and late in it (an icl_probe batch)."""
    x = probe.to(next(model.parameters()).device)
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).float().transpose(1, 2), x[:, 1:], reduction="none")
    ctx = loss.shape[1]
    (e0, e1), (l0, l1) = ([int(f * ctx) for f in band] for band in (ICL_EARLY, ICL_LATE))
    return loss[:, e0:max(e1, e0 + 1)].mean(1).cpu(), loss[:, min(l0, l1 - 1):l1].mean(1).cpu()
