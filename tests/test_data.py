import json
import random

import numpy as np
import pytest
import torch

from lmstack.data import TokenBatches, iter_eval_windows, load_manifest, open_split, prepare
from lmstack.sources import iter_documents
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.utils import UserError
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

WORDS = "the cat sat on a mat with its hat ; über café 東京 🙂 42 1999 don't <|user|>".split()


def sentence(rng, lo=3, hi=40):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    corpus = root / "corpus"
    corpus.mkdir()
    with open(corpus / "c.jsonl", "w", encoding="utf-8") as f:
        for _ in range(100):
            f.write(json.dumps({"text": sentence(rng)}) + "\n")
    train_tokenizer([corpus], vocab_size=320, out=root / "tok", progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def make_mixed(folder):
    """A folder of good and bad inputs; returns the good documents in reading order."""
    rng = random.Random(1)
    (folder / "sub").mkdir(parents=True)
    good = []
    a = "A text file.\n\nWith two paragraphs, café 🙂."
    (folder / "a.txt").write_text(a, encoding="utf-8")
    good.append(a)
    rows = [sentence(rng) for _ in range(30)]
    with open(folder / "b.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"text": r, "id": i}) + "\n")
            if i == 3:
                f.write("{this is not json\n")
            if i == 5:
                f.write(json.dumps({"title": "no text field"}) + "\n")
    good += rows
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    prows = [sentence(rng) for _ in range(25)]
    pq.write_table(pa.table({"text": prows, "n": list(range(25))}), folder / "c.parquet", row_group_size=10)
    good += prows
    (folder / "empty.txt").write_text("")
    (folder / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (folder / "sub" / "binary.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    md = "# Notes\n\n* <|bos|> is just text here\n"
    (folder / "sub" / "notes.md").write_text(md, encoding="utf-8")
    good.append(md)
    (folder / "sub" / "ignored.csv").write_text("a,b\n1,2\n")  # unsupported type: not read
    (folder / ".hidden.txt").write_text("hidden files are never data")
    return good


def split_docs(tok, arr):
    """Cut a token array at BOS and decode each document."""
    cuts = np.flatnonzero(arr == tok.bos_id).tolist() + [len(arr)]
    assert cuts[0] == 0
    return [tok.decode(arr[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def test_iter_documents_mixed_folder(tmp_path):
    good = make_mixed(tmp_path / "in")
    skipped = []
    docs = list(iter_documents([tmp_path / "in"], skipped=skipped))
    assert docs == good
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in skipped}
    assert set(reasons) == {"empty.txt", "latin1.txt", "binary.txt", "b.jsonl"}
    assert "empty" in reasons["empty.txt"] and "UTF-8" in reasons["latin1.txt"]
    assert "binary" in reasons["binary.txt"]
    assert "1 bad JSON" in reasons["b.jsonl"] and "1 line(s) without" in reasons["b.jsonl"]
    # globs, explicit files and a file named twice (read once)
    assert list(iter_documents([str(tmp_path / "in" / "*.txt"), tmp_path / "in" / "a.txt"])) == good[:1]
    with pytest.raises(UserError, match="matched no"):
        iter_documents([str(tmp_path / "in" / "*.nothing")])
    with pytest.raises(UserError, match="not found"):
        iter_documents([tmp_path / "missing.jsonl"])
    with pytest.raises(UserError, match="unsupported"):
        iter_documents([tmp_path / "in" / "sub" / "ignored.csv"])


def test_prepare_mixed_folder(tmp_path, tok, tok_dir, capsys):
    good = make_mixed(tmp_path / "in")
    m = prepare([tmp_path / "in"], tok_dir, tmp_path / "out", val_fraction=0.1, workers=1, progress=False)
    assert "documents" in capsys.readouterr().out
    assert m == load_manifest(tmp_path / "out")
    expected = sum(len([tok.bos_id] + tok.encode(t)) for t in good)
    assert m["tokens"]["train"] + m["tokens"]["val"] == expected
    assert m["documents"]["train"] + m["documents"]["val"] == len(good)
    assert m["documents"]["val"] == len(good) // 10
    assert m["bytes"]["train"] + m["bytes"]["val"] == sum(len(t.encode()) for t in good)
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["bos_id"] == 0
    assert len(m["skipped"]) == 4
    docs = {}
    for split in ["train", "val"]:
        parts = []
        for shard in m["shards"][split]:
            f = tmp_path / "out" / shard["file"]
            assert f.stat().st_size == shard["tokens"] * 2
            parts.append(np.fromfile(f, dtype="<u2"))
        arr = np.concatenate(parts)
        assert len(arr) == m["tokens"][split] == len(open_split(tmp_path / "out", split))
        np.testing.assert_array_equal(open_split(tmp_path / "out", split)[:], arr)
        docs[split] = split_docs(tok, arr)
    # every good document is there, once, in input order within each split
    assert sorted(docs["train"] + docs["val"]) == sorted(good)
    assert docs["train"] == [t for t in good if t in docs["train"]]
    assert Tokenizer.load(tmp_path / "out").to_str() == tok.to_str()


def test_prepare_deterministic_across_workers_and_shards(tmp_path, tok_dir):
    make_mixed(tmp_path / "in")
    kw = dict(val_fraction=0.2, shard_tokens=300, docs_per_task=4, progress=False)
    m1 = prepare([tmp_path / "in"], tok_dir, tmp_path / "w1", workers=1, **kw)
    m2 = prepare([tmp_path / "in"], tok_dir, tmp_path / "w2", workers=2, **kw)
    assert m1 == m2 and len(m1["shards"]["train"]) > 2
    for split in ["train", "val"]:
        for shard in m1["shards"][split]:
            assert (tmp_path / "w1" / shard["file"]).read_bytes() == (tmp_path / "w2" / shard["file"]).read_bytes()
        # slices that cross shard boundaries read the same as the concatenation
        s = open_split(tmp_path / "w1", split)
        full = np.concatenate([np.fromfile(tmp_path / "w1" / sh["file"], "<u2") for sh in m1["shards"][split]])
        for a, b in [(0, len(s)), (250, 700), (299, 301), (len(s) - 5, len(s))]:
            np.testing.assert_array_equal(s[a:b], full[a:b])


def test_prepare_val_split_rules(tmp_path, tok_dir):
    (tmp_path / "two.jsonl").write_text('{"text": "one doc"}\n{"text": "two doc"}\n')
    m = prepare([tmp_path / "two.jsonl"], tok_dir, tmp_path / "o1", progress=False)
    assert m["documents"] == {"train": 1, "val": 1}  # at least one val doc, even at 1%
    (tmp_path / "one.txt").write_text("only one document")
    m = prepare([tmp_path / "one.txt"], tok_dir, tmp_path / "o2", progress=False)
    assert m["documents"] == {"train": 1, "val": 0} and m["shards"]["val"] == []
    with pytest.raises(UserError, match="no val tokens"):
        open_split(tmp_path / "o2", "val")
    m = prepare([tmp_path / "two.jsonl"], tok_dir, tmp_path / "o3", val_fraction=0, progress=False)
    assert m["documents"] == {"train": 2, "val": 0}
    with pytest.raises(UserError, match="val-fraction"):
        prepare([tmp_path / "two.jsonl"], tok_dir, tmp_path / "o4", val_fraction=1.0)


def test_prepare_errors_leave_no_output(tmp_path, tok_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.md").write_text("   \n")
    (bad / "bin.txt").write_bytes(b"\x00" * 10)
    (bad / "x.jsonl").write_text("nope\n")
    with pytest.raises(UserError, match="no usable documents"):
        prepare([bad], tok_dir, tmp_path / "out", workers=2, progress=False)
    with pytest.raises(UserError, match="not found"):
        prepare([tmp_path / "missing"], tok_dir, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="tokenizer not found"):
        prepare([bad], tmp_path / "no_tok", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    (bad / "ok.txt").write_text("finally some text")
    with pytest.raises(UserError, match="not empty"):
        prepare([bad], tok_dir, tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "keep").exists()
    prepare([bad], tok_dir, tmp_path / "full", force=True, progress=False)
    assert not (tmp_path / "full" / "keep").exists() and (tmp_path / "full" / "manifest.json").exists()


def test_load_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(UserError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": 99}')
    with pytest.raises(UserError, match="format"):
        load_manifest(tmp_path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tok_dir):
    root = tmp_path_factory.mktemp("data")
    rng = random.Random(2)
    with open(root / "d.jsonl", "w", encoding="utf-8") as f:
        for _ in range(200):
            f.write(json.dumps({"text": sentence(rng, 10, 60)}) + "\n")
    prepare([root / "d.jsonl"], tok_dir, root / "out", val_fraction=0.1, shard_tokens=1000,
            workers=1, progress=False)
    return root / "out"


def test_token_batches_shift_and_source(data_dir):
    tb = TokenBatches(data_dir, batch_size=4, seq_len=16, seed=3)
    full = open_split(data_dir, "train")[:].astype(np.int64)
    assert len(open_split(data_dir, "train").arrays) > 1  # windows may cross shards
    for _ in range(5):
        x, y = tb.next()
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            hits = [o for o in range(len(full) - 16) if np.array_equal(full[o:o + 16], row_x)]
            assert hits and any(np.array_equal(full[o + 1:o + 17], row_y) for o in hits)


def test_token_batches_ranks_match_one_big_batch(data_dir):
    one = TokenBatches(data_dir, batch_size=6, seq_len=8, seed=1)
    ranks = [TokenBatches(data_dir, batch_size=3, seq_len=8, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, y = one.next()
        parts = [tb.next() for tb in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(y, torch.cat([p[1] for p in parts]))
    other_seed = TokenBatches(data_dir, batch_size=6, seq_len=8, seed=2)
    assert not torch.equal(other_seed.next()[0], TokenBatches(data_dir, batch_size=6, seq_len=8, seed=1).next()[0])


def test_token_batches_resume(data_dir):
    a = TokenBatches(data_dir, batch_size=2, seq_len=8, seed=7)
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    expected = [a.next() for _ in range(3)]
    b = TokenBatches(data_dir, batch_size=2, seq_len=8, seed=7)
    b.load_state_dict(state)
    for (x, y), (bx, by) in zip(expected, [next(b) for _ in range(3)]):
        assert torch.equal(x, bx) and torch.equal(y, by)


def test_token_batches_copy_rows(data_dir):
    """copy_fraction: exactly that fraction of the global batches' rows, evenly spread, is the copying
    task (a fresh sequence of distinct allowed tokens, repeated), counted only where a look back
    predicts the token; the other rows are the text windows they would have been; resumable, and
    2 ranks see what 1 rank of twice the batch sees."""
    ids = np.arange(20, 120)
    plain = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5)
    tb = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.25, copy_ids=ids)
    seen = set()
    for _ in range(4):
        px, py = plain.next()
        x, y, mask = tb.next()
        copied = [i for i in range(8) if not mask[i].all()]
        assert copied == [3, 7]  # rows k with int((k + 1) / 4) > int(k / 4)
        for i in range(8):
            if i not in copied:
                assert torch.equal(x[i], px[i]) and torch.equal(y[i], py[i]) and mask[i].all()
                continue
            row = torch.cat([x[i], y[i][-1:]]).tolist()
            n = int((~mask[i]).sum())  # the sequence's length: nothing counted before its repeat
            assert 8 <= n <= 16 and len(set(row[:n])) == n and set(row) <= set(ids.tolist())
            assert row == (row[:n] * 10)[:33]
            assert mask[i][n:].all() and torch.equal(x[i][1:], y[i][:-1])
            seen.add(tuple(row[:n]))
    assert len(seen) == 8  # fresh every row and step
    again = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.25, copy_ids=ids)
    again.load_state_dict({"step": 3})
    ranks = [TokenBatches(data_dir, batch_size=4, seq_len=32, seed=5, rank=r, world_size=2, copy_fraction=0.25,
                          copy_ids=ids) for r in range(2)]
    for r in ranks:
        r.load_state_dict({"step": 3})
    parts = [r.next() for r in ranks]
    for a, b, c in zip((x, y, mask), again.next(), zip(*parts)):
        assert torch.equal(a, b) and torch.equal(a, torch.cat(c))
    # A fraction below one row a batch is counted over the steps: 0.1 of 8-row batches is 8 rows in 10 steps.
    tenth = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.1, copy_ids=ids)
    per_step = [int((~tenth.next()[2]).any(1).sum()) for _ in range(10)]
    assert sum(per_step) == 8 and max(per_step) == 1


def test_copy_rows_only_in_the_first_steps(data_dir):
    """copy_steps: the copy rows of the first copy_steps steps are those of copy rows throughout;
    after them every row is the text window it would have been, with a mask that counts it all
    (or copy_fraction_after of them are copy rows); a resumed stream knows which side of copy_steps
    it is on."""
    ids = np.arange(20, 120)
    plain = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5)
    always = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids)
    early = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids, copy_steps=2)
    for step in range(4):
        (px, py), (ax, ay, amask), (x, y, mask) = plain.next(), always.next(), early.next()
        if step < 2:
            assert torch.equal(x, ax) and torch.equal(y, ay) and torch.equal(mask, amask) and not mask.all()
        else:
            assert torch.equal(x, px) and torch.equal(y, py) and mask.all()
    resumed = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids, copy_steps=2)
    resumed.load_state_dict({"step": 1})
    assert not resumed.next()[2].all() and resumed.next()[2].all()
    # copy_fraction_after: from copy_steps on, that fraction of the rows (here a quarter: rows 3 and 7).
    later = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids, copy_steps=2,
                         copy_fraction_after=0.25)
    masks = [later.next()[2] for _ in range(4)]
    assert [[i for i in range(8) if not m[i].all()] for m in masks] == [[1, 3, 5, 7], [1, 3, 5, 7], [3, 7], [3, 7]]


def test_copy_rows_of_the_texts_own_tokens(data_dir):
    """copy_text_share: that share of the copy rows (evenly spread) repeats the start of the text
    window the row would have been, not random tokens; the same rows are copy rows, the same
    lengths drawn, the rest of the batch untouched; 2 ranks see what 1 rank of twice the batch sees."""
    ids = np.arange(20, 120)
    plain = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5)
    rand = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids)
    half = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids,
                        copy_text_share=0.5)
    for _ in range(3):
        (px, _), (rx, _, rmask), (x, y, mask) = plain.next(), rand.next(), half.next()
        assert torch.equal(mask, rmask)  # the same copy rows, with the same sequence lengths
        texts = []
        for i in range(8):
            row = torch.cat([x[i], y[i][-1:]]).tolist()
            n = int((~mask[i]).sum())
            if mask[i].all():
                assert torch.equal(x[i], px[i])
                continue
            assert row == (row[:n] * 10)[:33]
            texts.append(row[:n] == px[i][:n].tolist())
            assert texts[-1] or row[:n] == torch.cat([rx[i], rx[i][:1]]).tolist()[:n]
        assert texts == [False, True, False, True]  # copy rows j = 0..3: j odd repeat their text
    ranks = [TokenBatches(data_dir, batch_size=4, seq_len=32, seed=5, rank=r, world_size=2, copy_fraction=0.5,
                          copy_ids=ids, copy_text_share=0.5) for r in range(2)]
    again = TokenBatches(data_dir, batch_size=8, seq_len=32, seed=5, copy_fraction=0.5, copy_ids=ids,
                         copy_text_share=0.5)
    for t in (*ranks, again):
        t.load_state_dict({"step": 2})
    parts = [r.next() for r in ranks]
    for a, b in zip(again.next(), zip(*parts)):
        assert torch.equal(a, torch.cat(b))


def test_token_batches_too_short(data_dir):
    n = len(open_split(data_dir, "val"))
    TokenBatches(data_dir, split="val", batch_size=1, seq_len=n - 1).next()  # exactly T+1 tokens
    with pytest.raises(UserError, match="fewer than"):
        TokenBatches(data_dir, split="val", batch_size=1, seq_len=n)
    with pytest.raises(UserError, match="unknown split"):
        TokenBatches(data_dir, split="test")


def test_eval_windows_tile_the_split(data_dir):
    val = open_split(data_dir, "val")[:].astype(np.int64)
    T = 8
    n = (len(val) - 1) // T
    batches = list(iter_eval_windows(data_dir, "val", batch_size=5, seq_len=T))
    x = torch.cat([b[0] for b in batches]).numpy()
    y = torch.cat([b[1] for b in batches]).numpy()
    np.testing.assert_array_equal(x.reshape(-1), val[:n * T])
    np.testing.assert_array_equal(y.reshape(-1), val[1:n * T + 1])
    assert len(list(iter_eval_windows(data_dir, "val", batch_size=5, seq_len=T, max_batches=2))) == 2
    # two ranks: same number of batches each, disjoint windows, together the first 2*(n//2)
    per_rank = [list(iter_eval_windows(data_dir, "val", batch_size=3, seq_len=T, rank=r, world_size=2))
                for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert all(a[0].shape == b[0].shape for a, b in zip(*per_rank))
    rows = [tuple(row) for r in per_rank for b in r for row in b[0].numpy()]
    assert len(rows) == n // 2 * 2
    assert sorted(rows) == sorted(tuple(row) for row in x[:n // 2 * 2])


def test_hf_dataset_by_name_offline(tmp_path, tok_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    f = tmp_path / "local.jsonl"
    f.write_text('{"text": "from a dataset"}\n{"text": "second row"}\n')
    real = datasets.load_dataset
    # No network in tests: the dataset "name" resolves to a local json file through `datasets`.
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, split=None, streaming=False:
                        real("json", data_files=str(f), split=split, streaming=streaming))
    assert list(iter_documents(["someone/some_dataset"])) == ["from a dataset", "second row"]


@pytest.mark.slow
def test_cli_data_prepare(tmp_path, tok_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world, this is a document")
    (tmp_path / "in" / "b.md").write_text("# another one")
    cmd = ["data", "prepare", "--tokenizer", tok_dir]
    ok = run_cli(*cmd, "--input", tmp_path / "in", "--out", tmp_path / "out", "--workers", "2")
    assert ok.returncode == 0, ok.stderr
    assert load_manifest(tmp_path / "out")["documents"] == {"train": 1, "val": 1}
    for bad_args in [["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o2")],
                     ["--input", str(tmp_path / "in"), "--out", str(tmp_path / "out")]]:  # not empty
        bad = run_cli(*cmd, *bad_args)
        assert bad.returncode != 0
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
