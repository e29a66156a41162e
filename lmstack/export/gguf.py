"""GGUF export: an lmstack model folder -> one .gguf file that llama.cpp (and everything built on
it: llama-cpp-python, llama-server, Ollama, LM Studio) loads as a plain Llama.

    lmstack export gguf --model runs/small/chat --out small.gguf [--dtype f32|f16|bf16|q8_0|q4_0] [--force]

What goes in (written with the `gguf` package, llama.cpp's own writer):
- architecture metadata under `llama.*`: context, width, depth, SwiGLU width, heads, key/value
  heads, RMSNorm epsilon, RoPE base and dimension count, vocabulary size; `general.*`: name,
  architecture, file type.
- the tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ..., `output_norm`,
  `output`). A tied head is not written: llama.cpp uses `token_embd` when `output` is absent.
  Norm weights are always F32, the matrices F32, F16 or BF16, or quantized by the gguf package
  (llama.cpp's reference rounding): Q8_0 (blocks of 32 weights along a row, one fp16 scale each)
  or Q4_0 (blocks of 32, 4 bits, one fp16 scale). token_embd is quantized too, as llama.cpp's
  converter does. A matrix whose rows are not a multiple of 32 long cannot be cut into blocks: it
  is written F16 instead, and the export says which (llama.cpp's converter does the same).
- q_proj / k_proj rows permuted: our RoPE rotates the pairs (x_i, x_{i+D/2}) of each head (Hugging
  Face's rotate-half layout); llama.cpp's Llama graph rotates adjacent pairs (x_2i, x_2i+1).
  `permute` reorders each head's rows so that the two agree, exactly as llama.cpp's
  convert_hf_to_gguf.py does for HF Llama checkpoints (`LlamaModel.permute`).
- the tokenizer as a GPT-2-style byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the
  byte-level token strings, the merges, CONTROL type for our 16 special tokens, BOS/EOS/PAD/EOT
  ids, add_bos_token, and the chat template (Jinja) in `tokenizer.chat_template`.

An imported model (its folder has chat_format.json: `lmstack import hf|gguf`) keeps its own
tokenizer and format: `tokenizer.ggml.pre` is the llama.cpp name of its pre-tokenizer
(PRE_TOKENIZERS; another is refused, saying what was found), its special added tokens are
CONTROL, its BOS/EOS/PAD, end-of-turn (the first stop token that is not EOS), add_bos and template
come from chat_format.json, general.license and general.name from imported.json.

The pre-tokenizer: llama.cpp does not read our split regex from the file; it picks a built-in
one by the name in `tokenizer.ggml.pre`. Ours is GPT-4's (cl100k) split. "dbrx" (DBRX used
cl100k) has that regex and plain BPE merging, like our Hugging Face BPE. "llama-bpe" (Llama 3)
has the same regex but also `ignore_merges` (a whole pre-token that is in the vocabulary
becomes one token without merging), which can split a rare word differently from us, so it is
not used. Differences left (documented in tests/test_gguf.py):
- the regex is written with plain instead of possessive quantifiers and `\\s*[\\r\\n]+` for our
  `\\s*[\\r\\n]`: the same splits. llama.cpp's own Unicode tables classify letters/digits, so a
  character whose category differs between its tables and Rust's regex may split differently.
- llama.cpp's `llama_detokenize` cleans spaces before punctuation (clean_up_tokenization_spaces,
  on for every BPE vocabulary); token-by-token output (`token_to_piece`, what streaming uses) is
  byte-exact.
- tokenizing user text, neither turns special-token text into special ids (llama.cpp: with
  special=False). But a chat template is text: llama.cpp renders it and then parses the special
  tokens in the whole prompt, so "<|end|>" typed in a message becomes the <|end|> id there (as for
  every GGUF model), where lmstack's chat format keeps it text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmstack.chatformat import chat_format
from lmstack.export import require_llama
from lmstack.modelio import IMPORTED, load_model_and_tokenizer
from lmstack.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN
from lmstack.utils import UserError, atomic_file, check_output_file, read_json

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # the weights per Q8_0 / Q4_0 block (along a row)
PRE_TOKENIZER = "dbrx"  # llama.cpp's built-in GPT-4 (cl100k) split with plain BPE merging

# --- pre-tokenizers: llama.cpp's names <-> Hugging Face pre_tokenizer JSON -----------------------------
# llama.cpp never reads a split regex from the file: `tokenizer.ggml.pre` names one of its built-in
# pre-tokenizers (src/llama-vocab.cpp). These are the byte-level ones lmstack knows, as the Hugging
# Face `pre_tokenizer` that splits text the same way, and whether BPE skips merging a pre-token that
# is already a token (llama.cpp's ignore_merges, on only for the Llama 3 names).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one


def _split(pattern: str) -> list[dict]:
    """A regex split, then the byte-level mapping (ByteLevel's own regex off)."""
    return [{"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]


GPT2_BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
DIGITS = {"type": "Digits", "individual_digits": True}
# name -> (its steps as Hugging Face writes them, ignore_merges); the first of several equivalents
# is what `import gguf` writes. lmstack's own split (SPLIT_PATTERN) is GPT-4's, llama.cpp's "dbrx".
PRE_TOKENIZERS: dict[str, tuple[list[dict], bool]] = {
    "dbrx": (_split(SPLIT_PATTERN), False),
    "llama-bpe": (_split(LLAMA3_SPLIT), True),
    "gpt-2": ([GPT2_BYTELEVEL], False),
    "smollm": ([DIGITS, GPT2_BYTELEVEL], False),
    "qwen2": (_split(QWEN2_SPLIT), False),
}
# Other llama.cpp names for the same pre-tokenizers (read by import, never written).
PRE_ALIASES = {"smaug-bpe": "dbrx", "llama3": "llama-bpe", "llama-v3": "llama-bpe", "starcoder": "smollm",
               "refact": "smollm", "deepseek-r1-qwen": "qwen2"}
# Hugging Face spellings with the same splits as a name's own (Llama 3's regex without
# ignore_merges is DBRX's tokenizer; lmstack's with it, Llama 3's).
_EQUIVALENT = {(json.dumps(_split(LLAMA3_SPLIT)), False): "dbrx",
               (json.dumps(_split(SPLIT_PATTERN)), True): "llama-bpe"}


def pre_tokenizer_name(spec: dict, where) -> str:
    """The llama.cpp name of a tokenizer.json's pre-tokenizer (with its BPE's ignore_merges); a
    byte-level BPE whose splitting llama.cpp has no name for is refused, saying what it is."""
    model = spec.get("model") or {}
    bad = [f"model type {model.get('type')!r}"] if model.get("type") != "BPE" else []
    bad += [f"{k} {model[k]!r}" for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix")
            if model.get(k)] + ["byte_fallback"] * bool(model.get("byte_fallback"))
    bad += [f"normalizer {spec['normalizer'].get('type')!r}"] if spec.get("normalizer") else []
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        bad.append(f"decoder {(spec.get('decoder') or {}).get('type')!r}")
    if bad:
        raise UserError(f"{where}: not a plain byte-level BPE ({', '.join(bad)}); GGUF export writes those only")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    # trim_offsets only moves offsets, never ids
    steps = [s | {"trim_offsets": True} if s.get("type") == "ByteLevel" else s for s in steps if s]
    key = (json.dumps(steps), bool(model.get("ignore_merges")))
    known = {(json.dumps(v[0]), v[1]): name for name, v in PRE_TOKENIZERS.items()} | _EQUIVALENT
    if key not in known:
        found = json.dumps(pre)
        raise UserError(f"{where}: its pre-tokenizer is none that llama.cpp has by name "
                        f"({', '.join(PRE_TOKENIZERS)}): found {found[:300]}{'...' if len(found) > 300 else ''}"
                        + (" with ignore_merges" if key[1] else ""))
    return known[key]


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from the rotate-half layout (per head: [first halves..., second halves...]) to
    the interleaved one llama.cpp's RoPE expects ([x0, x_{D/2}, x1, x_{D/2+1}, ...]).
    convert_hf_to_gguf.py's LlamaModel.permute; for k pass the number of key/value heads."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `permute` (GGUF q/k rows back to ours)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_names(n_layer: int) -> dict[str, str]:
    """Our weight name -> llama.cpp's tensor name."""
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }
    for i in range(n_layer):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def _array(t: torch.Tensor, dtype: str):
    """A tensor -> (numpy array, raw GGML type or None). numpy has no bfloat16: BF16 goes in as
    the raw 16-bit patterns (uint16) with the type named explicitly; Q8_0 / Q4_0 as the blocks'
    bytes (uint8) from gguf.quants.quantize (rows must be a multiple of BLOCK long)."""
    import gguf

    t = t.detach().cpu()
    if dtype in ("q8_0", "q4_0"):
        qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
        return gguf.quants.quantize(t.float().contiguous().numpy(), qtype), qtype
    if dtype == "bf16":
        bits = t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return bits, gguf.GGMLQuantizationType.BF16
    return t.to(torch.float16 if dtype == "f16" else torch.float32).contiguous().numpy(), None


@dataclass
class Vocab:
    """What the GGUF says about the tokenizer and the chat format."""
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    pad: int | None
    eot: int | None
    add_bos: bool
    template: str | None
    name: str
    license: str | None = None


def read_vocab(tok, vocab_size: int, model_dir: Path):
    """(tokens, token types, merges) of a model's tokenizer, padded to the model's vocabulary
    with unused "[PADi]" entries (as convert_hf_to_gguf.py does) when the model has more rows."""
    import gguf

    spec = json.loads(tok.to_str())
    pre = json.dumps(spec.get("pre_tokenizer"))
    if json.dumps(SPLIT_PATTERN)[1:-1] not in pre or spec["model"].get("type") != "BPE":
        raise UserError(f"{model_dir / 'tokenizer.json'}: not lmstack's byte-level BPE with its split "
                        f"regex; the GGUF pre-tokenizer ({PRE_TOKENIZER!r}) would not match it")
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    types = [gguf.TokenType.CONTROL if i < len(SPECIAL_TOKENS) else gguf.TokenType.NORMAL
             for i in range(tok.vocab_size)]
    _pad(tokens, types, vocab_size)
    return tokens, types, _merges(spec)


def _pad(tokens: list, types: list, vocab_size: int) -> None:
    import gguf

    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)


def _merges(spec: dict) -> list[str]:
    # tokenizers >= 0.20 stores a merge as a pair ["a", "b"]; older versions as "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]


def lmstack_vocab(model, tok, model_dir: Path) -> Vocab:
    """An lmstack model's Vocab: lmstack's split, specials and template."""
    fmt = chat_format(tok)
    tokens, types, merges = read_vocab(tok, model.cfg.vocab_size, model_dir)
    return Vocab(tokens, types, merges, PRE_TOKENIZER, tok.bos_id, tok.eos_id, tok.pad_id,
                 fmt.end_id, True, fmt.jinja, model_dir.resolve().name)  # a chat turn ends with <|end|>


def own_vocab(model, tok, model_dir: Path) -> Vocab:
    """An imported model's Vocab (tok.own: its chat_format.json): its own tokenizer, pre-tokenizer
    name, special tokens, BOS policy, stop tokens and template; its name and licence from imported.json."""
    import gguf

    file = model_dir / "tokenizer.json"
    spec = json.loads(tok.to_str())
    pre = pre_tokenizer_name(spec, file)
    n = tok.vocab_size
    if n > model.cfg.vocab_size:
        raise UserError(f"{file}: the tokenizer has {n} tokens, more than the model's {model.cfg.vocab_size} rows")
    tokens = [tok.id_to_token(i) for i in range(n)]
    if None in tokens:
        raise UserError(f"{file}: token ids are not contiguous (id {tokens.index(None)} has no token)")
    T = gguf.TokenType
    added = {t: special for t, special in ((t.content, t.special) for t in tok.added_tokens())}
    types = [(T.CONTROL if added[t] else T.USER_DEFINED) if t in added else T.NORMAL for t in tokens]
    _pad(tokens, types, model.cfg.vocab_size)
    fmt = chat_format(tok)
    eot = next((i for i in [fmt.end_id, *sorted(fmt.stop_ids)] if i != tok.eos_id), None)  # where it is not EOS
    info = read_json(model_dir / IMPORTED) or {}
    return Vocab(tokens, types, _merges(spec), pre, tok.bos_id, tok.eos_id, tok.token_id(tok.own.pad_token), eot,
                 tok.add_bos, fmt.jinja, info.get("name") or model_dir.resolve().name, info.get("license"))


def export_gguf(model_dir, out, dtype: str = "f32", force: bool = False) -> Path:
    """Write the model folder `model_dir` as the GGUF file `out` (atomically; an existing file
    is replaced only with force). dtype: the matrices' type, f32 | f16 | bf16 | q8_0 | q4_0. A model with a
    chat format of its own (chat_format.json: an imported one) keeps its tokenizer and format."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf "
                        "(or pip install 'lmstack[gguf]')") from None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {' | '.join(DTYPES)} for gguf, got {dtype!r}")
    model_dir, out = Path(model_dir), check_output_file(out, what=".gguf file")
    if out.exists() and not force:
        raise UserError(f"{out} exists (use --force to replace it)")
    model, tok = load_model_and_tokenizer(model_dir)  # UserError on a missing or broken folder
    require_llama(model.cfg, "GGUF's llama architecture")
    v = (own_vocab if tok.own is not None else lmstack_vocab)(model, tok, model_dir)
    cfg = model.cfg
    head_dim = cfg.d_model // cfg.n_head

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    unblocked = []  # quantized matrices whose rows do not split into blocks: written F16
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")  # writes general.architecture = "llama"
        w.add_name(v.name)
        if v.license:
            w.add_license(v.license)
        w.add_file_type(int(file_type))
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(head_dim)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(v.pre)
        w.add_token_list(v.tokens)
        w.add_token_types(v.types)
        w.add_token_merges(v.merges)
        for add, i in [(w.add_bos_token_id, v.bos), (w.add_eos_token_id, v.eos), (w.add_pad_token_id, v.pad),
                       (w.add_eot_token_id, v.eot)]:
            if i is not None:
                add(i)
        w.add_add_bos_token(v.add_bos)
        w.add_add_eos_token(False)
        if v.template:
            w.add_chat_template(v.template)

        names = tensor_names(cfg.n_layer)
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp falls back to token_embd
            if name.endswith("q_proj.weight"):
                t = permute(t, cfg.n_head)
            elif name.endswith("k_proj.weight"):
                t = permute(t, cfg.n_kv_head)
            kind = "f32" if t.dim() == 1 else dtype  # norms stay F32
            if kind in ("q8_0", "q4_0") and t.shape[-1] % BLOCK:
                kind = "f16"
                unblocked.append(f"{names[name]} ({t.shape[0]} x {t.shape[1]})")
            arr, raw = _array(t, kind)
            w.add_tensor(names[name], arr, raw_dtype=raw)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    if unblocked:
        print(f"gguf: kept F16 (rows not a multiple of {BLOCK} long, so no {dtype.upper()} blocks): "
              + ", ".join(unblocked))
    print(f"gguf: {model.num_params() / 1e6:.1f}M params, {dtype.upper()} matrices, vocab {len(v.tokens)}, "
          f"{out.stat().st_size / 1e6:.1f} MB -> {out}")
    return out
