"""`lmstack export twofile`: the two files, and run.py against the engine and the tokenizer.

run.py runs where only numpy is installed: `python -S` (no site-packages) with PYTHONPATH
holding links to the venv's numpy and nothing else, so torch, tokenizers, safetensors and
lmstack cannot be imported there (asserted). In that environment its greedy tokens must be the
engine's, its tokenizer must be ours (encode and decode) on tricky strings, and the ids its
chat template builds must be `render_chat`'s. Two tiny models, trained for a second each so
greedy decoding is not one token repeated: a tied head with 4 query / 2 key-value heads, an
untied head with 4 / 1.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.chat import chat_completion
from lmstack.chatformat import TURN_ENDS
from lmstack.cli import main as cli_main
from lmstack.config import ModelConfig
from lmstack.engine import for_inference, generate
from lmstack.model import GPT
from lmstack.export import run as runpy_module
from lmstack.chatformat import render_chat
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.tools import default_registry
from lmstack.tools.calculator import calculator
from lmstack.modelio import load_model
from lmstack.export.twofile import export_twofile
from tiny import fit_windows, save_model_dir  # noqa: E402  (tests/ is on sys.path)

CTX = 96
TEXT = "The calculator says 23 + 58 = 81. What is 2 + 3? It is 5. Paris is in France. hello world.\n"
TRICKY = [
    # unicode: accents, CJK, emoji (modifiers, ZWJ sequences, flags), combining marks, RTL, Greek/Cyrillic
    "héllo wörld, naïve café", "日本語のテキスト 中文字符", "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "e\u0301 combining a\u0308\u0323 marks", "עברית שלום", "مرحبا بالعالم ١٢٣", "Ελληνικά кириллица",
    # whitespace runs
    "   leading spaces", "trailing spaces   ", "tabs\t\tand\tmore\t", "crlf\r\nline\r\n\r\n",
    "many\n\n\n\nnewlines", " \n \n ", "", " ", "\t", "\n", "  \t \r\n  x",
    # digits, contractions, punctuation
    "1234567", "3.14159 and 1,000,000 and 2024-01-31", "٣٤٥٦ ⅻ ½ digits",
    "I'LL go, don't stop, we've they're it's I'M 'S 'll 'Ve", "x'sy'tz",
    "!!!??? ... --- *** ((()))", "a+b=c; x:=y && z||w", "\"quoted\" 'single' `back`",
    # special-token look-alikes: plain text, never the special ids
    "<|user|>", "<|end|>", "<|bos|>hello", "<|assistant|> hi <|tool_call|>{}<|/tool_call|>", "<|reserved_0|>",
    "<|", "|>", "<|user|><|end|><|eos|>", "text <|end|> more",
    # controls, odd spaces (Python's \s and the Rust tokenizer's differ on U+001C..U+001F), case folding
    "\x00\x01 control \x7f", "\u00a0nbsp\u3000ideographic\u2028sep", "\u200bzero\u200dwidth\ufeff",
    "\x1c\x1d seps\x1c!  \x1c\x1f \x85\x85", "ſ 'ſ Kelvin \u212a", TEXT,
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A tokenizer trained on TEXT and the tricky strings, so merges span multi-byte
    characters, digits, whitespace runs and "<|"-like punctuation."""
    d = tmp_path_factory.mktemp("tok")
    corpus = "\n".join(t for t in TRICKY if "\x00" not in t)  # the data reader refuses NUL bytes
    (d / "text.txt").write_text(TEXT * 40 + corpus * 10, encoding="utf-8")
    train_tokenizer([d / "text.txt"], vocab_size=420, out=d / "tok", progress=False)
    return d / "tok"


MODELS = {
    "tied-gqa": dict(tie_embeddings=True, n_head=4, n_kv_head=2),
    "untied-gqa": dict(tie_embeddings=False, n_head=4, n_kv_head=1),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model_dir(request, tok_dir, tmp_path_factory):
    """A model folder trained for about a second on TEXT."""
    d = tmp_path_factory.mktemp(request.param)
    tok = Tokenizer.load(tok_dir)
    tok.save(d)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, ffn_hidden=64, max_seq_len=CTX,
                      **MODELS[request.param])
    torch.manual_seed(0)
    model = GPT(cfg)
    fit_windows(model, torch.tensor([tok.bos_id] + tok.encode(TEXT * 20)), steps=150)
    return save_model_dir(d, model, tok)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "two"
    export_twofile(model_dir, out)
    return out


def run_numpy_only(numpy_only, args, stdin=None, cwd=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(numpy_only), PYTHONIOENCODING="utf-8", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=cwd or numpy_only, timeout=120)


# Imports the exported run.py as a module (numpy-only environment) and answers JSON requests.
HELPER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import run
req = json.loads(sys.stdin.read())
model, tok = run.load(req["model"])
print(json.dumps({
    "encode": [tok.encode(t) for t in req["encode"]],
    "decode": [tok.decode(ids) for ids in req["decode"]],
    "decode_skip": [tok.decode(ids, skip_special=True) for ids in req["decode"]],
    "chat": [run.render_chat(tok, m, g) for m, g in req["chats"]],
    "greedy": [list(run.generate(model, ids, n, 0.0, stop_ids=set(stop))) for ids, n, stop in req["greedy"]],
    "sampled": [list(run.generate(model, ids, n, 1.0, k, p, np.random.default_rng(s))) for ids, n, k, p, s in req["sampled"]],
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tokenizers", "safetensors", "lmstack")),
}))
"""


def ask(numpy_only, exported, **req) -> dict:
    req = {"encode": [], "decode": [], "chats": [], "greedy": [], "sampled": [], **req}
    (numpy_only / "helper.py").write_text(HELPER)
    r = run_numpy_only(numpy_only, [numpy_only / "helper.py", exported],
                       stdin=json.dumps({"model": str(exported / "model.safetensors"), **req}))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["modules"] == []
    return out


def engine_greedy(model_dir, ids, n, stop_ids):
    return generate(for_inference(load_model(model_dir), "fp32"), ids, n, temperature=0, stop_ids=stop_ids)


# --- the export -----------------------------------------------------------------------------------

def test_export_writes_exactly_two_files(model_dir, exported):
    assert sorted(p.name for p in exported.iterdir()) == ["model.safetensors", "run.py"]
    assert (exported / "run.py").read_bytes() == Path(runpy_module.__file__).read_bytes()
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["format"] == "lmstack-twofile"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert json.loads(meta["config"]) == cfg
    tok, embedded = Tokenizer.load(model_dir), Tokenizer.from_str(meta["tokenizer"])
    assert [embedded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
    sd = load_model(model_dir).state_dict()
    assert ("lm_head.weight" in tensors) == (not cfg["tie_embeddings"])  # a tied head is stored once
    assert set(tensors) == set(sd) - ({"lm_head.weight"} if cfg["tie_embeddings"] else set())
    for k, v in tensors.items():
        assert v.dtype == torch.float32 and torch.equal(v, sd[k])


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys):
    assert cli_main(["export", "twofile", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and not (tmp_path / "o").exists()
    out = tmp_path / "busy"
    out.mkdir()
    (out / "stray.txt").write_text("x")
    assert cli_main(["export", "twofile", "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert cli_main(["export", "twofile", "--model", str(model_dir), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "run.py"]


# --- run.py where only numpy is installed -----------------------------------------------------------

def test_the_environment_has_only_numpy(numpy_only):
    r = run_numpy_only(numpy_only, ["-c", "import numpy; print(numpy.__version__)"])
    assert r.returncode == 0 and r.stdout.strip() == np.__version__, r.stderr
    for name in ("torch", "tokenizers", "safetensors", "lmstack"):
        r = run_numpy_only(numpy_only, ["-c", f"import {name}"])
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, name


def test_greedy_tokens_are_the_engines(model_dir, exported, numpy_only):
    tok = Tokenizer.load(model_dir)
    stop = [tok.eos_id, tok.bos_id]
    prompts = ["The calculator says", "Paris is", "What is 2 + 3? It is", "", "héllo 日本語 <|end|>  \n"]
    # The command line: text in, ids out.
    for prompt in prompts[:2]:
        r = run_numpy_only(numpy_only, [exported / "run.py", exported / "model.safetensors", prompt,
                                        "-n", "30", "--temperature", "0", "--ids"])
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        ids = [tok.bos_id] + tok.encode(prompt)
        assert got["prompt_ids"] == ids
        assert got["ids"] == engine_greedy(model_dir, ids, 30, set(stop))
        assert len(set(got["ids"])) > 3  # the model says something, not one token over and over
    # More prompts through the module, up to the end of the context (generation stops there).
    cases = [([tok.bos_id] + tok.encode(p), 40, stop) for p in prompts]
    cases.append(([tok.bos_id] + tok.encode(TEXT * 3)[:CTX - 10], 40, []))
    got = ask(numpy_only, exported, greedy=cases)["greedy"]
    for (ids, n, s), g in zip(cases, got):
        assert g == engine_greedy(model_dir, ids, n, set(s))
    assert len(got[-1]) == 9  # 87 prompt tokens + 9 new fill the context of 96 (the last one unfed)
    # And the text it prints is the engine's continuation, decoded.
    r = run_numpy_only(numpy_only, [exported / "run.py", exported / "model.safetensors", "Paris is", "-n", "12",
                                    "--temperature", "0"])
    ids = [tok.bos_id] + tok.encode("Paris is")
    assert r.returncode == 0 and r.stdout == tok.decode(ids + engine_greedy(model_dir, ids, 12, set(stop)),
                                                        skip_special=True) + "\n"


def test_tokenizer_is_ours(model_dir, exported, numpy_only):
    tok = Tokenizer.load(model_dir)
    rng = np.random.default_rng(0)
    id_lists = [tok.encode(t) for t in TRICKY] + [list(range(20)), [0, 7, 4, 1]]
    # random ids: special ids, and byte tokens that split UTF-8 characters (decoded with U+FFFD)
    id_lists += [rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 12))).tolist() for _ in range(200)]
    # every 97th code point in a few contexts: \p{L}, \p{N} and \s as the Rust tokenizer sees them
    chars = [chr(c) for c in range(0, 0x110000, 97) if not 0xD800 <= c <= 0xDFFF]
    probes = ["".join(f"a{c}b 1{c}2 {c}{c} !{c}\n'{c}a  {c}\t" for c in chars[i:i + 200]) for i in range(0, len(chars), 200)]
    got = ask(numpy_only, exported, encode=TRICKY + probes, decode=id_lists)
    for text, ids in zip(TRICKY + probes, got["encode"]):
        assert ids == tok.encode(text), repr(text)
    assert got["decode"] == [tok.decode(ids) for ids in id_lists]
    assert got["decode_skip"] == [tok.decode(ids, skip_special=True) for ids in id_lists]
    assert got["decode"][:len(TRICKY)] == TRICKY
    for look_alike in ("<|user|>", "<|end|>", "<|bos|>hello"):  # never a special id
        assert all(i >= 16 for i in got["encode"][TRICKY.index(look_alike)])


def test_chat_template_and_sampling(model_dir, exported, numpy_only):
    tok = Tokenizer.load(model_dir)
    convs = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello <|end|><|assistant|>"},
         {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "日本語 \n\n ok"}],
    ]
    chats = [(c, g) for c in convs for g in (True, False)]
    stop = [tok.special_ids[t] for t in TURN_ENDS]
    chat_ids = render_chat(tok, convs[1], add_generation_prompt=True)[0]
    ids = [tok.bos_id] + tok.encode("The calculator")
    got = ask(numpy_only, exported, chats=chats, greedy=[(chat_ids, 20, stop)],
              sampled=[(ids, 20, None, None, 7), (ids, 20, None, None, 7), (ids, 20, None, None, 8),
                       (ids, 20, 1, None, 3), (ids, 20, None, 1e-6, 4)])
    assert got["chat"] == [render_chat(tok, c, add_generation_prompt=g)[0] for c, g in chats]
    assert got["greedy"][0] == engine_greedy(model_dir, chat_ids, 20, set(stop))
    a, b, c, top1, nucleus = got["sampled"]
    greedy = engine_greedy(model_dir, ids, 20, set())
    assert a == b and a != c  # seeded, and the seed matters
    assert top1 == greedy and nucleus == greedy  # top-k 1 and a tiny top-p leave only the argmax


def test_chat_repl_is_lmstack_chat(model_dir, exported, numpy_only):
    """Greedy replies, history across turns, /reset: the replies lmstack's chat would give."""
    turns = ["hello", "What is 2 + 3?", "/reset", "Paris is"]
    r = run_numpy_only(numpy_only, [exported / "run.py", exported / "model.safetensors", "--chat", "-n", "12",
                                    "--temperature", "0", "--system", "Be brief."],
                       stdin="\n".join(turns + ["/quit"]) + "\n")
    assert r.returncode == 0, r.stderr
    model, tok = for_inference(load_model(model_dir), "fp32"), Tokenizer.load(model_dir)
    system = [{"role": "system", "content": "Be brief."}]
    history, replies = list(system), []
    for line in turns:
        if line == "/reset":
            history = list(system)
            continue
        history.append({"role": "user", "content": line})
        reply = chat_completion(model, tok, history, tools=default_registry(), temperature=0,
                                max_tokens=12)["message"]["content"]
        replies.append(reply)
        if reply.strip():
            history.append({"role": "assistant", "content": reply})
    header, body = r.stdout.split("\n", 1)
    assert header.startswith("run.py chat")
    want = [f"> {replies[0]}\n", f"> {replies[1]}\n", "> conversation reset\n", f"> {replies[2]}\n", "> "]
    assert body == "".join(want)
    assert any(reply.strip() for reply in replies)


def test_run_py_errors_are_one_line(exported, numpy_only, tmp_path):
    tensors = {"embed_tokens.weight": torch.zeros(4, 4)}
    save_file(tensors, str(tmp_path / "plain.safetensors"), metadata={"format": "pt"})
    (tmp_path / "text.safetensors").write_text("hello, not a weights file")
    weights = exported / "model.safetensors"
    cases = [
        ([tmp_path / "missing.safetensors", "hi"], "not found"),
        ([tmp_path / "text.safetensors", "hi"], "not a safetensors file"),
        ([tmp_path / "plain.safetensors", "hi"], "no lmstack metadata"),
        ([weights, "word " * CTX], "context is 96"),
        ([weights, "hi", "-n", "0"], "-n >= 1"),
        ([weights, "hi", "--top-p", "2"], "--top-p"),
        ([weights, "hi", "--top-p", "0"], "--top-p"),
        ([weights, "hi", "--top-k", "0"], "--top-k"),
    ]
    for args, why in cases:
        r = run_numpy_only(numpy_only, [exported / "run.py", *args])
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("run.py: error:") and r.stdout == ""


def test_reads_half_precision_weights(tmp_path):
    """F16 and BF16 tensors are widened to float32 exactly as torch does."""
    x = torch.randn(3, 5)
    save_file({"h": x.half(), "b": x.bfloat16(), "f": x}, str(tmp_path / "w.safetensors"), metadata={"a": "1"})
    tensors, meta = runpy_module.read_safetensors(str(tmp_path / "w.safetensors"))
    assert meta == {"a": "1"}
    for name, want in (("h", x.half().float()), ("b", x.bfloat16().float()), ("f", x)):
        assert tensors[name].dtype == np.float32 and np.array_equal(tensors[name], want.numpy())


class ScriptedModel:
    """Stands in for run.py's Model: its logits pick the scripted tokens one after another."""

    def __init__(self, script: list[int], vocab: int, ctx: int = CTX):
        self.script, self.vocab, self.ctx, self.prompts = iter(script), vocab, ctx, []

    def prefill(self, ids):
        self.prompts.append(list(ids))
        return self.decode(None)

    def decode(self, token):
        logits = np.zeros(self.vocab, np.float32)
        logits[next(self.script)] = 1.0
        return logits


def test_chat_runs_the_calculator_as_lmstack_does(tok_dir, capsys):
    """A reply with a tool call: the call is run, its result goes back as a `tool` message, the
    model continues, and every prompt is the one lmstack's template renders."""
    tok = Tokenizer.load(tok_dir)
    rtok = runpy_module.Tokenizer(tok.to_str())
    sid = tok.special_ids
    call = '{"name": "calculator", "arguments": {"expression": "23 + 58"}}'
    script = (tok.encode("Let me see.") + [sid["<|tool_call|>"]] + tok.encode(call) + [sid["<|/tool_call|>"], sid["<|end|>"]]
              + tok.encode("It is 81.") + [sid["<|end|>"]])
    model = ScriptedModel(script, tok.vocab_size, ctx=512)
    history = [{"role": "user", "content": "What is 23 + 58?"}]
    opts = argparse.Namespace(n=200, temperature=0.0, top_k=None, top_p=None)
    new = runpy_module.assistant_turn(model, rtok, history, opts, np.random.default_rng(0))
    assert capsys.readouterr().out == "Let me see.\n[calculator] 23 + 58 -> 81\nIt is 81.\n"
    ours = [{"role": "assistant", "content": "Let me see.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "23 + 58"}'}}]},
            {"role": "tool", "content": "81"}, {"role": "assistant", "content": "It is 81."}]
    assert [m["content"] for m in new] == [m["content"] for m in ours]
    assert model.prompts == [render_chat(tok, history, add_generation_prompt=True)[0],
                             render_chat(tok, history + ours[:2], add_generation_prompt=True)[0]]
    assert runpy_module.render_chat(rtok, history + new) == render_chat(tok, history + ours, add_generation_prompt=True)[0]


@pytest.mark.parametrize("expr", ["23 + 58", "6 / 3", "7 / 3", "2 ** 10", "-(-3) + +4", "17 % 5 // 2", "2 ** -2",
                                  "9 ** 0.5", "0.1 + 0.2", "12345678901234567 * 1.0", "  3 * (4 + 5)  ", "1 / 0",
                                  "10 ** 5000", "1e308 * 10", "(-8) ** 0.5", "1 +", "", "((((1))))"])
def test_calculator_is_lmstacks(expr):
    assert runpy_module.calculator(expr) == calculator(expr)


@pytest.mark.parametrize("expr", ["abc", "__import__('os').system('true')", "2 ** 100000", "True + 1", "'a' * 3",
                                  "1 < 2", "x" * 600, "(" * 300 + "1" + ")" * 300])
def test_calculator_refuses(expr):
    assert runpy_module.calculator(expr).startswith("error: ") and calculator(expr).startswith("error: ")


def test_ids_past_the_tokenizer_decode_to_nothing(tok_dir, tmp_path):
    """A model's vocabulary may be larger than its tokenizer's (rounded up): those ids have no text."""
    tok = Tokenizer.load(tok_dir)
    cfg = ModelConfig(vocab_size=tok.vocab_size + 8, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=32)
    d = tmp_path / "model"
    d.mkdir()
    save_model_dir(d, GPT(cfg), tok)
    export_twofile(d, tmp_path / "two")
    _, rtok = runpy_module.load(str(tmp_path / "two" / "model.safetensors"))
    ids = [tok.vocab_size + 3] + tok.encode("hi") + [tok.vocab_size + 7]
    assert rtok.decode(ids) == tok.decode(ids) == "hi"


def test_a_tokenizer_run_py_cannot_reproduce_is_refused(model_dir, tmp_path, capsys):
    """Another split pattern (an imported model's, say): refused at export, not mis-tokenized later."""
    import shutil

    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    spec = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    Tokenizer.load(d)  # lmstack itself reads it
    assert cli_main(["export", "twofile", "--model", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.py cannot run this tokenizer" in err and not (tmp_path / "o").exists()
