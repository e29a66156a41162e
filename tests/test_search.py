"""The search tool (lmstack/tools/search.py): indexing a folder, incremental updates, kill safety,
free-text queries that cannot act as FTS5 syntax, the tool's bounded result, the CLI's one-line
errors, and retrieval on a generated world."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.tools import ToolRegistry
from lmstack.tools import search as S
from lmstack.utils import UserError

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    write(d / "notes.md", "# Lighthouses\n\nThe keeper of Brennock light trimmed the wick every night.\n\n"
                          "Ships passing Brennock saw its beam from twenty miles.\n")
    write(d / "sub" / "recipes.txt", "Barley soup\n\nSimmer the barley with onions for an hour.\n")
    rows = [{"text": "Orla Quennet was born in Vantis and studied astronomy."},
            {"messages": [{"role": "user", "content": "Where does Pim work?"},
                          {"role": "assistant", "content": "Pim works at the Calloway tannery."}]},
            {"prompt": "Name the river.", "completion": "The Sorrel river runs past the mill.", "n": 3},
            {"other": 1}]
    write(d / "data.jsonl", "\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    write(d / ".hidden" / "secret.txt", "Brennock secret")
    write(d / "image.png", "Brennock")
    return d


def test_index_and_query(docs, tmp_path):
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        r = idx.update(docs)
        assert (r.added, r.updated, r.removed, r.unchanged) == (3, 0, 0, 0)  # hidden and .png not read
        assert r.chunks_total == r.chunks_written == 5  # md: 1 passage, txt: 1, jsonl: 3 usable rows
        hits = idx.search("Who kept the Brennock lighthouse?", k=5)
        assert hits[0].source == "notes.md:1" and "keeper of Brennock" in hits[0].text
        assert all(h.path != ".hidden/secret.txt" for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True) and hits[0].score > 0
        assert idx.search("barley onions", 1)[0].source == "sub/recipes.txt:1"
        # jsonl: the text field; the messages' contents; all top-level strings; each row's own line
        assert idx.search("Orla astronomy", 1)[0].source == "data.jsonl:1"
        pim = idx.search("Calloway tannery", 1)[0]
        assert pim.source == "data.jsonl:2" and pim.text == "Where does Pim work?\nPim works at the Calloway tannery."
        assert idx.search("Sorrel river", 1)[0].text == "Name the river.\nThe Sorrel river runs past the mill."
        assert idx.search("stemming: keepers simmering", 2)[0].path in {"notes.md", "sub/recipes.txt"}  # porter
        assert idx.search("zyzzyva", 3) == []
        assert idx.stats() == {"folder": str(docs.resolve()), "files": 3, "passages": 5}


def test_chunking_paragraphs_windows_and_lines():
    text = "para one\nstill one\n\n\n" + words(10, "b") + "\n\n" + words(25, "c") + "\n"
    chunks = S.chunk_text(text, words=12, overlap=4)
    # paragraphs packed while they fit; a long one cut into windows of 12 words overlapping by 4
    assert chunks[0] == (1, "para one still one")  # joined by spaces within a paragraph
    assert chunks[1] == (5, words(10, "b"))  # 4 + 10 > 12 words: a passage of its own
    windows = [t.split() for _, t in chunks[2:]]
    assert [len(w) for w in windows] == [12, 12, 9] and all(line == 7 for line, _ in chunks[2:])
    assert windows[0][-4:] == windows[1][:4] and windows[1][-4:] == windows[2][:4]
    assert windows[2][-1] == "c24"
    assert S.chunk_text("a\n\nb\n") == [(1, "a\nb")]  # packed paragraphs keep a newline between them
    assert S.chunk_text("  \n\n") == []


def test_incremental_updates(tmp_path):
    d = tmp_path / "docs"
    for i in range(4):
        write(d / f"f{i}.txt", f"file {i} mentions quokka{i}\n")
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        r = idx.update(d)
        assert (r.added, r.updated, r.removed, r.unchanged, r.chunks_written) == (4, 0, 0, 0, 4)
        r = idx.update(d)
        assert (r.added, r.updated, r.removed, r.unchanged, r.chunks_written) == (0, 0, 0, 4, 0)
        write(d / "f1.txt", "file 1 now mentions wombat\n")  # changed (its size too)
        (d / "f2.txt").unlink()  # deleted
        write(d / "f4.txt", "a new file about numbats\n")  # added
        os.utime(d / "f3.txt")  # touched: same content, new mtime
        r = idx.update(d)
        assert (r.added, r.updated, r.removed, r.unchanged, r.chunks_written) == (1, 1, 1, 2, 2)
        assert r.chunks_total == 4
        assert idx.search("quokka1", 3) == [] and idx.search("quokka2", 3) == []
        assert idx.search("wombat", 3)[0].path == "f1.txt" and idx.search("numbats", 3)[0].path == "f4.txt"
        # a rewrite of the same size in the same clock tick keeps size and mtime: the hash catches it
        st = (d / "f0.txt").stat()
        write(d / "f0.txt", "file 0 mentions quokkaX\n")
        os.utime(d / "f0.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
        r = idx.update(d)
        assert (r.updated, r.unchanged) == (1, 3) and idx.search("quokkaX", 1)[0].path == "f0.txt"
        # a file that turns binary is skipped with its reason, and its old passages go
        (d / "f4.txt").write_bytes(b"numbats\x00\x01")
        r = idx.update(d)
        assert r.removed == 1 and r.skipped == [{"path": "f4.txt", "reason": "binary (contains NUL bytes)"}]
        assert idx.search("numbats", 3) == [] and "skipped f4.txt: binary" in r.summary()
        # the whole folder gone: every file removed
        for f in d.iterdir():
            f.unlink()
        r = idx.update(d)
        assert (r.removed, r.chunks_total) == (3, 0)


def test_a_stored_mtime_older_than_its_record_is_trusted(tmp_path):
    """Past the racy window an unchanged size and mtime is enough: the file is not read again."""
    d = tmp_path / "docs"
    f = write(d / "a.txt", "hello there\n")
    old = time.time_ns() - 10 * S.RACY_NS
    os.utime(f, ns=(old, old))
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        idx.update(d)
        f.write_text("HELLO THERE\n")  # same size: only a hash would tell
        os.utime(f, ns=(old, old))
        r = idx.update(d)
        assert r.unchanged == 1 and idx.search("hello", 1)[0].text == "hello there"


KILLER = """
import sqlite3, sys, time
from lmstack.tools import search
real, rows = sqlite3.connect, set()
def trace(sql):  # a row's INSERT is traced again for each statement of its trigger: count rows
    if sql.startswith("INSERT INTO chunks"):
        rows.add(sql)
        if len(rows) == int(sys.argv[3]):  # in the middle of a file's transaction
            print("paused", flush=True)
            time.sleep(600)
def connect(*a, **k):
    conn = real(*a, **k)
    conn.set_trace_callback(trace)
    return conn
sqlite3.connect = connect
search.SearchIndex(sys.argv[1], create=True).update(sys.argv[2])
"""


def test_kill_mid_update_leaves_whole_files_and_a_rerun_completes(tmp_path):
    d = tmp_path / "docs"
    per_file = 8
    for i in range(6):  # 8 paragraphs of 100 words: 8 passages a file
        write(d / f"f{i}.md", "\n\n".join(words(100, f"f{i}p{j}w") for j in range(per_file)))
    index = tmp_path / "i.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(index), str(d), str(3 * per_file + 5)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "paused"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with S.SearchIndex(index) as idx:  # opens: the open transaction is rolled back
        stats = idx.stats()
        assert (stats["files"], stats["passages"]) == (3, 3 * per_file)  # three whole files, nothing of the 4th
        conn = sqlite3.connect(index)
        assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 3 * per_file
        assert conn.execute("SELECT count(*) FROM chunks WHERE path NOT IN (SELECT path FROM files)").fetchone()[0] == 0
        conn.execute("INSERT INTO fts(fts) VALUES ('integrity-check')")  # the FTS index matches its chunks
        conn.close()
        assert idx.search("f3p0w1", 1) == []
        r = idx.update(d)
        assert (r.added, r.unchanged, r.chunks_total) == (3, 3, 6 * per_file)
        assert idx.search("f3p0w1", 1)[0].path == "f3.md"


HOSTILE = ['"', '""', "'", "NEAR(", "NEAR(a b, 2)", "*", "a*", "^start", "text:foo", "{text}: foo", "-foo",
           "foo AND", "OR", "NOT x", "(", ")", "foo) OR (bar", '"unterminated', "col:", "+", "\x00", "\\", "_",
           "", "   ", "é", "🙂", "x" * 100_000, " ".join(f"w{i}" for i in range(5000)), "rank:bm25", "fts MATCH *"]


def test_hostile_queries_are_plain_words(docs, tmp_path):
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        idx.update(docs)
        for q in HOSTILE:
            assert isinstance(idx.search(q, 3), list), q  # never an FTS5 syntax error
        # operators and column filters are words, not syntax: text:Brennock finds Brennock
        assert idx.search("text:Brennock", 1)[0].path == "notes.md"
        assert idx.search('"Brennock" NOT keeper', 1)[0].path == "notes.md"
        assert idx.search("NEAR(Brennock", 1)[0].path == "notes.md"
        assert idx.search("", 3) == [] and idx.search('"* : ( )', 3) == []
        for k in (0, S.MAX_K + 1, True, "3"):
            with pytest.raises(ValueError):
                idx.search("Brennock", k)
    assert S.match_expression('text:foo "bar" NEAR(') == '"text" OR "foo" OR "bar" OR "near"'
    assert S.match_expression("What is the") == '"what" OR "is" OR "the"'  # only stopwords: kept
    assert S.match_expression(" ".join(f"w{i}" for i in range(100))).count(" OR ") == S.MAX_QUERY_TERMS - 1


def test_jsonl_rows_without_text_and_odd_line_ends(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    rows = [{"text": "first\u2028row"}, {"text": "second gannet"}]
    (d / "a.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (d / "bad.jsonl").write_text("{not json\n[1, 2]\n")
    (d / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        r = idx.update(d)
        assert r.added == 1 and idx.search("gannet", 1)[0].source == "a.jsonl:2"  # U+2028 is no line end
        assert sorted(s["path"] for s in r.skipped) == ["bad.jsonl", "latin.txt"]
        assert "not UTF-8" in {s["path"]: s["reason"] for s in r.skipped}["latin.txt"]


def _pdf(pages: list[str]) -> bytes:
    """A minimal PDF with one line of Helvetica text per page."""
    n = len(pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)


def test_pdf_pages(tmp_path):
    pytest.importorskip("pypdf")
    d = tmp_path / "docs"
    d.mkdir()
    (d / "paper.pdf").write_bytes(_pdf(["Introduction to tidepools", "The anemone results are here"]))
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        r = idx.update(d)
        hit = idx.search("anemone", 1)[0]
        assert (hit.source, hit.text) == ("paper.pdf p.2", "The anemone results are here")
        assert r.added == 1 and r.skipped[0]["path"] == "broken.pdf" and "unreadable PDF" in r.skipped[0]["reason"]


def test_tool_result_is_bounded_and_sourced(tmp_path):
    d = tmp_path / "docs"
    for i in range(12):
        write(d / f"long{i}.txt", " ".join(["heron"] * (i + 1) + ["filler"] * 110))
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        idx.update(d)
        reg = ToolRegistry([S.search_tool(idx, k=3, max_chars=600)])
        assert reg.names() == ["search"] and reg.specs()[0]["function"]["parameters"]["required"] == ["query"]
        out = reg.call("search", {"query": "heron"})
        assert len(out) <= 600 and out.startswith("[1] long11.txt:1\nheron") and out.count("\n[") == 2
        big = reg.call("search", json.dumps({"query": "heron filler", "k": 1000}))  # k clamped to TOOL_MAX_K
        assert len(big) <= 600 and big.count("[") == S.TOOL_MAX_K and "…" in big
        assert reg.call("search", {"query": "nothing-like-it"}) == "no matching passages"
        assert reg.call("search", {"query": "NEAR(*"}) == "no matching passages"
        assert reg.call("search", {"query": 5}).startswith("error:")
        assert reg.call("search", {"query": "x", "k": "3"}).startswith("error:")
        assert reg.call("search", {}).startswith("error: search takes query")
    assert len(S.search_tool(tmp_path / "i.sqlite").fn("heron filler", k=10)) <= S.TOOL_MAX_CHARS
    with pytest.raises(UserError, match="not found"):
        S.search_tool(tmp_path / "nope.sqlite")


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_index_and_query(docs, tmp_path, capsys):
    index = str(tmp_path / "i.sqlite")
    rc, out, _ = _cli(capsys, "search", "index", str(docs), "--index", index)
    assert rc == 0 and out.startswith(f"indexed {docs.resolve()}: 3 added, 0 updated, 0 removed, 0 unchanged; "
                                      "5 passages written, 5 in the index")
    rc, out, _ = _cli(capsys, "search", "index", str(docs), "--index", index)
    assert rc == 0 and "0 added, 0 updated, 0 removed, 3 unchanged; 0 passages written" in out
    rc, out, _ = _cli(capsys, "search", "query", "Brennock beam", "--index", index, "-k", "1")
    assert rc == 0 and out.startswith("[1] notes.md:1  (score ") and "Ships passing Brennock" in out
    assert out.count("[") == 1


def test_cli_errors_are_one_line(docs, tmp_path, capsys):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 200)
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE feedback(x)")
    conn.commit()
    conn.close()
    built = tmp_path / "built.sqlite"
    assert main(["search", "index", str(docs), "--index", str(built), "--quiet"]) == 0
    damaged = tmp_path / "damaged.sqlite"
    damaged.write_bytes(built.read_bytes()[:3 * 4096])  # its first pages only
    cases = [
        (["search", "index", str(tmp_path / "missing"), "--index", str(tmp_path / "a.sqlite")], "not found"),
        (["search", "index", str(docs / "notes.md"), "--index", str(tmp_path / "a.sqlite")], "is not a folder"),
        (["search", "index", str(docs), "--index", str(garbage)], "not a readable lmstack search index"),
        (["search", "query", "x", "--index", str(garbage)], "not a readable lmstack search index"),
        (["search", "query", "Brennock", "--index", str(damaged)], "malformed"),
        (["search", "index", str(docs), "--index", str(other)], "SQLite database but not an lmstack search index"),
        (["search", "query", "x", "--index", str(tmp_path / "none.sqlite")], "not found (build it"),
        (["search", "query", "x", "--index", str(tmp_path)], "is a folder"),
        (["search", "query", "x", "--index", str(built), "-k", "0"], "-k must be"),
        (["search", "index", str(tmp_path), "--index", str(built)], "holds the folder"),
    ]
    before = garbage.read_bytes()
    for argv, message in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2 and err.startswith("lmstack: error: ") and message in err, (argv, err)
        assert err.count("\n") == 1 and "Traceback" not in err
    assert garbage.read_bytes() == before  # never written to
    assert not (tmp_path / "a.sqlite").exists() and not (tmp_path / "none.sqlite").exists()
    assert [r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["feedback"]


def test_world_names_and_questions_find_their_person(tmp_path):
    """Retrieval on a generated world: a person's name finds a biography of theirs first, and a
    fact question finds a passage holding the name and the answer in the top 3."""
    from lmstack.world import generate

    world = generate(tmp_path / "w", people=40, seed=3, progress=False)
    d = tmp_path / "docs"
    d.mkdir()
    (d / "pretrain.jsonl").write_bytes((world / "pretrain.jsonl").read_bytes())
    with S.SearchIndex(tmp_path / "i.sqlite", create=True) as idx:
        idx.update(d)
        people = json.loads((world / "world.json").read_text())["people"]
        for p in people:
            top = idx.search(p["name"], 1)[0]
            assert p["name"] in top.text, (p["name"], top.text)
        probes = [json.loads(line) for line in open(world / "probes" / "facts.jsonl")]
        found = sum(any(q["name"] in h.text and q["answer"] in h.text for h in idx.search(q["question"], 3))
                    for q in probes if q["relation"] != "birth_date")  # dates are written many ways
        assert found >= 0.9 * sum(q["relation"] != "birth_date" for q in probes)


def test_tool_is_not_a_default(tmp_path):
    from lmstack.tools import default_registry

    assert "search" not in default_registry()
    code = textwrap.dedent("""
        import sys
        import lmstack.tools.search
        assert "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
