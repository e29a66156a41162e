#!/usr/bin/env python3
"""run.py: the code half of a language model that is two files (this one and model.safetensors).

    python run.py model.safetensors "Once upon a time" [-n 100] [--temperature 0.8]
                  [--top-k K] [--top-p P] [--seed S] [--ids]
    python run.py model.safetensors --chat [--system TEXT] [--temperature 0.7] [--top-p 0.95]

Needs Python 3.10+ and numpy, nothing else. Everything the model is lives in model.safetensors:
the weights, and in the file's metadata the model config and the tokenizer (Hugging Face
`tokenizers` JSON). This file reads that format itself, tokenizes (byte-level BPE), runs the
transformer (RMSNorm, rotate-half RoPE, grouped-query attention with a KV cache, SwiGLU) in
float32, and samples. It computes what lmstack's engine computes: the same greedy tokens.

An imported model (`lmstack import hf|gguf`) keeps its own tokenizer (the byte-level splits of
lmstack, GPT-2, Llama 3, Qwen2 and SmolLM are implemented here) and its own chat format (the
metadata's "chat_format": its BOS policy, stop tokens and Jinja chat template). Its --chat renders
that template with the jinja2 package: where jinja2 is not installed, --chat says so and stops
(plain completion needs numpy only). lmstack's own chat format needs no jinja2.

Written by `lmstack export twofile`; it imports nothing from lmstack.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import json
import math
import operator
import os
import re
import sys
import unicodedata

import numpy as np


class Fail(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- safetensors ----------------------------------------------------------------------------------
# The format: 8 bytes (little-endian u64) = N, then N bytes of JSON: {name: {dtype, shape,
# data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw tensor bytes.

def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 2 <= n <= min(size - 8, 100 << 20) else None
    except OSError as e:
        raise Fail(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError:  # not UTF-8, not JSON
        header = None
    if not isinstance(header, dict):
        raise Fail(f"{path} is not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    # A memory map: float32 tensors are used in place, nothing is read until it is needed.
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors = {}
    for name, t in header.items():
        try:
            (begin, end), shape = t["data_offsets"], tuple(t["shape"])
        except (KeyError, TypeError, ValueError):
            raise Fail(f"{path} is not a safetensors file (bad entry {name!r})") from None
        raw = data[begin:end]
        if t["dtype"] == "F32":
            a = raw.view("<f4")
        elif t["dtype"] == "F16":
            a = raw.view("<f2").astype(np.float32)
        elif t["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            a = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise Fail(f"{path}: tensor {name} has dtype {t['dtype']} (F32, F16 or BF16 expected)")
        if a.size != math.prod(shape):
            raise Fail(f"{path} is truncated or corrupt (tensor {name})")
        tensors[name] = a.reshape(shape)
    return tensors, meta


# --- tokenizer: byte-level BPE ---------------------------------------------------------------------
# text -> pieces (regex splits) -> each piece's UTF-8 bytes, as GPT-2's 256 printable stand-in
# characters -> BPE merges, lowest rank first -> ids. Special tokens (<|bos|>, <|user|>, ...) are
# never produced from text: "<|user|>" typed by a user is plain bytes; code inserts the special ids
# by number (lmstack's chat template below), or a model's own template text names them (--chat).

# The split patterns a tokenizer.json may hold (Oniguruma syntax), each made a Python regex below:
# lmstack's (GPT-4's, possessive quantifiers), Llama 3's and Qwen2's (digits one by one).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
SPLITS = (SPLIT_PATTERN, LLAMA3_SPLIT, QWEN2_SPLIT)
# GPT-2's, which Hugging Face's ByteLevel pre-tokenizer applies when its use_regex is on.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Oniguruma's \s is Unicode White_Space; Python's also matches U+001C..U+001F, so spell it out.
WHITE_SPACE = r"\t\n\x0b\x0c\r\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_CLASSES: dict[str, str] = {}


def python_regex(pattern: str) -> re.Pattern:
    """One of the patterns above for Python's `re`, which has no \\p{..} and no possessive
    quantifiers. \\p{L} and \\p{N} become explicit classes of code-point ranges, from unicodedata
    (0.2 s, once); \\s and \\S Oniguruma's white space; the possessive quantifiers (lmstack's) greedy
    ones, which match the same there: what follows each can never match what it would give back,
    so the backtracking they forbid would never succeed."""
    if not _CLASSES:
        cats = "".join(unicodedata.category(chr(c))[0] for c in range(0x110000))  # one letter per code point
        for k in "LN":
            _CLASSES[k] = "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in re.finditer(k + "+", cats))
    out, in_class, i = [], False, 0
    while i < len(pattern):
        c, two = pattern[i], pattern[i:i + 2]
        if pattern.startswith(("\\p{L}", "\\p{N}"), i):
            r = _CLASSES[pattern[i + 3]]
            out.append(r if in_class else f"[{r}]")
            i += 5
            continue
        if two in ("\\s", "\\S"):
            out.append(WHITE_SPACE if in_class else ("[^" if two == "\\S" else "[") + WHITE_SPACE + "]")
            i += 2
            continue
        if c == "\\":
            out.append(two)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        elif c == "+" and not in_class and out and out[-1] in ("?", "+") and not (len(out) > 1 and out[-2] == "("):
            i += 1  # possessive: dropped
            continue
        out.append(c)
        i += 1
    return re.compile("".join(out))


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def pre_tokenizer(spec: dict) -> list[re.Pattern]:
    """A tokenizer.json's pre-tokenizer as the regexes that split text, in turn, each keeping what
    it matches and the gaps between (Hugging Face's "Isolated"); byte-level mapping last."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    stages = []
    for i, st in enumerate(steps or [{}]):
        kind, last = st.get("type"), i == len(steps) - 1
        if kind == "ByteLevel" and last and not st.get("add_prefix_space"):
            stages += [python_regex(GPT2_SPLIT)] if st.get("use_regex", True) else []
        elif (kind == "Split" and (st.get("pattern") or {}).get("Regex") in SPLITS and st.get("behavior") == "Isolated"
              and not st.get("invert") and not last):
            stages.append(python_regex(st["pattern"]["Regex"]))
        elif kind == "Digits" and not last:  # Rust's char::is_numeric: \p{N}
            stages.append(python_regex(r"\p{N}" if st.get("individual_digits") else r"\p{N}+"))
        else:
            raise Fail(f"the embedded tokenizer's pre-tokenizer is not one run.py knows (step {i + 1}: "
                       f"{json.dumps(st)[:200]})")
    return stages


def split_isolated(rx: re.Pattern, text: str) -> list[str]:
    out, pos = [], 0
    for m in rx.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = max(pos, m.end())
    return out + [text[pos:]] * (pos < len(text))


class Tokenizer:
    def __init__(self, tokenizer_json: str, fmt: dict | None = None):
        """tokenizer_json: Hugging Face's tokenizer.json; fmt: an imported model's chat format
        (chat_format.json; None: lmstack's, whose special tokens the tokenizer must hold)."""
        spec = json.loads(tokenizer_json)
        model = spec.get("model") or {}
        odd = [k for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback")
               if model.get(k)]
        if model.get("type") != "BPE" or odd or spec.get("normalizer"):
            raise Fail("the embedded tokenizer is not a plain byte-level BPE (model "
                       f"{model.get('type')}{', ' + ', '.join(odd) if odd else ''}"
                       f"{', a normalizer' if spec.get('normalizer') else ''})")
        self.stages = pre_tokenizer(spec)
        self.ignore_merges = bool(model.get("ignore_merges"))  # a piece that is a token is not merged
        self.vocab: dict[str, int] = dict(model["vocab"])
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        self.ranks = {(a, b): i for i, (a, b) in enumerate(merges)}
        added = spec.get("added_tokens", [])
        if odd := [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")]:
            raise Fail(f"the embedded tokenizer's added token {odd[0]!r} strips spaces (lstrip/rstrip/single_word)")
        self.special = {t["content"]: t["id"] for t in added if t.get("special")}
        self.added = {t["content"]: t["id"] for t in added}  # special or not
        self.fmt = fmt
        if fmt is None:
            if missing := [t for t in TURN_ENDS + ("<|tool_call|>", "<|/tool_call|>") if t not in self.special]:
                raise Fail(f"the embedded tokenizer lacks lmstack's special tokens {' '.join(missing)}")
            self.bos, self.eos = self.special["<|bos|>"], self.special["<|eos|>"]
            self.prompt_head, self.chat_stops = [self.bos], {self.special[t] for t in TURN_ENDS}
        else:
            ids = {}
            for t in [fmt.get("bos_token"), fmt.get("eos_token")] + list(fmt.get("stop_tokens") or []):
                if t is not None and t not in self.added and t not in self.vocab:
                    raise Fail(f"the chat format names {t!r}, which is not a token of the embedded tokenizer")
                ids[t] = self.added.get(t, self.vocab.get(t))
            self.bos, self.eos = ids.get(fmt.get("bos_token")), ids.get(fmt.get("eos_token"))
            self.prompt_head = [self.bos] if fmt.get("add_bos") and self.bos is not None else []
            self.chat_stops = {ids[t] for t in fmt.get("stop_tokens") or []} | ({self.eos} - {None})
        self.text_stops = {self.eos, self.bos} - {None}  # a document boundary ends plain-text generation
        self.vocab.update(self.added)
        # Text that is an added token becomes it (as in Hugging Face's tokenizers: the longest
        # first): plain added tokens always, special ones only in a chat template's own text.
        by_length = sorted(self.added, key=len, reverse=True)
        self.plain_rx = re.compile("|".join(map(re.escape, [t for t in by_length if t not in self.special]))
                                   ) if len(self.special) < len(self.added) else None
        self.all_rx = re.compile("|".join(map(re.escape, by_length))) if self.added else None
        self.byte_char = byte_alphabet()
        byte_of = {ch: b for b, ch in enumerate(self.byte_char)}
        # The bytes each id stands for (an added token: its text), for decoding.
        self.token_bytes: list[bytes] = [b""] * (max(self.vocab.values()) + 1)
        for token, i in self.vocab.items():
            self.token_bytes[i] = token.encode() if token in self.added else bytes(byte_of[c] for c in token)
        self.special_ids = set(self.special.values())
        self.cache: dict[str, list[int]] = {}

    def bpe(self, piece: str) -> list[int]:
        """One pre-tokenized piece (byte-alphabet characters) -> ids, merging the lowest-ranked
        adjacent pair (all its occurrences, left to right) until no pair has a merge."""
        if piece in self.cache:
            return self.cache[piece]
        if self.ignore_merges and piece in self.vocab:
            self.cache[piece] = [self.vocab[piece]]
            return self.cache[piece]
        parts = list(piece)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            i = 0
            while i < len(parts) - 1:  # merge each occurrence, left to right
                if (parts[i], parts[i + 1]) == pair:
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                i += 1
        ids = self.cache[piece] = [self.vocab[p] for p in parts]
        return ids

    def encode_text(self, text: str) -> list[int]:
        pieces = [text]
        for rx in self.stages:
            pieces = [p for piece in pieces for p in split_isolated(rx, piece)]
        return [i for p in pieces for i in self.bpe("".join(self.byte_char[b] for b in p.encode("utf-8")))]

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Text -> ids. special=True (a chat template's own text): special-token text is the token."""
        rx, ids, pos = self.all_rx if special else self.plain_rx, [], 0
        for m in rx.finditer(text) if rx else ():
            ids += self.encode_text(text[pos:m.start()]) + [self.added[m.group()]]
            pos = m.end()
        return ids + self.encode_text(text[pos:])

    def decode(self, ids, skip_special: bool = False) -> str:
        return b"".join(b"" if skip_special and i in self.special_ids else self.token_bytes[i]
                        for i in ids).decode("utf-8", errors="replace")


# --- the chat template (lmstack's) and its one tool, the calculator ------------------------------
#   <|bos|><|system|> Be brief.<|end|><|user|> What is 2 + 3?<|end|>
#   <|assistant|><|tool_call|>{"name": "calculator", "arguments": {"expression": "2 + 3"}}<|/tool_call|><|end|>
#   <|tool|> 5<|end|><|assistant|> 2 + 3 = 5.<|end|>        (then <|assistant|> for the model to reply)
# Roles and boundaries are special ids put in by number; message text goes through encode after
# one space (LEAD), so that its first word is the token it is in running text; a reply loses it.
LEAD = " "
TURN_ENDS = ("<|end|>", "<|eos|>", "<|bos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")


def render_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """messages: {"role", "content"}, an assistant's also "tool_calls": [JSON {"name", "arguments"}]."""
    sp, ids = tok.special, [tok.bos]
    for m in messages:
        body = tok.encode(LEAD + m["content"]) if m["content"] else []
        for call in m.get("tool_calls", ()):
            body += [sp["<|tool_call|>"]] + tok.encode(call) + [sp["<|/tool_call|>"]]
        ids += [sp[f"<|{m['role']}|>"]] + body + [sp["<|end|>"]]
    return ids + [sp["<|assistant|>"]] * add_generation_prompt


# --- an imported model's own chat template (Jinja, as transformers renders it) --------------------

def jinja_template(source: str):
    """The template compiled as transformers' apply_chat_template compiles it (a sandbox,
    trim_blocks, lstrip_blocks, tojson keeping non-ASCII, raise_exception, strftime_now)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise Fail("this model's chat template is Jinja, and --chat renders it with the jinja2 package, which is "
                   "not installed here (pip install jinja2); a plain prompt (no --chat) needs numpy only") from None
    import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise Fail(f"the model's chat template does not compile: {e}") from None


def render_own(tok: Tokenizer, template, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The template's text -> ids as transformers tokenizes it (special-token text the template
    writes becomes the token), except that message text never becomes a special token: the
    template is rendered once more with a marker for each message's content to find where the
    contents are. (A template that changes a content, e.g. trims it, cannot be mapped so; then the
    whole text is tokenized as transformers and llama.cpp do, specials in messages included.)"""
    fmt = tok.fmt
    kw = {"add_generation_prompt": add_generation_prompt}  # a token the model lacks is undefined, as in transformers
    kw.update({k: fmt[k] for k in ("bos_token", "eos_token", "pad_token") if fmt.get(k) is not None})
    try:
        text = template.render(messages=messages, **kw)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters
        marked = template.render(messages=[{**m, "content": k} for m, k in zip(messages, marks)], **kw)
    except Exception as e:  # the template's raise_exception, a bad conversation for it
        raise Fail(f"the chat template refused this conversation: {e}") from None
    parts = re.split("(\ue000\\d+\ue001)", marked)  # template text, a mark, template text, ...
    contents = [messages[int(x[1:-1])]["content"] if x in marks else None for x in parts]
    if sorted(x for x in parts if x in marks) != sorted(marks) or "".join(
            c if c is not None else x for x, c in zip(parts, contents)) != text:
        return tok.encode(text, special=True)
    ids, plain = [], ""  # text between the template's special tokens is tokenized as one run
    for x, c in zip(parts, contents):
        if c is not None:
            plain += c
            continue
        pos = 0
        for m in tok.all_rx.finditer(x) if tok.all_rx else ():
            plain += x[pos:m.start()]
            if m.group() in tok.special:  # a special token the template wrote
                ids += tok.encode(plain) + [tok.special[m.group()]]
                plain = ""
            else:
                plain += m.group()
            pos = m.end()
        plain += x[pos:]
    return ids + tok.encode(plain)


OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
       ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def calculator(expression: str) -> str:
    """lmstack's calculator: numbers, + - * / // % **, parentheses, walked on the parsed tree (no
    eval); exponents and integer sizes are bounded so that no call can run for long."""
    def ev(n):
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            return n.value
        if isinstance(n, ast.UnaryOp) and type(n.op) in (ast.USub, ast.UAdd):
            return -ev(n.operand) if isinstance(n.op, ast.USub) else ev(n.operand)
        if not (isinstance(n, ast.BinOp) and type(n.op) in OPS):
            raise ValueError("arithmetic only: numbers, + - * / // % **, parentheses")
        a, b = ev(n.left), ev(n.right)
        if isinstance(n.op, ast.Pow) and (abs(b) > 10_000 or abs(a) > 1 and b * math.log2(abs(a)) > 4000):
            raise OverflowError  # refused before it is computed
        v = OPS[type(n.op)](a, b)
        if isinstance(v, complex):
            raise ValueError("the result is not a real number")
        if isinstance(v, int) and v.bit_length() > 4000 or isinstance(v, float) and not math.isfinite(v):
            raise OverflowError
        return v
    try:
        if not isinstance(expression, str) or len(expression) > 500:
            raise ValueError("expression longer than 500 characters")
        v = ev(ast.parse(expression.strip(), mode="eval").body)
    except Exception as e:  # as lmstack's calculator words each failure
        return "error: " + {SyntaxError: "not an arithmetic expression", ZeroDivisionError: "division by zero",
                            OverflowError: "result too large", MemoryError: "result too large",
                            RecursionError: "expression nested too deeply"}.get(type(e), str(e))
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else format(v, ".12g")
    return str(v)


def tool_call(text: str) -> tuple[str, dict, str] | None:
    """What the model wrote between <|tool_call|> and <|/tool_call|> -> (name, arguments, result)."""
    try:
        call = json.loads(text)
        name, args = call["name"], call.get("arguments", {})
        args = json.loads(args) if isinstance(args, str) else args
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (isinstance(name, str) and name and isinstance(args, dict)):
        return None
    if name != "calculator":
        return name, args, f"error: unknown tool {name!r} (available: calculator)"
    if set(args) != {"expression"}:
        return name, args, "error: calculator takes expression"
    return name, args, calculator(args["expression"])


# --- the transformer ----------------------------------------------------------------------------

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)))


class Model:
    def __init__(self, tensors: dict[str, np.ndarray], cfg: dict):
        self.n_head, self.n_kv_head = cfg["n_head"], cfg["n_kv_head"] or cfg["n_head"]
        self.head_dim = cfg["d_model"] // self.n_head
        self.ctx, self.eps = cfg["max_seq_len"], cfg["norm_eps"]
        self.n_params = sum(v.size for v in tensors.values())
        try:
            t = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
            self.embed, self.norm = t["embed_tokens.weight"], t["norm.weight"]
            # A tied head is the embedding itself (the file then stores it once).
            self.head = self.embed if cfg["tie_embeddings"] else t["lm_head.weight"]
            self.layers, self.smear = [], []
            for i in range(cfg["n_layer"]):
                p = f"layers.{i}."
                w = lambda name: t[p + name + ".weight"]  # noqa: E731
                # q, k, v fused in one matrix (and gate, up in another): fewer, larger products.
                qkv = np.concatenate([w("self_attn.q_proj"), w("self_attn.k_proj"), w("self_attn.v_proj")])
                gate_up = np.concatenate([w("mlp.gate_proj"), w("mlp.up_proj")])
                self.layers.append((w("input_layernorm"), qkv, w("self_attn.o_proj"),
                                    w("post_attention_layernorm"), gate_up, w("mlp.down_proj")))
                # Smeared keys (model.smear_keys): each key head's mix of the previous key, sigmoid(logit).
                self.smear.append(1 / (1 + np.exp(-t[p + "self_attn.smear"][:, None, None]))
                                  if cfg.get("smear_keys") else None)
        except KeyError as e:
            raise Fail(f"the weights file has no tensor {e.args[0]}") from None
        # RoPE table as lmstack builds it: angles in float64, cos/sin rounded to float32.
        inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        angles = np.outer(np.arange(self.ctx, dtype=np.float64), inv_freq)
        angles = np.concatenate([angles, angles], axis=-1)
        self.cos, self.sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        # The KV cache, preallocated for the whole context: [layer, kv_head, position, head_dim].
        shape = (cfg["n_layer"], self.n_kv_head, self.ctx, self.head_dim)
        self.cache_k, self.cache_v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.cache_raw_k = np.zeros(shape, np.float32)  # keys before the smear and RoPE (smeared keys only)
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache, in order

    def rope(self, x: np.ndarray, pos: int) -> np.ndarray:
        """x [heads, T, head_dim] at positions pos..pos+T-1: rotate the pairs (x_i, x_{i+D/2})."""
        T, half = x.shape[1], self.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * self.cos[pos:pos + T] + rotated * self.sin[pos:pos + T]

    def forward(self, ids: list[int], pos: int) -> np.ndarray:
        """Tokens at positions pos..pos+T-1 (earlier ones already cached) -> logits of the last."""
        T, H, KV, D = len(ids), self.n_head, self.n_kv_head, self.head_dim
        end = pos + T
        x = self.embed[ids]  # [T, d_model]
        mask = None
        if T > 1:  # query i (at pos+i) sees the keys at positions <= pos+i
            mask = np.where(np.arange(end) <= np.arange(pos, end)[:, None], 0.0, -np.inf).astype(np.float32)
        for li, (n1, qkv, wo, n2, gate_up, down) in enumerate(self.layers):
            h = rms_norm(x, n1, self.eps) @ qkv.T  # [T, (H + 2 KV) D]
            q = h[:, :H * D].reshape(T, H, D).transpose(1, 0, 2)
            k = h[:, H * D:(H + KV) * D].reshape(T, KV, D).transpose(1, 0, 2)
            if self.smear[li] is not None:  # k_t <- (1 - g) k_t + g k_{t-1}; no k_{-1}
                self.cache_raw_k[li, :, pos:end] = k
                prev = self.cache_raw_k[li, :, max(pos - 1, 0):end - 1]
                if pos == 0:
                    prev = np.concatenate([np.zeros_like(k[:, :1]), prev], axis=1)
                k = (1 - self.smear[li]) * k + self.smear[li] * prev
            self.cache_k[li, :, pos:end] = self.rope(k, pos)
            self.cache_v[li, :, pos:end] = h[:, (H + KV) * D:].reshape(T, KV, D).transpose(1, 0, 2)
            # Grouped-query attention: query heads g*G..g*G+G-1 share key/value head g.
            q = self.rope(q, pos).reshape(KV, H // KV, T, D)
            scores = q @ self.cache_k[li, :, None, :end].swapaxes(-1, -2) * np.float32(1 / math.sqrt(D))
            if mask is not None:
                scores += mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = (scores / scores.sum(-1, keepdims=True)) @ self.cache_v[li, :, None, :end]  # [KV, G, T, D]
            x = x + att.reshape(H, T, D).transpose(1, 0, 2).reshape(T, H * D) @ wo.T
            g, u = np.split(rms_norm(x, n2, self.eps) @ gate_up.T, 2, axis=-1)
            with np.errstate(over="ignore"):  # exp(-g) overflows to inf for very negative g: silu -> -0
                x = x + ((g / (1 + np.exp(-g))) * u) @ down.T
        return rms_norm(x[-1], self.norm, self.eps) @ self.head.T

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Run a prompt; returns the next token's logits. What the cache already holds of it (the
        earlier turns of a chat) is reused, not recomputed."""
        if len(ids) >= self.ctx:
            raise Fail(f"prompt is {len(ids)} tokens; the model's context is {self.ctx}")
        n = 0
        while n < min(len(self.cached), len(ids) - 1) and self.cached[n] == ids[n]:
            n += 1
        self.cached = list(ids[:n])
        logits = self.forward(list(ids[n:]), n)
        self.cached = list(ids)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns the next token's logits."""
        logits = self.forward([token], len(self.cached))
        self.cached.append(token)
        return logits


def sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / temperature
    index = np.argsort(-logits, kind="stable")  # candidates, most likely first
    if top_k:
        index = index[:top_k]
    p = np.exp(logits[index] - logits[index[0]])
    p /= p.sum()
    if top_p is not None and 0 < top_p < 1:  # nucleus: the fewest tokens whose mass reaches top_p
        keep = (np.cumsum(p) - p) < top_p
        p = np.where(keep, p, 0.0) / p[keep].sum()
    return int(index[rng.choice(len(p), p=p)])


def generate(model: Model, ids: list[int], max_new: int, temperature=0.0, top_k=None, top_p=None, rng=None,
             stop_ids=()):
    """Yield new tokens (a stop token included, then stop) until max_new or the context's end."""
    rng = rng or np.random.default_rng()
    logits = model.prefill(ids)
    n = min(max_new, model.ctx - len(ids))  # the last new token is never fed: it fills the context
    for i in range(n):
        token = sample(logits, temperature, top_k, top_p, rng)
        yield token
        if token in stop_ids or i == n - 1:
            return
        logits = model.decode(token)


def load(path: str) -> tuple[Model, Tokenizer]:
    if not os.path.isfile(path):
        raise Fail(f"model file {path} not found")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != "lmstack-twofile" or "config" not in meta or "tokenizer" not in meta:
        raise Fail(f"{path} has no lmstack metadata (config, tokenizer); write it with `lmstack export twofile`")
    try:
        cfg = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise Fail(f"{path}: the config in its metadata is not valid JSON") from None
    try:
        fmt = json.loads(meta["chat_format"]) if "chat_format" in meta else None
    except json.JSONDecodeError:
        raise Fail(f"{path}: the chat format in its metadata is not valid JSON") from None
    model, tok = Model(tensors, cfg), Tokenizer(meta["tokenizer"], fmt)
    tok.token_bytes += [b""] * (cfg["vocab_size"] - len(tok.token_bytes))  # ids past the tokenizer's: no text
    return model, tok


# --- the command line -----------------------------------------------------------------------------

def stream_text(tok: Tokenizer, tokens, lead: str = "") -> list[int]:
    """Print tokens as they come (specials hidden, and `lead` where the text starts with it);
    UTF-8 characters split across tokens wait."""
    ids, utf8 = [], codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in tokens:
        ids.append(t)
        if t not in tok.special_ids:
            text = utf8.decode(tok.token_bytes[t])
            if lead and text:
                text, lead = text.removeprefix(lead), ""
            print(text, end="", flush=True)
    print(utf8.decode(b"", final=True), end="")
    return ids


def complete(model: Model, tok: Tokenizer, a) -> None:
    ids = tok.prompt_head + tok.encode(a.prompt)
    if len(ids) >= model.ctx:  # before anything is printed
        raise Fail(f"prompt is {len(ids)} tokens; the model's context is {model.ctx}")
    rng = np.random.default_rng(a.seed)
    tokens = generate(model, ids, a.n, a.temperature, a.top_k, a.top_p, rng, tok.text_stops)
    if a.ids:  # for tests and scripts: the ids, no text
        print(json.dumps({"prompt_ids": ids, "ids": list(tokens)}))
        return
    sys.stdout.write(a.prompt)
    stream_text(tok, tokens)
    print()


def render(tok: Tokenizer, messages: list[dict], template=None) -> list[int]:
    """The ids of a conversation and the generation prompt: the model's own template, or lmstack's."""
    return render_own(tok, template, messages) if tok.fmt else render_chat(tok, messages)


def assistant_turn(model: Model, tok: Tokenizer, history: list[dict], a, rng, template=None) -> list[dict]:
    """One reply, printed as it comes. Its tool calls are run and the model goes on in a new
    message (at most 4 tool rounds), as in `lmstack chat`. Returns the new messages. A model with
    its own chat template has no tools here: its reply ends at one of its stop tokens."""
    if tok.fmt:
        ids = render_own(tok, template, history)
        if len(ids) >= model.ctx:
            print("[the conversation fills the context; /reset starts over]")
            return []
        gen = generate(model, ids, a.n, a.temperature, a.top_k, a.top_p, rng, tok.chat_stops)
        text = tok.decode(stream_text(tok, gen), skip_special=True)
        print("" if not text or text.endswith("\n") else "\n", end="")
        return [{"role": "assistant", "content": text}]
    sp, new = tok.special, []
    for round_ in range(5):
        ids = render_chat(tok, history + new)
        if len(ids) >= model.ctx:
            print("[the conversation fills the context; /reset starts over]")
            break
        calls, call = [], None  # call: the ids of the tool call being written, if one is

        def text_ids():  # the reply's tokens outside tool calls, to print as they come
            nonlocal call
            for t in generate(model, ids, a.n, a.temperature, a.top_k, a.top_p, rng, {sp[t] for t in TURN_ENDS}):
                if t == sp["<|tool_call|>"]:
                    call = []
                elif t == sp["<|/tool_call|>"] and call is not None:
                    calls.append(tool_call(tok.decode(call)))
                    call = None
                elif call is not None:
                    call.append(t)
                else:
                    yield t

        text = tok.decode(stream_text(tok, text_ids(), LEAD), skip_special=True).removeprefix(LEAD)
        print("" if not text or text.endswith("\n") else "\n", end="")
        new.append({"role": "assistant", "content": text})
        if None in calls:
            print("[unreadable tool call ignored]")
        calls = [c for c in calls if c]
        if calls:  # the canonical JSON, as lmstack renders a tool call
            new[-1]["tool_calls"] = [json.dumps({"name": n, "arguments": g}, ensure_ascii=False) for n, g, _ in calls]
        if calls and round_ == 4:
            print("[tool calls not run]")
        if not calls or round_ == 4:
            break
        for name, args, result in calls:
            print(f"[{name}] {next(iter(args.values())) if len(args) == 1 else json.dumps(args)} -> {result}")
            new.append({"role": "tool", "content": result or "(empty)"})
    return new


def chat(model: Model, tok: Tokenizer, a) -> None:
    """The terminal chat (as `lmstack chat`): /reset, /system TEXT, /quit."""
    history = [{"role": "system", "content": a.system}] if a.system else []
    rng = np.random.default_rng(a.seed)
    template = None
    if tok.fmt:
        if not tok.fmt.get("template"):
            raise Fail("this model has no chat template of its own; use a plain prompt (no --chat)")
        template = jinja_template(tok.fmt["template"])
    print(f"run.py chat ({model.n_params / 1e6:.1f}M parameters, context {model.ctx}, "
          f"{'its own chat template' if tok.fmt else 'tools: calculator'}); "
          "/reset, /system TEXT, /quit; Ctrl-C stops a reply, Ctrl-D exits", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        cmd, _, arg = line.partition(" ")
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/reset":
            history = [m for m in history if m["role"] == "system"]
            print("conversation reset")
        elif cmd == "/system":
            history = [m for m in history if m["role"] != "system"]
            history[:0] = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
            print(f"system prompt: {arg.strip() or '(none)'}")
        elif line:
            history.append({"role": "user", "content": line})
            # Too long: forget the oldest turns (never the system prompt or this message).
            while len(ids := render(tok, history, template)) + min(a.n, model.ctx // 2) > model.ctx:
                first = 1 if history[0]["role"] == "system" else 0
                nxt = next((i for i in range(first + 1, len(history)) if history[i]["role"] == "user"), None)
                if nxt is None:
                    break
                del history[first:nxt]
            if len(ids) >= model.ctx:
                history.pop()
                print(f"that message is too long for this model's context ({model.ctx} tokens)")
                continue
            try:
                new = assistant_turn(model, tok, history, a, rng, template)
            except KeyboardInterrupt:  # the turn is abandoned: the conversation goes on from before it
                history.pop()
                print("\n[interrupted]")
                continue
            if new and (new[-1]["content"].strip() or new[-1].get("tool_calls")):
                history += new
            else:  # an empty message cannot be rendered back into the template
                history += new[:-1]
                print("[empty reply]")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not a usage block
        self.exit(2, f"run.py: error: {message} (see --help)\n")


def main(argv=None) -> int:
    p = _Parser(description="Run an lmstack model exported with `lmstack export twofile` (numpy only).")
    p.add_argument("model", help="model.safetensors")
    p.add_argument("prompt", nargs="?", default="", help="text to continue (after BOS)")
    p.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    p.add_argument("--system", default=None, help="chat: system prompt")
    p.add_argument("-n", "--max-tokens", dest="n", type=int, default=None, help="new tokens (100; chat: 256)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (0.8; chat: 0.7)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (chat: 0.95)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ids", action="store_true", help="print the prompt and new token ids as JSON")
    a = p.parse_args(argv)
    a.n = a.n if a.n is not None else (256 if a.chat else 100)
    a.temperature = a.temperature if a.temperature is not None else (0.7 if a.chat else 0.8)
    a.top_p = a.top_p if a.top_p is not None else (0.95 if a.chat else None)
    bad_p = a.top_p is not None and not 0 < a.top_p <= 1
    if a.temperature < 0 or a.n < 1 or (a.top_k is not None and a.top_k < 1) or bad_p:
        p.error("need -n >= 1, --temperature >= 0, --top-k >= 1 and 0 < --top-p <= 1")
    sys.stdout.reconfigure(errors="replace")  # a terminal that cannot show a character gets "?"
    try:
        model, tok = load(a.model)
        chat(model, tok, a) if a.chat else complete(model, tok, a)
    except Fail as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `python run.py ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
