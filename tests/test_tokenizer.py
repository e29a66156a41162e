import json
import random

import pytest

from lmstack.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, split_pattern, train_tokenizer
from lmstack.utils import UserError
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

WORDS = ("the cat sat on a mat with its hat ; über café naïve 東京 🙂 42 1999 don't "
         "print(x) <|user|> <| |> \t  \n").split(" ")

TRICKY = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", "\t\t x", "   leading and trailing   ",
    "hello world", "Ünïcödé façade 東京タワー Ελληνικά русский", "emoji 🙂👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "numbers 1234567 3.14159 -0", "code:\n    def f(x):\n\treturn x  # done\n",
    "\x00 nul and \x7f del", "zero\u200bwidth and combining e\u0301",
    "<|bos|>", "<|eos|><|pad|>", "hello <|user|> x", "<|assistant|>\n<|end|>",
    "<|tool_call|>{\"name\": 1}<|/tool_call|>", "<|reserved_5|>", "<|bos", "|>", "<||>",
    "<|BOS|>", "< |bos| >", "<|<|user|>|>", "a<|end|>b",
]


def make_corpus(folder, n_docs=120, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80)))
            f.write(json.dumps({"text": text}) + "\n")
    (folder / "readme.md").write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer([make_corpus(root / "corpus")], vocab_size=400, out=root / "tok", progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def test_special_tokens_have_fixed_ids(tok):
    assert len(SPECIAL_TOKENS) == 16
    assert tok.special_ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.pad_id != tok.eos_id
    assert [tok.id_to_token(i) for i in range(16)] == SPECIAL_TOKENS
    assert 272 <= tok.vocab_size <= 400


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_literals_encode_as_plain_text(tok, special):
    for text in [special, f"hello {special} x", special * 3, f"a{special}b", f"\n{special}\n"]:
        ids = tok.encode(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in ids), (text, ids)
        assert tok.decode(ids) == text
    # batch encoding takes the same path
    assert all(i >= 16 for ids in tok.encode_batch([special, "x" + special]) for i in ids)


def test_round_trip_tricky_strings(tok):
    for text in TRICKY:
        assert tok.decode(tok.encode(text)) == text, repr(text)
    assert [tok.decode(ids) for ids in tok.encode_batch(TRICKY)] == TRICKY


def test_token_bytes_sum_to_utf8_length(tok):
    tb = tok.token_bytes()
    assert len(tb) == tok.vocab_size and tb[:16] == [0] * 16 and min(tb[16:]) >= 1
    for text in TRICKY + ["the cat sat on a mat 東京 🙂 " * 5]:
        assert sum(tb[i] for i in tok.encode(text)) == len(text.encode("utf-8")), repr(text)


def test_decode_with_and_without_specials(tok):
    ids = [tok.bos_id] + tok.encode("hi there") + [tok.special_ids["<|end|>"]]
    assert tok.decode(ids) == "<|bos|>hi there<|end|>"
    assert tok.decode(ids, skip_special=True) == "hi there"


def test_save_load_keeps_encoding_and_safety(tok, tmp_path):
    tok.save(tmp_path / "copy")
    for loaded in [Tokenizer.load(tmp_path / "copy"), Tokenizer.load(tmp_path / "copy" / "tokenizer.json"),
                   Tokenizer.from_str(tok.to_str())]:
        assert loaded.vocab_size == tok.vocab_size
        for text in TRICKY:
            assert loaded.encode(text) == tok.encode(text)
        # the no-specials-from-text flag is not stored in the JSON: it must be re-applied
        assert all(i >= 16 for i in loaded.encode("<|user|><|bos|>"))


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
    # a valid HF tokenizer that is not ours (no special tokens at 0..15)
    from tokenizers import Tokenizer as HF, models
    HF(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(UserError, match="not an lmstack tokenizer"):
        Tokenizer.load(tmp_path)


def test_train_prints_held_out_compression(tmp_path, capsys):
    tok = train_tokenizer([make_corpus(tmp_path / "c", n_docs=60)], vocab_size=300,
                          out=tmp_path / "t", progress=False)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "bytes/token on held-out text" in line and "vocab" in line
    assert tok.vocab_size <= 300 and (tmp_path / "t" / "tokenizer.json").is_file()


def test_train_errors(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=5)
    with pytest.raises(UserError, match="too small"):
        train_tokenizer([corpus], vocab_size=271, out=tmp_path / "t1", progress=False)
    with pytest.raises(UserError, match="not found|matched no"):
        train_tokenizer([tmp_path / "missing.txt"], vocab_size=300, out=tmp_path / "t2", progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.txt").write_text("")
    (bad / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="no usable text"):
        train_tokenizer([bad], vocab_size=300, out=tmp_path / "t3", progress=False)
    assert not any((tmp_path / t).exists() for t in ["t1", "t2", "t3"])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        train_tokenizer([corpus], vocab_size=300, out=tmp_path / "full", progress=False)
    train_tokenizer([corpus], vocab_size=300, out=tmp_path / "full", force=True, progress=False)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["tokenizer.json"]


def _conversations(path, rows=30):
    chat = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Whereabouts of Quixotelandia?"},
                         {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "search"}}]},
                         {"role": "assistant", "content": "Quixotelandia is far."}]}
    path.write_text("".join(json.dumps(chat) + "\n" for _ in range(rows))
                    + json.dumps({"messages": "not a list"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    return path


def test_train_with_conversations(tmp_path, capsys):
    """--conversations: the merges fit fine-tuning's words too (a conversation's messages' contents
    are one document); rows without a list of messages are skipped and said."""
    corpus, chats = make_corpus(tmp_path / "c", n_docs=60), _conversations(tmp_path / "sft.jsonl")
    plain = train_tokenizer([corpus], vocab_size=400, out=tmp_path / "a", progress=False)
    capsys.readouterr()
    both = train_tokenizer([corpus], vocab_size=400, out=tmp_path / "b", progress=False, conversations=[chats])
    said = capsys.readouterr().out
    assert f"skipped {chats}: partly skipped: 2 line(s) without a list of 'messages'" in said
    word = " Quixotelandia"
    assert len(both.encode(word)) == 1 < len(plain.encode(word))
    only = train_tokenizer([], vocab_size=400, out=tmp_path / "o", progress=False, conversations=[chats])
    assert len(only.encode(word)) == 1  # conversations alone are a corpus too
    with pytest.raises(UserError, match="conversations are read from .jsonl files"):
        train_tokenizer([corpus], vocab_size=400, out=tmp_path / "t1", progress=False, conversations=[corpus])
    with pytest.raises(UserError, match="not found"):
        train_tokenizer([corpus], vocab_size=400, out=tmp_path / "t2", progress=False,
                        conversations=[tmp_path / "missing.jsonl"])
    (tmp_path / "none.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UserError, match="no usable text in .*none.jsonl: no usable lines: 1 line"):
        train_tokenizer([], vocab_size=300, out=tmp_path / "t3", progress=False,
                        conversations=[tmp_path / "none.jsonl"])
    assert not any((tmp_path / t).exists() for t in ["t1", "t2", "t3"])


def _numbers_corpus(folder):
    rng = random.Random(1)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sums.jsonl", "w", encoding="utf-8") as f:
        for _ in range(300):
            a, b = rng.randint(0, 99_999), rng.randint(0, 999)
            f.write(json.dumps({"text": f"What is {a} + {b}? It is {a + b}. Then 345 and 2024."}) + "\n")
    return folder


def _split_regex(tok_dir):
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    return [s["pattern"]["Regex"] for s in spec["pre_tokenizer"]["pretokenizers"] if s["type"] == "Split"]


@pytest.mark.parametrize("per_token", [1, 2, 3])
def test_digits_per_token(tmp_path, per_token):
    corpus = _numbers_corpus(tmp_path / "c")
    tok = train_tokenizer([corpus], vocab_size=400, out=tmp_path / "t", progress=False, digits_per_token=per_token)
    ids = tok.encode("What is 1234567 + 345? 2024")
    digit_runs = [tok.decode([i]) for i in ids if any(c.isdigit() for c in tok.decode([i]))]
    assert "".join(digit_runs) == "12345673452024"  # digits never share a token with anything else
    assert max(len(t) for t in digit_runs) == per_token  # the corpus repeats "345" and "2024": learned as far as allowed
    # the split is saved in tokenizer.json: loading needs no option and encodes the same
    assert Tokenizer.load(tmp_path / "t").encode("What is 1234567 + 345? 2024") == ids
    assert _split_regex(tmp_path / "t") == [split_pattern(per_token)]


def test_digits_per_token_default_is_unchanged(tmp_path):
    assert split_pattern() == SPLIT_PATTERN and r"\p{N}{1,3}" in SPLIT_PATTERN
    corpus = _numbers_corpus(tmp_path / "c")
    train_tokenizer([corpus], vocab_size=400, out=tmp_path / "a", progress=False)
    train_tokenizer([corpus], vocab_size=400, out=tmp_path / "b", progress=False, digits_per_token=3)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert _split_regex(tmp_path / "a") == [SPLIT_PATTERN]
    for bad in (0, 4, -1):
        with pytest.raises(UserError, match="--digits-per-token must be 1 to 3"):
            train_tokenizer([corpus], vocab_size=400, out=tmp_path / f"bad{bad}", progress=False, digits_per_token=bad)
        assert not (tmp_path / f"bad{bad}").exists()


@pytest.mark.slow
def test_cli_tokenizer_train(tmp_path):
    corpus = make_corpus(tmp_path / "c", n_docs=20)
    cmd = ["tokenizer", "train", "--vocab-size", "300"]
    ok = run_cli(*cmd, "--input", str(corpus), "--out", str(tmp_path / "t"))
    assert ok.returncode == 0, ok.stderr
    assert "bytes/token" in ok.stdout and (tmp_path / "t" / "tokenizer.json").is_file()
    bad = run_cli(*cmd, "--input", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "t2"))
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "t2").exists()
    chats = run_cli(*cmd, "--input", str(corpus), "--conversations", str(_conversations(tmp_path / "s.jsonl")),
                                  "--vocab-size", "400", "--out", str(tmp_path / "tc"))
    assert chats.returncode == 0, chats.stderr
    assert len(Tokenizer.load(tmp_path / "tc").encode(" Quixotelandia")) == 1
    one = run_cli(*cmd, "--input", str(corpus), "--out", str(tmp_path / "t1"), "--digits-per-token", "1")
    assert one.returncode == 0, one.stderr
    assert [len(Tokenizer.load(tmp_path / "t1").encode(n)) for n in ("42", "1999")] == [2, 4]
    bad = run_cli(*cmd, "--input", str(corpus), "--out", str(tmp_path / "t5"), "--digits-per-token", "5")
    assert bad.returncode != 0 and bad.stderr.strip().endswith("--digits-per-token must be 1 to 3 (got 5)")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "t5").exists()
