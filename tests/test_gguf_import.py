"""GGUF import (`lmstack import gguf`) and the GGUF export of an imported model (its own tokenizer
and chat format), read back with the `gguf` package.

- an lmstack model exported to GGUF (F32), and copies re-quantized with gguf.quants.quantize,
  imported back: F32 bit-exact; quantized weights exactly gguf's dequantization, logits within
  the quantization error measured for each type (QUANT_BOUND); the tokenizer equal on a table of
  tricky strings; no chat_format.json (an lmstack model again).
- foreign byte-level tokenizers built here with `tokenizers` (ChatML specials, no BOS, a chat
  template), one per pre-tokenizer llama.cpp names (llama-bpe with ignore_merges, smollm, gpt-2,
  qwen2): an imported model folder exported to GGUF writes that name, its specials as CONTROL, its
  template, stop and BOS policy, licence and name; imported back, the ids, template, stop tokens
  and add_bos are equal.
- K-quants (no quantizer in the gguf package): tensors of random blocks import as gguf dequantizes them.
- what lmstack cannot represent is refused in one line, naming it.
- llama.cpp itself (skipped unless llama-cpp-python is installed): the GGUF export of an imported
  model greedy-decodes the tokens our engine does.
"""

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from lmstack.chatformat import CHAT_TEMPLATE_JINJA, chat_format  # noqa: E402
from lmstack.cli import main  # noqa: E402
from lmstack.config import ModelConfig  # noqa: E402
from lmstack.engine import generate  # noqa: E402
from lmstack.export.gguf import LLAMA3_SPLIT, QWEN2_SPLIT, export_gguf, pre_tokenizer_name  # noqa: E402
from lmstack.export.gguf_import import import_gguf  # noqa: E402
from lmstack.model import GPT  # noqa: E402
from lmstack.modelio import load_model  # noqa: E402
from lmstack.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer  # noqa: E402
from lmstack.utils import UserError, atomic_write_json  # noqa: E402
from test_tokenizer import TRICKY as TOKENIZER_TRICKY  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import fit_windows, save_model_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The calculator says 23 + 58 = 81. What is 2 + 3? It is 5. Paris is in France. hello world.\n"
        "Don't stop: we'll see, they're here; I'm done! Café über naïve 東京 🙂 x=1999, y=2024.\n")
TABLE = TOKENIZER_TRICKY + [
    TEXT, "   leading spaces", "trailing spaces   ", "tabs\t\tand\tmore\t", "crlf\r\nline\r\n\r\n",
    "many\n\n\n\nnewlines", " \n \n ", "  \t \r\n  x", "1234567 3.14159 1,000,000 2024-01-31 ٣٤٥٦ ⅻ ½",
    "I'LL go, don't stop, we've they're it's I'M 'S 'll 'Ve x'sy'tz", "ſ 'ſ Kelvin \u212a",
    "!!!??? ... --- *** ((()))", "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "עברית שלום مرحبا ١٢٣",
    "\u00a0nbsp\u3000ideographic\u2028sep", "\x1c\x1d seps\x1c!  \x1c\x1f \x85\x85",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "a<|im_end|>b", "[[note]] and [[note]]x",
]
CTX = 64
F16 = gguf.GGMLQuantizationType.F16


def field(reader, key):
    return reader.fields[key].contents() if key in reader.fields else None


def rewrite(src, dst, arch=None, fields=None, drop=(), qtype=None, tensor_type=None):
    """A copy of the GGUF file src with its metadata and tensors copied one by one (GGUFWriter):
    fields overridden/added, keys dropped, the 2-D tensors re-quantized to qtype (gguf.quants)
    or, with tensor_type={name: type}, replaced by random blocks of that type."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch or field(r, "general.architecture"))
    fields = dict(fields or {})
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        vtype = f.types[0]
        w.add_key_value(key, fields.pop(key, f.contents()), vtype,
                        sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for key, value in fields.items():
        w.add_string(key, value) if isinstance(value, str) else w.add_float32(key, value)
    rng = np.random.default_rng(0)
    for t in r.tensors:
        a = np.array(t.data)
        kind = (tensor_type or {}).get(t.name)
        if kind is not None:
            w.add_tensor(t.name, random_blocks(kind, a.shape, rng), raw_dtype=kind)
        elif qtype is not None and a.ndim == 2:  # F16 goes in as numpy float16, the rest as raw blocks
            w.add_tensor(t.name, gguf.quants.quantize(a, qtype), raw_dtype=None if qtype == F16 else qtype)
        else:
            w.add_tensor(t.name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def random_blocks(qtype, shape, rng) -> np.ndarray:
    """Random blocks of a quantized type for a [rows, cols] tensor, with sane float16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scale = np.float16(0.01).tobytes()
    # where the float16 scales sit: (offset, count) per block
    at = {gguf.GGMLQuantizationType.Q4_K: [(0, 2)], gguf.GGMLQuantizationType.Q5_K: [(0, 2)],
          gguf.GGMLQuantizationType.Q6_K: [(size - 2, 1)]}.get(qtype, [(0, 1)])
    for off, n in at:
        for k in range(n):
            raw[:, off + 2 * k:off + 2 * k + 2] = np.frombuffer(scale, np.uint8)
    return raw.reshape(rows, -1)


# --- an lmstack model, through GGUF and back -----------------------------------------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "text.txt").write_text(TEXT * 30 + "\n".join(t for t in TABLE if "\x00" not in t) * 5, encoding="utf-8")
    return train_tokenizer([d / "text.txt"], vocab_size=420, out=d / "tok", progress=False)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, tok):
    """Untied head, 4 query / 2 key-value heads, 8 padding rows past the tokenizer; trained for a
    second so its logits are not the near-uniform ones of a random model."""
    cfg = ModelConfig(vocab_size=tok.vocab_size + 8, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=CTX, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6)
    torch.manual_seed(0)
    model = GPT(cfg)
    fit_windows(model, torch.tensor([tok.bos_id] + tok.encode(TEXT * 20)), steps=100)
    return save_model_dir(tmp_path_factory.mktemp("lm"), model, tok)


@pytest.fixture(scope="module")
def lm_gguf(lm_dir, tmp_path_factory):
    return export_gguf(lm_dir, tmp_path_factory.mktemp("g") / "lm-f32.gguf")


def logits(model_dir, ids):
    with torch.inference_mode():
        return load_model(model_dir)(torch.tensor([ids]))[0]


def test_f32_round_trip_is_exact(lm_dir, lm_gguf, tok, tmp_path):
    out = import_gguf(lm_gguf, tmp_path / "imp")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "imported.json", "model.safetensors",
                                                     "run.json", "tokenizer.json"]  # no chat_format.json
    a, b = load_model(lm_dir), load_model(out)
    assert a.cfg == b.cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    from lmstack.tokenizer import Tokenizer

    theirs = Tokenizer.load(out)
    for text in TABLE:
        assert theirs.encode(text) == tok.encode(text), text
        assert theirs.decode(tok.encode(text)) == text
    assert theirs.special_ids == tok.special_ids and theirs.vocab_size == tok.vocab_size
    info = json.loads((out / "imported.json").read_text())
    assert info["format"] == "gguf" and info["name"] == lm_dir.name and info["license"] is None
    assert info["tensor_types"] == {"F32": 2 * 9 + 3}
    spec = json.loads((out / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"] == json.loads(tok.to_str())["pre_tokenizer"] and spec["post_processor"] is None


# max |logit error| / max |logit| over a 48-token prompt (max |logit| 14.8), measured with this test's
# model: F16 0.0002, BF16 0.0016, Q8_0 0.0067, Q5_1 0.038, Q5_0 0.049, Q4_1 0.063, Q4_0 0.094; top-1
# the same at every position for all. The bounds: about twice that.
QUANT_BOUND = {"F16": 0.0005, "BF16": 0.004, "Q8_0": 0.015, "Q5_1": 0.08, "Q5_0": 0.1, "Q4_1": 0.13, "Q4_0": 0.2}


@pytest.mark.parametrize("qtype", list(QUANT_BOUND))
def test_quantized_files_import_within_the_quantization_error(lm_dir, lm_gguf, tok, tmp_path, qtype):
    q = gguf.GGMLQuantizationType[qtype]
    file = rewrite(lm_gguf, tmp_path / f"lm-{qtype}.gguf", qtype=q)
    out = import_gguf(file, tmp_path / "imp")
    # the weights are gguf's dequantization of the file (q/k rows un-permuted)
    r = {t.name: t for t in gguf.GGUFReader(file).tensors}
    got = load_model(out).state_dict()
    emb = gguf.quants.dequantize(np.array(r["token_embd.weight"].data), q)
    assert r["token_embd.weight"].tensor_type == q and np.array_equal(got["embed_tokens.weight"].numpy(), emb)
    ids = [tok.bos_id] + tok.encode(TEXT)[:47]
    ours, theirs = logits(lm_dir, ids), logits(out, ids)
    err = ((theirs - ours).abs().max() / ours.abs().max()).item()
    agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
    print(f"{qtype}: max |logit error| / max |logit| = {err:.4f} (max |logit| {ours.abs().max():.2f}), "
          f"top-1 agreement {agree:.3f}")
    assert 0 < err < QUANT_BOUND[qtype], err
    assert agree >= 0.9, agree


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_and_halves_import_as_gguf_dequantizes_them(tmp_path, qtype):
    """The gguf package has no K-quant quantizer: a model whose matrices are random K-quant blocks
    (rows of 256) imports as gguf.quants.dequantize reads them, q/k rows un-permuted."""
    from lmstack.tokenizer import Tokenizer

    d = tmp_path / "m"
    (tmp_path / "t.txt").write_text(TEXT * 20)
    tk = train_tokenizer([tmp_path / "t.txt"], vocab_size=300, out=tmp_path / "tok", progress=False)
    assert isinstance(tk, Tokenizer)
    cfg = ModelConfig(vocab_size=tk.vocab_size, n_layer=1, n_head=4, d_model=256, ffn_hidden=256, max_seq_len=CTX)
    torch.manual_seed(0)
    d.mkdir()
    save_model_dir(d, GPT(cfg), tk)
    f32 = export_gguf(d, tmp_path / "f32.gguf")
    q = gguf.GGMLQuantizationType[qtype]
    names = [t.name for t in gguf.GGUFReader(f32).tensors if len(t.shape) == 2]
    file = rewrite(f32, tmp_path / "q.gguf", tensor_type={n: q for n in names})
    got = load_model(import_gguf(file, tmp_path / "imp")).state_dict()
    r = {t.name: t for t in gguf.GGUFReader(file).tensors}
    want = torch.from_numpy(gguf.quants.dequantize(np.array(r["blk.0.attn_q.weight"].data), q).reshape(256, 256))
    want = want.reshape(4, 32, 2, 256).swapaxes(1, 2).reshape(256, 256)  # llama.cpp's q rows -> ours
    assert r["blk.0.attn_q.weight"].tensor_type == q
    assert torch.equal(got["layers.0.self_attn.q_proj.weight"], want) and want.abs().max() > 0
    down = gguf.quants.dequantize(np.array(r["blk.0.ffn_down.weight"].data), q).reshape(256, 256)
    assert np.array_equal(got["layers.0.mlp.down_proj.weight"].numpy(), down)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_refusals_are_one_line_and_name_the_thing(lm_gguf, tmp_path, capsys):
    T = gguf.GGMLQuantizationType
    cases = [
        (dict(arch="qwen2"), "'qwen2'"),
        (dict(fields={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}), "'linear'"),
        (dict(fields={"tokenizer.ggml.model": "llama"}), "SentencePiece"),
        (dict(fields={"tokenizer.ggml.pre": "viking"}), "'viking'"),
        (dict(tensor_type={"blk.0.ffn_up.weight": T.Q8_1}), "blk.0.ffn_up.weight is Q8_1"),
        (dict(tensor_type={"blk.1.attn_v.weight": T.IQ4_NL}), "IQ4_NL"),
    ]
    for i, (kw, needle) in enumerate(cases):
        file = rewrite(lm_gguf, tmp_path / f"{i}.gguf", **kw)
        rc, out, err = run_cli(capsys, "import", "gguf", file, "--out", tmp_path / f"out{i}")
        assert rc == 2 and out == "" and err.count("\n") == 1 and needle in err, (kw, err)
        assert not (tmp_path / f"out{i}").exists()
    rc, _, err = run_cli(capsys, "import", "gguf", tmp_path / "missing.gguf", "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in err
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    rc, _, err = run_cli(capsys, "import", "gguf", tmp_path / "junk.gguf", "--out", tmp_path / "o")
    assert rc == 2 and "not a readable GGUF" in err and err.count("\n") == 1
    rc, out, err = run_cli(capsys, "import", "gguf", "--from", lm_gguf, "--out", tmp_path / "ok")
    assert rc == 0 and (tmp_path / "ok" / "model.safetensors").is_file() and err == ""
    rc, _, err = run_cli(capsys, "import", "gguf", lm_gguf, "--out", tmp_path / "ok")
    assert rc == 2 and "--force" in err


# --- a foreign byte-level model: its own tokenizer and chat format -------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# llama.cpp's name -> (the Hugging Face pre-tokenizer that splits the same way, ignore_merges)
FOREIGN = {
    "llama-bpe": (lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True),
    "smollm": (lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False),
    "gpt-2": (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),
    "qwen2": (lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False),
}


def foreign_tokenizer(name: str, corpus: str) -> HFTokenizer:
    """A ChatML-style byte-level BPE with `name`'s pre-tokenizer, trained on corpus; specials
    <|endoftext|> <|im_start|> <|im_end|> at ids 0-2 and one plain added token, "[[note]]"."""
    pre, ignore_merges = FOREIGN[name]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre()
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=450, special_tokens=CHATML_SPECIALS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         show_progress=False))
    spec = json.loads(hf.to_str())
    spec["model"]["ignore_merges"] = ignore_merges
    hf = HFTokenizer.from_str(json.dumps(spec))
    hf.add_tokens([AddedToken("[[note]]", special=False, normalized=False)])
    return hf


def foreign_folder(d, hf: HFTokenizer, train_steps=0, seed=0):
    """An imported model's folder as `import hf` writes one: its own tokenizer.json,
    chat_format.json, imported.json, config and weights."""
    d.mkdir(parents=True)
    (d / "tokenizer.json").write_text(hf.to_str(pretty=True))
    atomic_write_json(d / "chat_format.json", {
        "template": CHATML, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "add_bos": False, "stop_tokens": ["<|im_end|>", "<|endoftext|>"]})
    atomic_write_json(d / "imported.json", {"source": "test", "model_type": "llama", "license": "apache-2.0",
                                            "name": "Foreign-Chat"})
    cfg = ModelConfig(vocab_size=hf.get_vocab_size() + 5, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=CTX)
    torch.manual_seed(seed)
    model = GPT(cfg)
    if train_steps:
        fit_windows(model, torch.tensor(hf.encode(TEXT * 20).ids), steps=train_steps)
    from lmstack.modelio import save_weights
    import dataclasses

    save_weights(model, d / "model.safetensors")
    atomic_write_json(d / "config.json", dataclasses.asdict(cfg))
    return d


@pytest.fixture(scope="module")
def corpus():
    return TEXT * 30 + "\n".join(t for t in TABLE if "\x00" not in t) * 5


@pytest.fixture(scope="module", params=list(FOREIGN))
def foreign(request, corpus, tmp_path_factory):
    """(llama.cpp name, HF tokenizer, imported folder, its GGUF export)."""
    hf = foreign_tokenizer(request.param, corpus)
    d = foreign_folder(tmp_path_factory.mktemp("foreign") / request.param, hf)
    return request.param, hf, d, export_gguf(d, d.parent / f"{request.param}.gguf")


def encode(hf, text, special=False):
    hf.encode_special_tokens = not special
    return hf.encode(text, add_special_tokens=False).ids


def test_export_of_an_imported_model_writes_its_own_tokenizer_and_format(foreign):
    name, hf, d, file = foreign
    r = gguf.GGUFReader(file)
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == name
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    n = hf.get_vocab_size()
    assert tokens[:n] == [hf.id_to_token(i) for i in range(n)] and len(tokens) == n + 5
    T = gguf.TokenType
    assert types == [T.CONTROL] * 3 + [T.NORMAL] * (n - 4) + [T.USER_DEFINED] + [T.UNUSED] * 5
    assert "tokenizer.ggml.bos_token_id" not in r.fields and field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.eos_token_id") == 0 and field(r, "tokenizer.ggml.padding_token_id") == 0
    assert field(r, "tokenizer.ggml.eot_token_id") == hf.token_to_id("<|im_end|>")
    assert field(r, "tokenizer.chat_template") == CHATML
    assert field(r, "general.license") == "apache-2.0" and field(r, "general.name") == "Foreign-Chat"


def test_import_of_a_foreign_gguf_keeps_its_tokenizer_and_format(foreign, tmp_path):
    name, hf, d, file = foreign
    out = import_gguf(file, tmp_path / "imp")
    back = HFTokenizer.from_file(str(out / "tokenizer.json"))
    for text in TABLE:
        assert encode(back, text) == encode(hf, text), (name, text)
        assert encode(back, text, special=True) == encode(hf, text, special=True), (name, text)
        assert back.decode(encode(hf, text), skip_special_tokens=False) == text
    fmt = json.loads((out / "chat_format.json").read_text())
    assert fmt == {"template": CHATML, "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "add_bos": False, "stop_tokens": ["<|im_end|>", "<|endoftext|>"],
                   "source": str(file.resolve())}
    info = json.loads((out / "imported.json").read_text())
    assert (info["license"], info["name"], info["pre_tokenizer"]) == ("apache-2.0", "Foreign-Chat", name)
    assert pre_tokenizer_name(json.loads(back.to_str()), "x") == name
    assert [t.content for t in back.get_added_tokens_decoder().values() if t.special] == CHATML_SPECIALS
    assert not any(t in back.get_vocab() for t in SPECIAL_TOKENS)  # lmstack's specials not appended
    ids = encode(hf, TEXT)[:40]
    assert torch.equal(logits(d, ids), logits(out, ids))
    # and once more through GGUF: the same file, byte for byte
    again = export_gguf(out, tmp_path / "again.gguf")
    r1, r2 = gguf.GGUFReader(file), gguf.GGUFReader(again)
    assert {k: field(r1, k) for k in r1.fields if k.startswith("tokenizer.")} == \
        {k: field(r2, k) for k in r2.fields if k.startswith("tokenizer.")}


def test_a_gguf_with_no_template_gets_lmstacks_specials_appended(foreign, tmp_path):
    name, hf, d, file = foreign
    if name != "gpt-2":
        pytest.skip("one pre-tokenizer is enough")
    bare = rewrite(file, tmp_path / "bare.gguf", drop={"tokenizer.chat_template", "tokenizer.ggml.eot_token_id"})
    out = import_gguf(bare, tmp_path / "imp")
    fmt = json.loads((out / "chat_format.json").read_text())
    # no eot id: llama.cpp's own guess by name finds <|im_end|>
    assert fmt["template"] is None and fmt["stop_tokens"] == ["<|im_end|>", "<|endoftext|>"]
    back = HFTokenizer.from_file(str(out / "tokenizer.json"))
    assert [back.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(hf.get_vocab_size(), hf.get_vocab_size() + 16))
    cfg = load_model(out).cfg
    assert cfg.vocab_size == hf.get_vocab_size() + 16  # the 5 padding rows dropped, 16 appended
    assert json.loads((out / "imported.json").read_text())["added_special_tokens"] == SPECIAL_TOKENS


def unknown_pre_tokenizer_folder(d, corpus):
    """An imported model's folder whose pre-tokenizer (Whitespace, then ByteLevel) no exporter knows by name."""
    hf = foreign_tokenizer("gpt-2", corpus)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return foreign_folder(d, hf)


def test_export_refuses_a_pre_tokenizer_llama_cpp_has_no_name_for(corpus, tmp_path):
    d = unknown_pre_tokenizer_folder(tmp_path / "m", corpus)
    with pytest.raises(UserError, match="none that llama.cpp has by name.*Whitespace"):
        export_gguf(d, tmp_path / "m.gguf")
    spec = json.loads(foreign_tokenizer("smollm", corpus).to_str())
    spec["model"]["ignore_merges"] = True  # llama.cpp has ignore_merges for Llama 3's split only
    with pytest.raises(UserError, match="with ignore_merges"):
        pre_tokenizer_name(spec, "x")
    assert not (tmp_path / "m.gguf").exists()


def test_lmstack_template_with_its_specials_is_an_lmstack_model(lm_gguf, tmp_path):
    """The rule for no chat_format.json: lmstack's 16 specials AND its template."""
    other = rewrite(lm_gguf, tmp_path / "o.gguf", fields={"tokenizer.chat_template": CHATML})
    out = import_gguf(other, tmp_path / "imp")
    fmt = json.loads((out / "chat_format.json").read_text())
    assert fmt["template"] == CHATML and fmt["bos_token"] == "<|bos|>" and fmt["add_bos"] is True
    assert fmt["stop_tokens"] == ["<|end|>", "<|eos|>"] and fmt["pad_token"] == "<|pad|>"
    assert field(gguf.GGUFReader(lm_gguf), "tokenizer.chat_template") == CHAT_TEMPLATE_JINJA


# --- llama.cpp itself (skipped unless llama-cpp-python is installed) -------------------------------

@pytest.mark.parametrize("pre", ["llama-bpe", "smollm", "gpt-2", "qwen2"])
def test_llama_cpp_runs_the_export_of_an_imported_model_like_our_engine(corpus, tmp_path, pre):
    llama_cpp = pytest.importorskip("llama_cpp")
    hf = foreign_tokenizer(pre, corpus)
    d = foreign_folder(tmp_path / "m", hf, train_steps=150)
    file = export_gguf(d, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(file), n_ctx=CTX, n_threads=1, n_batch=CTX, verbose=False)
    model = load_model(d)
    for prompt in ["The calculator says", "What is 2 + 3? It is", "Paris is in"]:
        ids = encode(hf, prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
        ours = generate(model, ids, max_tokens=20, temperature=0.0)
        assert len(set(ours)) > 3, "the tiny model should not be degenerate"
        llm.reset()
        llm.eval(ids)
        theirs = []
        for _ in range(20):
            theirs.append(int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1),
                                                              shape=(llm.n_vocab(),)))))
            llm.eval(theirs[-1:])
        assert theirs == ours, prompt
    text = "<|im_start|>user\nhi<|im_end|>\n"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == encode(hf, text, special=True)
    # llama-cpp-python's chat completion renders the file's template: the ids lmstack's own format renders
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5."}, {"role": "user", "content": "And 4 + 4?"}]
    fmt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="<|endoftext|>",
                              bos_token="")(messages=messages)
    theirs = llm.tokenize(fmt.prompt.encode(), add_bos=False, special=True)
    assert theirs == chat_format(Tokenizer.load(d)).render(messages, add_generation_prompt=True)[0]
