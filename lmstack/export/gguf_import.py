"""GGUF import: a llama.cpp model file -> an lmstack model folder.

    lmstack import gguf model.gguf --out runs/mymodel [--force]

Read with the `gguf` package (llama.cpp's own reader); the inverse of `lmstack export gguf`:
- the architecture must be "llama" (Llama, SmolLM, Mistral-shaped files with no sliding window):
  config from `llama.*` (context, width, depth, SwiGLU width, heads, key/value heads, RMSNorm
  epsilon, RoPE base); a tied head where the file has no `output.weight`. What lmstack's model
  cannot represent (another architecture, RoPE scaling or frequency factors, partial RoPE,
  experts, biases) is refused by name.
- tensors of the types in QUANT_TYPES, dequantized to float32 with gguf.quants.dequantize (the
  weights are then exactly the values the file holds); q/k rows back from
  llama.cpp's interleaved RoPE layout (`unpermute` in gguf.py).
- the tokenizer from `tokenizer.ggml.*`: a byte-level BPE ("gpt2"): its tokens, merges, CONTROL
  tokens as special added tokens and USER_DEFINED ones as plain added tokens, and the Hugging
  Face pre-tokenizer that splits as the llama.cpp one named in `tokenizer.ggml.pre` does
  (PRE_TOKENIZERS in gguf.py). A SentencePiece vocabulary ("llama": Llama 2, Mistral) is refused.
- its chat format into chat_format.json (template, BOS/EOS/PAD, add_bos, the end-of-turn and EOS
  tokens as stop tokens), its licence and name into imported.json. A file that holds lmstack's 16
  special tokens and lmstack's template (one `lmstack export gguf` wrote) is an lmstack model
  again: no chat_format.json. A file with no chat template gets lmstack's specials appended (their
  embeddings start at the mean embedding), as `import hf` does, so lmstack's chat format works.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lmstack.chatformat import CHAT_TEMPLATE_JINJA
from lmstack.config import ModelConfig
from lmstack.export.gguf import PRE_ALIASES, PRE_TOKENIZERS, tensor_names, unpermute
from lmstack.modelio import imported_model, save_imported
from lmstack.tokenizer import SPECIAL_TOKENS, OwnFormat, Tokenizer
from lmstack.utils import UserError, atomic_output_dir, check_output_dir

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# The llama.cpp names of end-of-turn tokens, for a file that does not set tokenizer.ggml.eot_token_id
# (llama.cpp looks for the same texts when it loads one).
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<EOT>")


class Fields:
    """A GGUF file's key/value metadata, read once."""

    def __init__(self, reader, src: Path):
        self.src = src
        self.values = {}
        for key, f in reader.fields.items():
            try:
                self.values[key] = f.contents()
            except (UnicodeDecodeError, ValueError):
                raise UserError(f"{src}: metadata {key} is not readable") from None

    def get(self, key, default=None):
        return self.values.get(key, default)

    def need(self, key):
        if key not in self.values:
            raise UserError(f"{self.src}: no {key} in its metadata")
        return self.values[key]


def _refuse(src, msg):
    raise UserError(f"{src}: cannot import: {msg}")


def _f32(x: float) -> float:
    """A float32 from the file as the shortest decimal that is that float32 (1e-06, not 9.99999997e-07)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="0"))


def read_config(m: Fields, tensors: dict, src: Path) -> ModelConfig:
    """ModelConfig from llama.* metadata; what lmstack's model cannot be is refused by name."""
    arch = m.need("general.architecture")
    if arch != "llama":
        _refuse(src, f"architecture {arch!r}: lmstack imports the Llama architecture (\"llama\") only")
    for key in ("llama.expert_count", "llama.attention.sliding_window"):
        if m.get(key):
            _refuse(src, f"{key} = {m.get(key)}: lmstack has no experts and attends to the whole context")
    scaling = m.get("llama.rope.scaling.type")
    if scaling not in (None, "none") or m.get("llama.rope.scaling.factor", 1.0) not in (0.0, 1.0):
        _refuse(src, f"llama.rope.scaling.type {scaling!r} (factor {m.get('llama.rope.scaling.factor')}): "
                     "lmstack has plain RoPE")
    if "rope_freqs.weight" in tensors:
        _refuse(src, "rope_freqs.weight (RoPE frequency factors, Llama 3.1-style scaling): lmstack has plain RoPE")
    d, n_head = int(m.need("llama.embedding_length")), int(m.need("llama.attention.head_count"))
    if d % n_head:
        _refuse(src, f"embedding_length {d} is not a multiple of head_count {n_head}")
    head_dim = d // n_head
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        if m.get(key, head_dim) != head_dim:
            _refuse(src, f"{key} = {m.get(key)}, not embedding_length / head_count = {head_dim}")
    if "token_embd.weight" not in tensors:
        _refuse(src, "no token_embd.weight")
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[1]), n_layer=int(m.need("llama.block_count")),
        n_head=n_head, n_kv_head=int(m.get("llama.attention.head_count_kv") or n_head), d_model=d,
        ffn_hidden=int(m.need("llama.feed_forward_length")), max_seq_len=int(m.need("llama.context_length")),
        rope_theta=_f32(m.get("llama.rope.freq_base", 10000.0)),
        norm_eps=_f32(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors)


def tensor_data(t, src: Path) -> torch.Tensor:
    """One GGUF tensor -> float32 torch, in our [out, in] layout."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype.name not in QUANT_TYPES:
        _refuse(src, f"tensor {t.name} is {qtype.name}; lmstack imports {', '.join(QUANT_TYPES)}")
    shape = tuple(int(n) for n in reversed(t.shape))  # GGML lists dimensions innermost first
    a = gguf.quants.dequantize(np.asarray(t.data), qtype)
    return torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: the file is read-only


def read_weights(tensors: dict, cfg: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """Our state dict from llama.cpp's tensors (q/k rows un-permuted)."""
    ours = {theirs: name for name, theirs in tensor_names(cfg.n_layer).items()}
    unknown = sorted(set(tensors) - set(ours))
    if unknown:
        _refuse(src, f"tensor {unknown[0]} has no place in lmstack's Llama (biases, extra norms or "
                     "layers are not supported)")
    state = {}
    for name, t in tensors.items():
        w = tensor_data(t, src)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, cfg.n_kv_head)
        state[ours[name]] = w
    return state


def build_tokenizer(m: Fields, src: Path):
    """(Hugging Face tokenizer, the model's chat format or None for lmstack's, lmstack specials to
    append) from tokenizer.ggml.* and tokenizer.chat_template."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = m.need("tokenizer.ggml.model")
    if kind == "llama":
        _refuse(src, "a SentencePiece vocabulary (tokenizer.ggml.model \"llama\", as Llama 2 and Mistral "
                     "use): lmstack imports byte-level BPE (\"gpt2\") vocabularies only")
    if kind != "gpt2":
        _refuse(src, f"tokenizer.ggml.model {kind!r}: lmstack imports byte-level BPE (\"gpt2\") vocabularies only")
    pre = m.get("tokenizer.ggml.pre")
    name = PRE_ALIASES.get(pre, pre)
    if name not in PRE_TOKENIZERS:
        _refuse(src, f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not one lmstack knows "
                     f"({', '.join(PRE_TOKENIZERS)})")
    steps, ignore_merges = PRE_TOKENIZERS[name]
    tokens = list(m.need("tokenizer.ggml.tokens"))
    T = gguf.TokenType
    types = list(m.get("tokenizer.ggml.token_type") or [T.NORMAL] * len(tokens))
    while tokens and types[-1] == T.UNUSED:  # padding up to the model's rows ("[PADi]")
        tokens.pop()
        types.pop()
    vocab = {}
    for i, t in enumerate(tokens):
        if vocab.setdefault(t, i) != i:
            _refuse(src, f"token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} and {i})")
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges") or []]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    spec = json.loads(hf.to_str())
    spec["pre_tokenizer"] = steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}
    hf = Tokenizer.from_str(json.dumps(spec))
    hf.decoder = decoders.ByteLevel()
    # llama.cpp's CONTROL tokens are Hugging Face's special added tokens, USER_DEFINED its other added ones
    hf.add_tokens([AddedToken(t, special=types[i] == T.CONTROL, normalized=False)
                   for i, t in enumerate(tokens) if types[i] in (T.CONTROL, T.USER_DEFINED)])

    def text(key):
        i = m.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= i < len(tokens):
            _refuse(src, f"tokenizer.ggml.{key}_token_id {i} is not a token id")
        return None if i is None else tokens[i]

    template = m.get("tokenizer.chat_template")
    control = {t for t, k in zip(tokens, types) if k == T.CONTROL}
    if template == CHAT_TEMPLATE_JINJA and control >= set(SPECIAL_TOKENS):
        return hf, None, []  # an lmstack model
    eos, eot = text("eos"), text("eot")
    eot = eot or next((t for t in EOT_TEXTS if t in control), None)
    # llama.cpp's default where the file does not say: BOS first for the Llama 3 pre-tokenizer
    add_bos = bool(m.get("tokenizer.ggml.add_bos_token", name == "llama-bpe")) and text("bos") is not None
    fmt = {"template": template, "bos_token": text("bos"), "eos_token": eos, "pad_token": text("padding"),
           "add_bos": add_bos, "stop_tokens": list(dict.fromkeys(t for t in (eot, eos) if t is not None)),
           "source": str(src.resolve())}
    missing = [t for t in SPECIAL_TOKENS if hf.token_to_id(t) is None] if template is None else []
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return hf, fmt, missing


def import_gguf(src, out, force: bool = False) -> Path:
    """A llama.cpp GGUF file (Llama architecture, byte-level BPE) -> an lmstack model folder."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF import needs the gguf package: pip install gguf "
                        "(or pip install 'lmstack[gguf]')") from None
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src} {'is a folder, not a' if src.is_dir() else 'does not exist: no'} .gguf file")
    check_output_dir(out, force)
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # bad magic, truncated: ValueError, struct errors, ...
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{src} is not a readable GGUF file: {why}") from None
    m = Fields(reader, src)
    tensors = {t.name: t for t in reader.tensors}
    cfg = read_config(m, tensors, src)
    hf, fmt, missing = build_tokenizer(m, src)
    state = read_weights(tensors, cfg, src)
    cfg = dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, hf.get_vocab_size(with_added_tokens=True)))
    try:
        model = imported_model(cfg, state)  # lmstack's specials' rows too, when they were appended
    except (ValueError, RuntimeError) as e:  # a tensor missing, or a shape that does not match the metadata
        why = str(e).splitlines()[0]
        if why.startswith("missing "):
            why = f"no tensor {tensor_names(cfg.n_layer).get(why[len('missing '):], why[len('missing '):])}"
        _refuse(src, f"its tensors do not match its llama.* metadata ({why})")
    types = Counter(t.tensor_type.name for t in tensors.values())
    info = {"source": str(src.resolve()), "format": "gguf", "model_type": "llama",
            "license": m.get("general.license"), "name": m.get("general.name"),
            "pre_tokenizer": m.get("tokenizer.ggml.pre"), "tensor_types": types, "added_special_tokens": missing}
    try:
        tok = Tokenizer(hf, None if fmt is None else OwnFormat(**fmt))
    except UserError as e:  # a stop, BOS or EOS token that is not in the vocabulary
        _refuse(src, str(e))
    with atomic_output_dir(out, force) as tmp:
        save_imported(tmp, model, tok, info)
    quant = ", ".join(f"{n} {k}" for k, n in sorted(types.items()))
    print(f"imported {src} ({m.get('general.name') or 'llama'}, {model.num_params():,} params from {quant}; "
          f"{'its own chat format' if fmt else 'lmstack chat format'}) -> {out}")
    return Path(out)
