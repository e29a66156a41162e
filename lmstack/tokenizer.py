"""Byte-level BPE tokenizer (Hugging Face `tokenizers` does the heavy lifting).

Text -> UTF-8 bytes -> regex pre-split (GPT-4 style) -> BPE merges learned from the corpus.
Every one of the 256 byte values is in the base vocabulary, so any string encodes and
decode(encode(s)) == s exactly: no unknown token, no normalisation.

The first 16 ids are special tokens (BOS, EOS, PAD, chat roles, tool calls, spares).
Security: user text can never produce a special id. A string that merely *contains*
"<|user|>" is encoded as ordinary bytes; special ids are only ever inserted by code
(the chat format, lmstack/chatformat.py), by id, never by parsing text.

An imported model (`lmstack import hf|gguf`) keeps its own tokenizer and special tokens: its
folder holds chat_format.json beside tokenizer.json, which names its BOS, EOS and PAD tokens,
whether a prompt starts with BOS, the tokens that end an assistant's reply and its Jinja chat
template (`OwnFormat`). Without that file, a tokenizer is lmstack's and must hold its 16 specials.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmstack.sources import as_list, iter_conversation_texts, iter_documents, skip_summary
from lmstack.utils import UserError, atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: the character that stands for each byte 0..255 in a token."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


SPECIAL_TOKENS = [
    "<|bos|>", "<|eos|>", "<|pad|>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>",
    "<|tool_call|>", "<|/tool_call|>",
] + [f"<|reserved_{i}|>" for i in range(6)]

# GPT-4's split: contractions, words with one leading non-letter, numbers in groups of at
# most 3 digits (so "2024" is not one opaque token), punctuation runs, whitespace runs.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
MAX_DIGITS_PER_TOKEN = 3


def split_pattern(digits_per_token: int = MAX_DIGITS_PER_TOKEN) -> str:
    """SPLIT_PATTERN with numbers in groups of at most `digits_per_token` digits: 3 is GPT-4's
    (and the default), 1 gives every digit its own token, as Llama 2 and Gemma do, so that a model
    can work on numbers digit by digit. The pattern is saved in tokenizer.json."""
    if not 1 <= digits_per_token <= MAX_DIGITS_PER_TOKEN:
        raise UserError(f"--digits-per-token must be 1 to {MAX_DIGITS_PER_TOKEN} (got {digits_per_token})")
    digits = r"\p{N}" if digits_per_token == 1 else rf"\p{{N}}{{1,{digits_per_token}}}"
    return SPLIT_PATTERN.replace(r"\p{N}{1,3}", digits)


def _empty_bpe(digits_per_token: int = MAX_DIGITS_PER_TOKEN) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    # use_regex=False: the Split above already did the splitting; ByteLevel only maps bytes.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern(digits_per_token)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


FORMAT_FILE = "chat_format.json"  # an imported model's own tokens and chat template


@dataclass
class OwnFormat:
    """An imported model's own conversation format and special tokens (chat_format.json): what
    its own tooling (transformers, llama.cpp) does with it, so that lmstack does the same."""
    template: str | None  # its Jinja chat template; None: it has none, lmstack's specials were appended
    bos_token: str | None = None  # the token that starts a sequence (None: it has none)
    eos_token: str | None = None  # the end-of-sequence token (ends plain-text generation)
    pad_token: str | None = None  # padding (None: EOS's id pads; padded positions are masked anyway)
    add_bos: bool = False  # a plain-text prompt or document starts with bos_token
    stop_tokens: list[str] = field(default_factory=list)  # tokens that end an assistant's reply
    source: str | None = None  # where the format came from (a folder, a GGUF file)

    @classmethod
    def read(cls, path: Path) -> "OwnFormat":
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            unknown = set(d) - {f for f in cls.__dataclass_fields__}
            if unknown:
                raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
            own = cls(**{"template": None, **d})
            for name in ("template", "bos_token", "eos_token", "pad_token", "source"):
                if not isinstance(getattr(own, name), (str, type(None))):
                    raise ValueError(f"{name} is not a string")
            if not isinstance(own.stop_tokens, list) or not all(isinstance(t, str) for t in own.stop_tokens):
                raise ValueError("stop_tokens is not a list of token strings")
            return own
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path} is malformed: {e}") from None

    def save(self, folder: str | os.PathLike) -> None:
        atomic_write_json(Path(folder) / FORMAT_FILE, asdict(self))


class Tokenizer:
    """A thin wrapper: the encode/decode surface the rest of lmstack uses."""

    def __init__(self, hf: HFTokenizer, own: OwnFormat | None = None):
        # The one line that keeps "<|user|>" typed by a user from becoming the <|user|> id.
        # (Not stored in tokenizer.json, so it is set on every construction.)
        hf.encode_special_tokens = True
        self._tok = hf
        self.own = own  # an imported model's own format; None: lmstack's
        # lmstack's specials, found by name: ids 0..15 of its own tokenizers, appended after the
        # vocabulary of an import that has no chat template of its own, absent from one that has.
        found = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.special_ids = {t: i for t, i in found.items() if i is not None}
        added = hf.get_added_tokens_decoder()
        # every special added token (lmstack's or the model's own) is control, never text
        self.control_ids = frozenset(set(self.special_ids.values()) | {i for i, t in added.items() if t.special})
        self.specials = {t.content: i for i, t in added.items() if t.special}  # text -> id
        if own is None:
            if len(self.special_ids) < len(SPECIAL_TOKENS):
                raise UserError("tokenizer is not an lmstack tokenizer (special tokens missing); train one "
                                "with `lmstack tokenizer train` or bring a model in with `lmstack import hf`")
            self.bos_id, self.eos_id = self.special_ids["<|bos|>"], self.special_ids["<|eos|>"]
            self.pad_id, self.add_bos = self.special_ids["<|pad|>"], True
        else:
            self.bos_id, self.eos_id = self.token_id(own.bos_token), self.token_id(own.eos_token)
            pad = self.token_id(own.pad_token)
            self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
            self.add_bos = own.add_bos and self.bos_id is not None
            for t in own.stop_tokens:
                self.token_id(t)
        self._token_bytes = None
        self._byte_of = None

    def find(self, text: str) -> int | None:
        """The id of the token whose text is `text` (None when there is none)."""
        return self._tok.token_to_id(text)

    def token_id(self, text: str | None) -> int | None:
        """The id of one whole token given by its text (None for None; UserError when the
        tokenizer has no such token)."""
        i = None if text is None else self._tok.token_to_id(text)
        if text is not None and i is None:
            raise UserError(f"{FORMAT_FILE} names {text!r}, which is not a token of this tokenizer")
        return i

    @property
    def bos(self) -> list[int]:
        """What a plain-text prompt or document starts with: [BOS], or [] for a model that adds none."""
        return [self.bos_id] if self.add_bos else []

    def document(self, ids: list[int]) -> list[int]:
        """A document's ids as packed for pretraining: BOS first (lmstack's, or the model's own when
        it adds one), else EOS last, so that packed documents keep a boundary the model knows."""
        if self.add_bos or self.eos_id is None:
            return self.bos + ids
        return ids + [self.eos_id]

    @property
    def scoring_head(self) -> list[int]:
        """What a text's first token is scored after (loss, bits per byte, log-likelihoods): BOS, or
        EOS (a document boundary) for a model with no BOS, as lm-evaluation-harness does."""
        return [self.bos_id if self.bos_id is not None else self.eos_id]

    @property
    def text_stop_ids(self) -> frozenset[int]:
        """The ids that end plain-text generation: a document boundary (EOS, and BOS where there is one)."""
        return frozenset(i for i in (self.eos_id, self.bos_id) if i is not None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a folder holding tokenizer.json (tokenizer or model folder), or the file; with
        the folder's chat_format.json when it has one (an imported model)."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"tokenizer not found: {file} (expected a folder with tokenizer.json)")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"cannot read tokenizer {file}: {first}") from None
        own = file.parent / FORMAT_FILE
        return cls(hf, OwnFormat.read(own) if own.is_file() else None)

    @classmethod
    def from_str(cls, json_text: str, own: OwnFormat | None = None) -> "Tokenizer":
        return cls(HFTokenizer.from_str(json_text), own)

    def to_str(self) -> str:
        return self._tok.to_str()

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / "tokenizer.json"
        atomic_write_text(path, self._tok.to_str(pretty=True))
        if self.own is not None:
            self.own.save(folder)
        return path

    # -- encode / decode ---------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we never use
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    # -- vocabulary ----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def added_tokens(self) -> list:
        """The added tokens (tokenizers' AddedToken: content, special, ...), in id order."""
        return [t for _, t in sorted(self._tok.get_added_tokens_decoder().items())]

    def id_to_token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def token_to_bytes(self, i: int) -> bytes:
        """The exact bytes id `i` stands for (a special token: its name in UTF-8). A byte-level
        token may hold part of a character, which `decode([i])` would show as U+FFFD."""
        if i in self.control_ids:
            return self._tok.id_to_token(i).encode()
        if self._byte_of is None:
            self._byte_of = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
        return bytes(self._byte_of[ch] for ch in self._tok.id_to_token(i))

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for specials): turns loss per token into bits per byte."""
        if self._token_bytes is None:
            # A byte-level token is a string over a 256-char alphabet, one char per byte.
            self._token_bytes = [0 if i in self.control_ids else len(self._tok.id_to_token(i))
                                 for i in range(self.vocab_size)]
        return self._token_bytes


def train_tokenizer(inputs, vocab_size: int, out, text_field: str = "text", force: bool = False,
                    holdout_every: int = 50, progress: bool = True,
                    digits_per_token: int = MAX_DIGITS_PER_TOKEN, conversations=()) -> Tokenizer:
    """Train a byte-level BPE on files/folders/globs and write OUT/tokenizer.json.

    Documents stream from disk into the trainer (the corpus is never held in memory);
    every `holdout_every`-th document is kept out of training to measure compression.
    Numbers split into groups of at most `digits_per_token` digits (split_pattern).
    `conversations` (.jsonl files of {"messages": [...]}, fine-tuning's data) are documents too:
    their words get merges of their own ("When" one token rather than "W" + "hen").
    """
    inputs, conversations = as_list(inputs), as_list(conversations)
    split_pattern(digits_per_token)  # a bad value fails before anything is read
    check_output_dir(out, force)  # fail before the (possibly long) training, not after
    n_min = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_min:
        raise UserError(f"--vocab-size {vocab_size} is too small: need at least {n_min} "
                        f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    skipped: list[dict] = []
    docs = itertools.chain(iter_documents(inputs, text_field=text_field, skipped=skipped),
                           iter_conversation_texts(conversations, skipped=skipped))
    first = next(docs, None)
    if first is None:
        raise UserError(f"no usable text in {' '.join(map(str, inputs + conversations))}" + skip_summary(skipped))

    held_out, sample, stats = [], [], {"docs": 0, "bytes": 0, "held_bytes": 0}
    max_eval_bytes = 2_000_000  # enough to measure compression; later held-out docs train too

    def training_docs():
        for i, text in enumerate(itertools.chain([first], docs)):
            if i % holdout_every == holdout_every - 1 and stats["held_bytes"] < max_eval_bytes:
                held_out.append(text)
                stats["held_bytes"] += len(text.encode("utf-8"))
                continue
            if stats["bytes"] < max_eval_bytes:  # fallback measure if too few docs to hold out
                sample.append(text)
            stats["docs"] += 1
            stats["bytes"] += len(text.encode("utf-8"))
            yield text

    t0 = time.time()
    hf = _empty_bpe(digits_per_token)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        show_progress=progress and sys.stdout.isatty(),  # else it prints stray blank lines
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
    )
    hf.train_from_iterator(training_docs(), trainer=trainer)
    tok = Tokenizer(hf)

    eval_texts, where = (held_out, "held-out") if held_out else (sample, "training")
    n_tokens = sum(len(ids) for ids in tok.encode_batch(eval_texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in eval_texts)
    with atomic_output_dir(out, force) as tmp:
        tok.save(tmp)
    note = "" if tok.vocab_size == vocab_size else f" (corpus too small for {vocab_size})"
    print(f"tokenizer: vocab {tok.vocab_size}{note}, trained on {stats['docs']} documents "
          f"({stats['bytes'] / 1e6:.2f} MB) in {time.time() - t0:.1f}s; "
          f"{n_bytes / max(n_tokens, 1):.2f} bytes/token on {where} text -> "
          f"{Path(out) / 'tokenizer.json'}" + skip_summary(skipped))
    return tok
