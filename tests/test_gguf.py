"""GGUF export (`lmstack export gguf`): the file read back with the `gguf` package (tensor names,
shapes, types, values, architecture metadata, tokenizer, chat template, the q/k permutation), CLI
errors; then, only where llama-cpp-python is installed (it compiles llama.cpp from source for
several minutes, too long for every CI run), the file loaded in llama.cpp: the same logits and
greedy tokens as our engine on the same token ids, and the same tokenization of ordinary text.

Tokenizer differences between llama.cpp and ours (see lmstack/export/gguf.py): none in ids, on the
texts below (nor on the 3,000 documents of a world corpus with runs/small/chat's tokenizer). In
text: llama.cpp's `llama_detokenize` cleans spaces before punctuation ("a ." -> "a."), and
llama-cpp-python's `Llama.detokenize` drops a leading space after BOS; `token_to_piece` (token
by token, what streaming uses) is byte-exact. A chat template is text, so llama.cpp turns
special-token text typed by a user into the special id; our render_chat does not.
"""

import json
import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmstack.cli import main  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.engine import for_inference, generate  # noqa: E402
from lmstack.model import GPT, apply_rope, rope_table  # noqa: E402
from lmstack.chatformat import CHAT_TEMPLATE_JINJA as CHAT_TEMPLATE  # noqa: E402
from lmstack.export.gguf import export_gguf, permute, tensor_names, unpermute  # noqa: E402
from lmstack.chatformat import render_chat  # noqa: E402
from lmstack.tokenizer import SPECIAL_TOKENS, train_tokenizer  # noqa: E402
from lmstack.modelio import load_model  # noqa: E402
from lmstack.utils import UserError  # noqa: E402
from test_tokenizer import TRICKY  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import fit_windows, save_model_dir  # noqa: E402

TEXT = ("The calculator says 23 + 58 = 81. What is 2 + 3? It is 5. Paris is in France. hello world.\n"
        "Don't stop: we'll see, they're here; I'm done! Café über naïve 東京 🙂 x=1999, y=2024.\n")
CTX = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model_dir(d, tok, cfg: ModelConfig, train_steps: int = 0):
    """A model folder: tokenizer + config + weights; trained for `train_steps` on TEXT (a random
    model only repeats one token, a weak test of greedy decoding)."""
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT(cfg)
    if train_steps:
        fit_windows(model, torch.tensor([tok.bos_id] + tok.encode(TEXT * 20)), steps=train_steps)
    return save_model_dir(d, model, tok)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "text.txt").write_text(TEXT * 40)
    return train_tokenizer([d / "text.txt"], vocab_size=400, out=d / "tok", progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    """tied: plain multi-head attention, tied head, trained; gqa: 2 key/value heads for 4 query
    heads, an untied head, a vocabulary larger than the tokenizer's (padded in the GGUF)."""
    root = tmp_path_factory.mktemp("models")
    tied = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=CTX)
    gqa = ModelConfig(vocab_size=tok.vocab_size + 24, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=CTX, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6)
    return {"tied": make_model_dir(root / "tied", tok, tied, train_steps=200),
            "gqa": make_model_dir(root / "gqa", tok, gqa)}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(model kind, dtype) -> the exported .gguf path."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind, d in models.items():
        for dtype in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            out[kind, dtype] = export_gguf(d, root / f"{kind}-{dtype}.gguf", dtype=dtype)
    return out


def field(reader, key):
    return reader.fields[key].contents()


def tensor_as_torch(t) -> torch.Tensor:
    """A GGUFReader tensor -> torch, in our [out, in] layout (BF16 comes back as raw bytes)."""
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = np.ascontiguousarray(t.data).view(np.int16).reshape(shape)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(t.data).reshape(shape))


# --- the file, read back with gguf -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_architecture_metadata(models, exported, kind):
    cfg = load_model(models[kind]).cfg
    r = gguf.GGUFReader(exported[kind, "bf16"])
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.name") == kind
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_BF16
    expected = {
        "llama.vocab_size": cfg.vocab_size, "llama.context_length": CTX,
        "llama.embedding_length": cfg.d_model, "llama.block_count": cfg.n_layer,
        "llama.feed_forward_length": cfg.ffn_hidden, "llama.attention.head_count": cfg.n_head,
        "llama.attention.head_count_kv": cfg.n_kv_head, "llama.rope.dimension_count": cfg.d_model // cfg.n_head,
    }
    assert {k: field(r, k) for k in expected} == expected
    assert math.isclose(field(r, "llama.rope.freq_base"), cfg.rope_theta)
    assert math.isclose(field(r, "llama.attention.layer_norm_rms_epsilon"), cfg.norm_eps, rel_tol=1e-6)
    for dtype, ft in [("f32", gguf.LlamaFileType.ALL_F32), ("f16", gguf.LlamaFileType.MOSTLY_F16)]:
        assert field(gguf.GGUFReader(exported[kind, dtype]), "general.file_type") == ft


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_tensors_names_shapes_types_values(models, exported, kind, dtype):
    model = load_model(models[kind])
    cfg = model.cfg
    r = gguf.GGUFReader(exported[kind, dtype])
    tensors = {t.name: t for t in r.tensors}
    names = tensor_names(cfg.n_layer)
    ours = {names[k]: v for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    assert set(tensors) == set(ours)
    # llama.cpp falls back to token_embd for the head when output.weight is absent
    assert ("output.weight" in tensors) == (not cfg.tie_embeddings)
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, w in ours.items():
        t = tensors[name]
        assert list(t.shape) == list(reversed(w.shape)), name  # GGML lists dimensions innermost first
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if w.dim() == 1 else matrix_type), name
        got = tensor_as_torch(t)
        if name.endswith("attn_q.weight"):
            got = unpermute(got, cfg.n_head)
        elif name.endswith("attn_k.weight"):
            got = unpermute(got, cfg.n_kv_head)
        want = w if w.dim() == 1 else w.to(cast)
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_quantized_files_read_back_close_to_the_weights(models, exported, kind, dtype):
    """Q8_0 / Q4_0: every matrix (token_embd too) in blocks of 32 along a row with one scale each,
    norms F32; dequantised, each weight is within half a step of its block's grid."""
    model = load_model(models[kind])
    cfg = model.cfg
    r = gguf.GGUFReader(exported[kind, dtype])
    qtype = getattr(gguf.GGMLQuantizationType, dtype.upper())
    assert field(r, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    names = tensor_names(cfg.n_layer)
    ours = {names[k]: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and cfg.tie_embeddings)}
    for t in r.tensors:
        w = ours[t.name]
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if w.dim() == 1 else qtype), t.name
        if w.dim() == 1:
            continue
        got = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(w.shape)
        if t.name.endswith("attn_q.weight"):
            got = unpermute(got, cfg.n_head)
        elif t.name.endswith("attn_k.weight"):
            got = unpermute(got, cfg.n_kv_head)
        blocks = w.reshape(-1, 32)
        # Q8_0: a step of max|x| / 127, half a step off at most; Q4_0: max|x| / 8 on a grid of -8..7
        # steps signed so the largest is -8, so a value of the other sign near +8 steps clips to 7 (a
        # step off). Plus the scale's own fp16 rounding (2^-11 relative) at the grid's end.
        levels, off = (127, 0.5) if dtype == "q8_0" else (8, 1.0)
        step = blocks.abs().amax(-1, keepdim=True) / levels
        assert ((got.reshape(-1, 32) - blocks).abs() <= step * (off + levels / 2048) + 1e-7).all(), t.name


def test_q8_0_keeps_rows_that_do_not_split_into_blocks_f16(tok, tmp_path, capsys):
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, ffn_hidden=48, max_seq_len=CTX)
    d = make_model_dir(tmp_path / "m", tok, cfg)
    r = gguf.GGUFReader(export_gguf(d, tmp_path / "m.gguf", dtype="q8_0"))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert "kept F16 (rows not a multiple of 32 long, so no Q8_0 blocks): blk.0.ffn_down.weight (32 x 48)" \
        in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_tokenizer(models, exported, tok, kind):
    cfg = load_model(models[kind]).cfg
    r = gguf.GGUFReader(exported[kind, "f32"])
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "dbrx"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert tokens[:tok.vocab_size] == [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert tokens[:16] == SPECIAL_TOKENS
    assert tokens[tok.vocab_size:] == [f"[PAD{i}]" for i in range(tok.vocab_size, cfg.vocab_size)]
    T = gguf.TokenType
    assert field(r, "tokenizer.ggml.token_type") == (
        [T.CONTROL] * 16 + [T.NORMAL] * (tok.vocab_size - 16) + [T.UNUSED] * (cfg.vocab_size - tok.vocab_size))
    merges = json.loads(tok.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = {k: field(r, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "eot")}
    assert ids == {"bos": tok.bos_id, "eos": tok.eos_id, "padding": tok.pad_id, "eot": tok.special_ids["<|end|>"]}
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_eos_token") is False
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi <|end|> there"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Café?"}],
    [{"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 + 3"}'}}]},
     {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 + 3 = 5."}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_renders_our_format(tok, messages, gen):
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(undefined=jinja2.Undefined)
    text = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=gen,
                                                 bos_token="<|bos|>", eos_token="<|eos|>")
    ids, _ = render_chat(tok, messages, add_generation_prompt=gen)
    assert text == tok.decode(ids)


def test_permutation_is_invertible_and_matches_interleaved_rope():
    """permute turns our rotate-half RoPE into llama.cpp's rotation of adjacent pairs: rotating
    the permuted q with interleaved RoPE gives the permuted rotated q, head by head, so every
    attention score q.k (the same permutation on both sides) is unchanged."""
    n_head, head_dim, d = 3, 8, 16
    w = torch.randn(n_head * head_dim, d, dtype=torch.float64)
    assert torch.equal(unpermute(permute(w, n_head), n_head), w)
    assert not torch.equal(permute(w, n_head), w)
    x = torch.randn(5, d, dtype=torch.float64)  # 5 positions
    cos, sin = (t.double() for t in rope_table(head_dim, 5, 10000.0))
    ours = apply_rope((x @ w.T).view(5, n_head, head_dim).transpose(0, 1), cos, sin)  # [H, T, D]
    q = (x @ permute(w, n_head).T).view(5, n_head, head_dim).transpose(0, 1)
    # GGML's "normal" RoPE: pairs (2i, 2i+1) rotated by pos * theta^(-2i/D)
    theta = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(5, dtype=torch.float64)[:, None] * theta
    even, odd = q[..., 0::2], q[..., 1::2]
    rotated = torch.stack([even * ang.cos() - odd * ang.sin(), even * ang.sin() + odd * ang.cos()], -1).flatten(-2)
    expected = permute(ours.transpose(0, 1).reshape(5, -1).T, n_head).T.reshape(5, n_head, head_dim).transpose(0, 1)
    assert torch.allclose(rotated, expected, atol=1e-12)


# --- errors and atomic writes ---------------------------------------------------------------------

def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_and_refuses_to_overwrite(models, tmp_path, capsys):
    out = tmp_path / "sub" / "m.gguf"
    rc, stdout, err = run_cli(capsys, "export", "gguf", "--model", str(models["tied"]), "--out", str(out))
    assert rc == 0 and out.is_file() and "-> " in stdout and err == ""
    before = out.stat().st_mtime_ns
    rc, stdout, err = run_cli(capsys, "export", "gguf", "--model", str(models["tied"]), "--out", str(out))
    assert rc == 2 and err.count("\n") == 1 and "--force" in err and out.stat().st_mtime_ns == before
    rc, _, err = run_cli(capsys, "export", "gguf", "--model", str(models["tied"]), "--out", str(out),
                         "--dtype", "bf16", "--force")
    assert rc == 0 and err == ""
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # no temporary file left behind


def test_cli_errors_are_one_line(models, tok, tmp_path, capsys):
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((models["tied"] / name).read_bytes())
    (tmp_path / "adir").mkdir()
    cases = [
        (["--model", str(models["tied"]), "--out", str(tmp_path / "x.gguf"), "--dtype", "q4"], "--dtype"),
        (["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.gguf")], "does not exist"),
        (["--model", str(tmp_path / "adir"), "--out", str(tmp_path / "x.gguf")], "not a model folder"),
        (["--model", str(no_tok), "--out", str(tmp_path / "x.gguf")], "tokenizer.json"),
        (["--model", str(models["tied"]), "--out", str(tmp_path / "adir")], "is a folder"),
    ]
    for args, needle in cases:
        rc, out, err = run_cli(capsys, "export", "gguf", *args)
        assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "no_tok"]


def test_vocab_smaller_than_tokenizer_is_refused(tok, tmp_path):
    cfg = ModelConfig(vocab_size=tok.vocab_size - 1, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=16)
    d = make_model_dir(tmp_path / "m", tok, cfg)
    with pytest.raises(UserError, match="tokenizer has"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# --- llama.cpp itself (skipped unless llama-cpp-python is installed) -------------------------------

def llama(path, n_ctx=CTX, logits_all=False):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=n_ctx,
                           logits_all=logits_all, verbose=False)


def llama_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits [T, V] at every position of `ids` (a fresh context)."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)]))


def last_logits(llm) -> np.ndarray:
    """llama.cpp's logits for the last token evaluated (Llama.scores only keeps them with
    logits_all=True)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by hand (argmax of llama.cpp's last logits), so no sampler or stop token
    gets in the way."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(last_logits(llm))))
        llm.eval(out[-1:])
    return out


@pytest.mark.parametrize("kind", ["tied", "gqa"])
def test_llama_cpp_logits_match_ours_f32(models, exported, tok, kind):
    llm = llama(exported[kind, "f32"], logits_all=True)
    assert llm.n_vocab() == load_model(models[kind]).cfg.vocab_size
    model = load_model(models[kind])
    ids = [tok.bos_id] + tok.encode(TEXT)[:60]
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0]
    theirs = llama_logits(llm, ids)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max() < 1e-3 * ours.abs().max(), (theirs - ours).abs().max()
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_llama_cpp_greedy_tokens_match_our_engine(models, exported, tok):
    model = for_inference(load_model(models["tied"]), "fp32")
    llm = llama(exported["tied", "f32"])
    for prompt in ["The calculator says", "What is 2 + 3? It is", "Paris is in"]:
        ids = [tok.bos_id] + tok.encode(prompt)
        ours = generate(model, ids, max_tokens=24, temperature=0.0)
        assert len(set(ours)) > 3, "the tiny model should not be degenerate"
        assert llama_greedy(llm, ids, 24) == ours, prompt


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_llama_cpp_half_precision_files_load_and_agree(models, exported, tok, dtype):
    """F16/BF16 matrices: llama.cpp rounds differently from us (its dot products, its
    activations), so only closeness is required: top-1 at most prompt positions."""
    llm = llama(exported["tied", dtype], logits_all=True)
    model = load_model(models["tied"])
    ids = [tok.bos_id] + tok.encode(TEXT)[:60]
    with torch.inference_mode():
        ours = model(torch.tensor([ids]))[0]
    theirs = llama_logits(llm, ids)
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree
    assert (theirs - ours).abs().max() < 0.1 * ours.abs().max()


def test_llama_cpp_q8_0_agrees_with_our_int8(models, exported, tok):
    """Q8_0 in llama.cpp (blocks of 32, activations rounded to 8 bits too) against our int8 (one
    scale per row, bf16 activations): different roundings of the same weights, so top-1 agreement at
    most prompt positions and the same first greedy tokens."""
    llm = llama(exported["tied", "q8_0"], logits_all=True)
    ids = [tok.bos_id] + tok.encode(TEXT)[:60]
    ref = load_model(models["tied"])
    with torch.inference_mode():
        fp32 = ref(torch.tensor([ids]))[0]
    theirs = llama_logits(llm, ids)
    assert (theirs.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9
    assert (theirs - fp32).abs().max() < 0.1 * fp32.abs().max()
    ours = for_inference(load_model(models["tied"]), "int8")
    llm = llama(exported["tied", "q8_0"])
    for prompt in ["The calculator says", "Paris is in"]:
        p = [tok.bos_id] + tok.encode(prompt)
        assert llama_greedy(llm, p, 8) == generate(ours, p, max_tokens=8, temperature=0.0), prompt


TOKENIZER_TEXTS = [
    TEXT, "hello world", "The calculator says 23 + 58 = 81.", "  two  spaces and\ttab\n\nnew lines\n",
    "Don't, won't, I'm, they'll, we've, you're, he'd.", "Numbers: 1234567 3.14159 -0 2024",
    "Café über naïve 東京タワー Ελληνικά русский 🙂👍🏽", "code:\n    def f(x):\n\treturn x  # done\n",
    "<|user|> typed by a user <|end|> stays text", "a<|bos|>b",
] + TRICKY


@pytest.mark.parametrize("text", TOKENIZER_TEXTS)
def test_llama_cpp_tokenizer_matches_ours(exported, tok, text):
    llm = llama(exported["tied", "f32"])
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)  # special=False: as ours
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == [tok.bos_id] + tok.encode(text)
    pieces = b"".join(llm.detokenize([i]) for i in tok.encode(text))  # token by token: byte-exact
    assert pieces.decode() == text


def llama_chat_ids(llm, messages) -> list[int]:
    """What llama-cpp-python's chat completion feeds the model: the GGUF's template rendered
    (with the generation prompt), tokenized with special-token text parsed."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")(messages=messages)
    return llm.tokenize(fmt.prompt.encode(), add_bos=not fmt.added_special, special=True)


@pytest.mark.parametrize("messages", [m for m in CONVERSATIONS if "<|" not in json.dumps(m)])
def test_llama_cpp_chat_template_gives_our_ids(exported, tok, messages):
    llm = llama(exported["tied", "f32"])
    assert llama_chat_ids(llm, messages) == render_chat(tok, messages, add_generation_prompt=True)[0]


def test_llama_cpp_chat_template_parses_special_text_in_messages(exported, tok):
    """A known difference: a chat template is text, so in llama.cpp (as for every GGUF model) a
    user who types "<|end|>" gets the <|end|> id; our render_chat encodes message text as text."""
    llm = llama(exported["tied", "f32"])
    messages = [{"role": "user", "content": "Hi <|end|> there"}]
    sid = tok.special_ids
    ours = render_chat(tok, messages, add_generation_prompt=True)[0]
    assert ours == [0, sid["<|user|>"]] + tok.encode("Hi <|end|> there") + [sid["<|end|>"], sid["<|assistant|>"]]
    assert llama_chat_ids(llm, messages) == ([0, sid["<|user|>"]] + tok.encode("Hi ") + [sid["<|end|>"]]
                                             + tok.encode(" there") + [sid["<|end|>"], sid["<|assistant|>"]])
