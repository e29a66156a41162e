"""The search tool: retrieval over a folder of your files, ranked by BM25 (SQLite FTS5).

    index = SearchIndex("notes.sqlite", create=True)
    index.update("~/notes")                  # incremental: only new / changed / deleted files
    index.search("where was Ada born", k=3)  # [Passage(path, line, ordinal, text, score), ...]
    tool = search_tool("notes.sqlite", k=3)  # a Tool named "search" for a ToolRegistry

What is indexed: .txt and .md files (a file is one document), .jsonl (each line is a document:
its "text" string, else its "messages"' contents, else all its top-level string values) and .pdf
(each page, with pypdf installed: `pip install lmstack[search]`). Hidden files and folders are
never read. A file that cannot be used (binary, not UTF-8, too big, a broken PDF) is skipped
with its reason.

Chunking: a document is split at blank lines into paragraphs, and consecutive paragraphs are
packed into passages of at most CHUNK_WORDS words; a paragraph longer than that is cut into
windows of CHUNK_WORDS words that overlap by OVERLAP_WORDS, so a sentence at a cut is whole in
one of them. Passages never span two jsonl rows or two PDF pages. Each passage keeps where it
starts: the line in a text file, the row's line in a jsonl file, the page in a PDF.

The index is one SQLite file (in WAL mode: -wal/-shm files sit beside it while it is open). It
remembers its folder relative to its own when the folder is inside that (a world folder holding
library/ and library.sqlite can be moved or copied whole), else as an absolute path. Tables:
`files` (path relative to the folder, size, mtime, SHA-256) and `chunks` (the passages), with
an FTS5 table over the chunks' text (porter stemming) kept in step by triggers.

Incremental: a file whose size and mtime match its record is skipped unread (unless its mtime
is within RACY_NS of when it was recorded: a same-size rewrite in the same clock tick would
keep both, so such a file is hashed); one whose content hash matches is skipped too; a changed
file's passages are replaced; a deleted file's are removed.

Kill-safe: each file's change (its old passages deleted, its new ones inserted, its record
written) is one SQLite transaction, and so is each removal. A kill (or power cut) mid-update
rolls the open transaction back when the index is next opened: every file is either wholly in
the index, as of some version, or not at all; the next update finishes the job.

Queries are user or model text, never FTS5 syntax: they are cut into words, each word becomes a
quoted FTS5 string, and the strings are OR-ed (BM25 favours passages with more of the rarer
words), so quotes, `NEAR(`, `*`, `col:` filters or `AND`/`NOT` in a query are plain words.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from lmstack.sources import message_contents, skip_summary
from lmstack.tools.registry import Tool
from lmstack.utils import UserError

SUFFIXES = (".txt", ".md", ".jsonl", ".pdf")
CHUNK_WORDS = 120  # a passage's most words: a few in a small model's context window
OVERLAP_WORDS = 30  # the words two windows of one long paragraph share
MAX_FILE_BYTES = 64 << 20  # bigger files are skipped (read whole into memory)
RACY_NS = 2_000_000_000  # an mtime this close to its recording time is not trusted alone
MAX_QUERY_CHARS = 2000  # the part of a query that is read
MAX_QUERY_TERMS = 32  # bounds a query's work
MAX_K = 50
SCHEMA = "1"
TOOL_MAX_K = 10
TOOL_MAX_CHARS = 1500  # the whole tool result: the model reads it in a small context window

_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have he her his how i in is it its me my "
    "of on or she so than that the their them then there they this to was were what when where which "
    "who whom whose why will with you your".split())
_WORD = re.compile(r"[^\W_]+")  # FTS5's unicode61 tokenizer splits at anything else, _ included

_SCHEMA_SQL = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files(path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
                   sha256 TEXT NOT NULL, checked_ns INTEGER NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE chunks(id INTEGER PRIMARY KEY, path TEXT NOT NULL, ord INTEGER NOT NULL,
                    line INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_path ON chunks(path);
CREATE VIRTUAL TABLE fts USING fts5(text, content='chunks', content_rowid='id',
                                    tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO fts(fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""


@dataclass
class Passage:
    path: str  # relative to the indexed folder
    line: int  # where it starts: the line (txt, md), the row's line (jsonl), the page (pdf)
    ordinal: int  # the passage's number in its file, from 0
    text: str
    score: float  # BM25: higher is better

    @property
    def source(self) -> str:
        return f"{self.path} p.{self.line}" if self.path.lower().endswith(".pdf") else f"{self.path}:{self.line}"


@dataclass
class UpdateReport:
    folder: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    chunks_written: int = 0  # passages written by this update
    chunks_total: int = 0  # passages in the index after it
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}: files not usable

    def summary(self) -> str:
        return (f"indexed {self.folder}: {self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged; {self.chunks_written:,} passages written, "
                f"{self.chunks_total:,} in the index" + skip_summary(self.skipped))


class _Skip(Exception):
    """A file that cannot be indexed; the message is the reason."""


def chunk_text(text: str, words: int = CHUNK_WORDS, overlap: int = OVERLAP_WORDS) -> list[tuple[int, str]]:
    """(first line, text) of each passage of `text` (lines from 1): paragraphs (split at blank
    lines) packed up to `words` words, a longer paragraph cut into windows overlapping by
    `overlap`. Whitespace inside a paragraph becomes single spaces; paragraphs of one passage are
    joined by a newline."""
    if not 0 <= overlap < words:
        raise ValueError(f"need 0 <= overlap < words (got {overlap}, {words})")
    out: list[tuple[int, str]] = []
    packed: list[list[tuple[str, int]]] = []

    def flush():
        if packed:
            out.append((packed[0][0][1], "\n".join(" ".join(w for w, _ in p) for p in packed)))
            packed.clear()

    for para in _paragraphs(text):
        if len(para) > words:
            flush()
            for i in range(0, len(para), words - overlap):
                window = para[i:i + words]
                out.append((window[0][1], " ".join(w for w, _ in window)))
                if i + words >= len(para):
                    break
        else:
            if sum(map(len, packed)) + len(para) > words:
                flush()
            packed.append(para)
    flush()
    return out


def _paragraphs(text: str):
    """Each paragraph as a list of (word, line number)."""
    para: list[tuple[str, int]] = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: \f, \x1c, U+2028 are no line ends
        ws = line.split()
        if ws:
            para.extend((w, n) for w in ws)
        elif para:
            yield para
            para = []
    if para:
        yield para


def row_text(row) -> str | None:
    """The text of one jsonl row: its "text" string, else its "messages"' string contents (one a
    paragraph), else its top-level string values (one a paragraph); None when it has none."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("messages"), list):
        parts = message_contents(row["messages"])
    else:
        parts = [v for v in row.values() if isinstance(v, str)]
    return "\n\n".join(parts) if parts else None


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise _Skip("binary (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip(f"not UTF-8 (invalid byte at offset {e.start})") from None


def passages_of(name: str, data: bytes) -> list[tuple[int, str]]:
    """(line or page, text) of each passage of a file's bytes, by its suffix; _Skip when unusable."""
    suffix = Path(name).suffix.lower()
    if suffix == ".pdf":
        return _pdf_passages(data)
    text = _decode(data)
    if suffix != ".jsonl":
        return chunk_text(text)
    out, bad = [], 0
    for n, line in enumerate(text.split("\n"), 1):  # a JSON string may hold U+2028: no splitlines
        if not line.strip():
            continue
        try:
            t = row_text(json.loads(line))
        except (ValueError, RecursionError):
            t = None
        if t is None:
            bad += 1
            continue
        out.extend((n, p) for _, p in chunk_text(t))  # every passage of a row points at the row
    if bad and not out:
        raise _Skip(f"no usable lines ({bad} without JSON text)")
    return out


def _pdf_passages(data: bytes) -> list[tuple[int, str]]:
    try:
        import pypdf
    except ImportError:
        raise _Skip("reading PDF needs pypdf: pip install 'lmstack[search]'") from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except Exception as e:  # noqa: BLE001 - pypdf raises many kinds for a broken file
        raise _Skip(f"unreadable PDF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return [(page, p) for page, text in enumerate(pages, 1) for _, p in chunk_text(text)]


def match_expression(query: str) -> str:
    """An FTS5 MATCH expression for free text: its words, each a quoted string, OR-ed (stopwords
    dropped unless nothing else is left); "" when the query has no words. Nothing in the query
    can act as FTS5 syntax: a word is letters and digits only, and quoted."""
    if not isinstance(query, str):
        raise TypeError("the query must be a string")
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query[:MAX_QUERY_CHARS])))
    words = [w for w in words if w not in _STOPWORDS] or words
    return " OR ".join(f'"{w}"' for w in words[:MAX_QUERY_TERMS])


def _check_folder(folder) -> Path:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"folder {folder} not found" if not root.exists() else f"{folder} is not a folder")
    return root.resolve()


def _files_under(folder: Path) -> dict[str, Path]:
    """Relative path (with /) -> path of each indexable file; hidden files and folders skipped."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(SUFFIXES):
                p = Path(dirpath, name)
                found[p.relative_to(folder).as_posix()] = p
    return dict(sorted(found.items()))


class SearchIndex:
    """A BM25 index of one folder's files, kept in one SQLite file. `create=True` makes the file
    when it is missing (`update` needs that once); otherwise a missing file, a file that is not
    SQLite, or an SQLite database that is not a search index is a UserError. Safe to share
    between threads (one connection behind a lock)."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"search index {self.path} is a folder (name the index file)")
        if not self.path.exists() and not create:
            raise UserError(f"search index {self.path} not found (build it: lmstack search index FOLDER "
                            f"--index {self.path})")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise UserError(f"search index {self.path}: cannot open ({e})") from None
        try:
            self._open(create)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise UserError(f"{self.path} is not a readable lmstack search index ({e})") from None
        except BaseException:
            self._conn.close()
            raise

    def _open(self, create: bool) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}  # fails on non-SQLite
        if not tables and create:
            with self._transaction():
                for stmt in _statements(_SCHEMA_SQL):
                    self._conn.execute(stmt)
                self._conn.executemany("INSERT INTO meta VALUES (?, ?)",
                                       [("kind", "lmstack-search"), ("schema", SCHEMA), ("chunking", _chunking())])
            tables = {"meta"}
        meta = dict(self._conn.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
        if meta.get("kind") != "lmstack-search":
            raise UserError(f"{self.path} is an SQLite database but not an lmstack search index")
        if meta.get("schema") != SCHEMA:
            raise UserError(f"search index {self.path} has schema {meta.get('schema')}, this lmstack reads "
                            f"{SCHEMA}: delete it and index the folder again")
        self._conn.execute("PRAGMA journal_mode=WAL")  # readers (a chat) go on while an update writes
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a kill loses nothing committed

    @contextmanager
    def _transaction(self):
        """One write transaction: all of it is in the file, or (killed, failed) none of it."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def folder(self) -> str | None:
        """The folder this index holds (None before its first update)."""
        with self._lock:
            return self._root()

    def _root(self) -> str | None:
        key = self._meta("root")
        return key if key is None or Path(key).is_absolute() else str(self.path.resolve().parent / key)

    def stats(self) -> dict:
        with self._lock, self._errors():
            files, chunks = self._conn.execute("SELECT count(*), coalesce(sum(chunks), 0) FROM files").fetchone()
            return {"folder": self._root(), "files": files, "passages": chunks}

    @contextmanager
    def _errors(self):
        """An SQLite failure mid-use (a file corrupted or replaced under us) as one line."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise UserError(f"search index {self.path}: {e}") from None

    def update(self, folder: str | os.PathLike, progress: bool = False) -> UpdateReport:
        """Bring the index up to date with `folder` (module doc: incremental, kill-safe)."""
        root = _check_folder(folder)
        with self._lock, self._errors():
            return self._update(root, progress)

    def _update(self, root: Path, progress: bool) -> UpdateReport:
        conn = self._conn
        held, key = self._meta("root"), self._root_key(root)
        if held is not None and held != key:
            raise UserError(f"search index {self.path} holds the folder {self._root()}, not {root} "
                            "(use another index file for another folder)")
        with self._transaction():
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", (key,))
            if self._meta("chunking") != _chunking():  # passages cut another way: every file anew
                conn.execute("DELETE FROM chunks")
                conn.execute("DELETE FROM files")
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('chunking', ?)", (_chunking(),))
        report = UpdateReport(str(root))
        on_disk = _files_under(root)
        known = {r[0]: r[1:] for r in conn.execute("SELECT path, size, mtime_ns, sha256, checked_ns FROM files")}
        for rel in sorted(set(known) - set(on_disk)):
            self._remove(rel)
            report.removed += 1
        for rel, path in tqdm(on_disk.items(), desc="index", unit="file", disable=not progress, leave=False):
            rec = known.get(rel)
            try:
                st = path.stat()
                if st.st_size > MAX_FILE_BYTES:
                    raise _Skip(f"larger than {MAX_FILE_BYTES >> 20} MiB")
                if rec and (st.st_size, st.st_mtime_ns) == rec[:2] and rec[1] < rec[3] - RACY_NS:
                    report.unchanged += 1
                    continue
                checked = time.time_ns()  # before reading: a write after this changes the mtime
                data = path.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                if rec and rec[2] == sha:
                    with self._transaction():
                        conn.execute("UPDATE files SET size = ?, mtime_ns = ?, checked_ns = ? WHERE path = ?",
                                     (st.st_size, st.st_mtime_ns, checked, rel))
                    report.unchanged += 1
                    continue
                passages = passages_of(rel, data)
            except (_Skip, OSError) as e:
                reason = str(e) if isinstance(e, _Skip) else f"unreadable ({e.strerror or e})"
                report.skipped.append({"path": rel, "reason": reason})
                if rec:  # what it held is no longer there
                    self._remove(rel)
                    report.removed += 1
                continue
            with self._transaction():
                conn.execute("DELETE FROM chunks WHERE path = ?", (rel,))
                conn.executemany("INSERT INTO chunks(path, ord, line, text) VALUES (?, ?, ?, ?)",
                                 [(rel, i, line, text) for i, (line, text) in enumerate(passages)])
                conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                             (rel, st.st_size, st.st_mtime_ns, sha, checked, len(passages)))
            report.chunks_written += len(passages)
            if rec:
                report.updated += 1
            else:
                report.added += 1
        report.chunks_total = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        return report

    def _root_key(self, root: Path) -> str:
        """How the index names its folder: relative to the index file's own folder when the folder
        is in there (a world folder holding its library and its index moves as one), else absolute."""
        home = self.path.resolve().parent
        return root.relative_to(home).as_posix() if root.is_relative_to(home) else str(root)

    def _remove(self, rel: str) -> None:
        with self._transaction():
            self._conn.execute("DELETE FROM chunks WHERE path = ?", (rel,))
            self._conn.execute("DELETE FROM files WHERE path = ?", (rel,))

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The `k` best passages for free text `query` (any text: see match_expression), best first."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"k must be a whole number from 1 to {MAX_K} (got {k!r})")
        expr = match_expression(query)
        if not expr:
            return []
        with self._lock, self._errors():
            rows = self._conn.execute(
                "SELECT c.path, c.line, c.ord, c.text, bm25(fts) FROM fts JOIN chunks c ON c.id = fts.rowid "
                "WHERE fts MATCH ? ORDER BY rank LIMIT ?", (expr, k)).fetchall()
        return [Passage(path, line, ordinal, text, -score) for path, line, ordinal, text, score in rows]


def _chunking() -> str:
    return f"words={CHUNK_WORDS},overlap={OVERLAP_WORDS}"


def _statements(sql: str) -> list[str]:
    """The schema's statements one by one (executescript would commit our transaction)."""
    out, cur = [], ""
    for line in sql.strip().splitlines():
        cur += line + "\n"
        if sqlite3.complete_statement(cur):
            out.append(cur.strip())
            cur = ""
    return out


def format_passages(passages: list[Passage], max_chars: int = TOOL_MAX_CHARS) -> str:
    """Passages for a model to read: "[1] path:line" and the text, each cut to its share of
    `max_chars` (the whole result never passes it)."""
    if not passages:
        return "no matching passages"
    share = (max_chars - (len(passages) - 1)) // len(passages)
    parts = []
    for i, p in enumerate(passages, 1):
        part = f"[{i}] {p.source}\n{p.text}"
        parts.append(part if len(part) <= share else part[:max(share - 1, 0)].rstrip() + "…")
    return "\n".join(parts)[:max_chars]


def search_tool(index: str | os.PathLike | SearchIndex, k: int = 3, max_chars: int = TOOL_MAX_CHARS) -> Tool:
    """The "search" tool over an index (a SearchIndex or its file, opened now so a wrong path fails
    at once): argument `query`, optional `k` (1..TOOL_MAX_K, default `k`); the result lists the
    passages with their source in at most `max_chars` characters."""
    index = index if isinstance(index, SearchIndex) else SearchIndex(index)
    default_k = k

    def search(query: str, k: int = default_k) -> str:
        if not isinstance(query, str):
            return "error: query must be a string"
        if isinstance(k, bool) or not isinstance(k, int):
            return "error: k must be a whole number"
        return format_passages(index.search(query, max(1, min(k, TOOL_MAX_K))), max_chars)

    return Tool(
        name="search", fn=search,
        description="Search the user's files: the passages that best match the query, each with its "
                    "source (file:line).",
        parameters={"type": "object",
                    "properties": {"query": {"type": "string", "description": "words to look for"},
                                   "k": {"type": "integer", "description": f"how many passages (1-{TOOL_MAX_K}, "
                                                                           f"default {default_k})"}},
                    "required": ["query"]})


def index_folder(folder: str | os.PathLike, index: str | os.PathLike, progress: bool = True) -> UpdateReport:
    """`lmstack search index FOLDER --index FILE`: update (or create) the index, print the summary."""
    _check_folder(folder)  # before the index file is made
    with SearchIndex(index, create=True) as idx:
        report = idx.update(folder, progress=progress)
    print(report.summary())
    return report


def print_search(index: str | os.PathLike, query: str, k: int = 5) -> None:
    """`lmstack search query TEXT --index FILE -k K`: the best passages with source and score."""
    if not 1 <= k <= MAX_K:
        raise UserError(f"-k must be from 1 to {MAX_K} (got {k})")
    with SearchIndex(index) as idx:
        passages = idx.search(query, k)
    if not passages:
        print("no matching passages")
    for i, p in enumerate(passages, 1):
        print(f"[{i}] {p.source}  (score {p.score:.2f})\n{p.text}\n")
