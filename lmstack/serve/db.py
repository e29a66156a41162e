"""The feedback database (SQLite): conversations, thumbs, labelled comparisons, ideal answers,
the labelling queue and a log of requests, and the export to the training formats.

The schema is versioned with SQLite's `user_version`: opening a database of an older version
migrates it in one transaction; a newer one is refused (written by a newer lmstack). Every
write is one transaction; the connection is shared by the server's threads under a lock.
A database that cannot answer (another writer holds its lock past the busy timeout, a corrupt
page) raises `DatabaseUnavailable`, which the server turns into a 503 for that one request;
`state` says how the last operation went (what /health reports). The request log is written
by a thread of its own (`RequestLog`), so a locked database never holds up a completion.

Export (`lmstack feedback export --db FILE --out DIR`):
  sft.jsonl          {"messages"}: each ideal answer written by a labeller after its prompt,
                     and each conversation rated thumbs-up, up to the rated reply
  comparisons.jsonl  {"prompt", "chosen", "rejected", "reason", "meta"}: each labelled pair
                     with a winner (ties and "both bad" are dropped; a "both bad" with an ideal
                     answer gives two pairs: the ideal beats each). `prompt` is the user's text
                     for a one-message prompt, else the list of messages.
Both are the formats `lmstack sft` and the preference trainers read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

from lmstack.utils import UserError, atomic_write_text

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL,
    model TEXT, system TEXT, messages TEXT NOT NULL,          -- JSON list of {role, content, ...}
    flagged INTEGER NOT NULL DEFAULT 0);
CREATE TABLE ratings (
    id INTEGER PRIMARY KEY, created REAL NOT NULL,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id),
    message_index INTEGER NOT NULL,                           -- the rated assistant message
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)), comment TEXT);
CREATE TABLE label_queue (
    id INTEGER PRIMARY KEY, created REAL NOT NULL,
    messages TEXT NOT NULL,                                   -- the prompt: JSON list of messages
    source TEXT NOT NULL,                                     -- 'file' | 'flagged' | 'api'
    conversation_id INTEGER, done INTEGER NOT NULL DEFAULT 0);
CREATE TABLE comparisons (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, queue_id INTEGER REFERENCES label_queue(id),
    messages TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
    ideal TEXT, labeller TEXT, comment TEXT);
CREATE TABLE ideal_answers (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, queue_id INTEGER REFERENCES label_queue(id),
    messages TEXT NOT NULL, answer TEXT NOT NULL, labeller TEXT);
CREATE TABLE requests (
    id INTEGER PRIMARY KEY, created REAL NOT NULL, endpoint TEXT NOT NULL, status INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_ms REAL NOT NULL);
CREATE INDEX requests_created ON requests(created);
"""
MIGRATIONS: dict[int, str] = {}  # version -> SQL taking the schema from version-1 to version
log = logging.getLogger(__name__)


class DatabaseUnavailable(Exception):
    """The database could not do what was asked (locked by another writer, corrupt, gone)."""


class FeedbackDB:
    def __init__(self, path, timeout: float = 5.0):
        """timeout: seconds to wait for another writer's lock before giving up (SQLite's busy timeout)."""
        self.path = str(path)
        self.state = "ok"  # how the last operation went: "ok", or why it failed
        try:
            self.conn = self._connect(timeout)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._lock = threading.Lock()
            self._migrate()
        except (sqlite3.DatabaseError, DatabaseUnavailable) as e:
            raise UserError(f"{self.path} is not a usable SQLite database ({e})") from None

    def _connect(self, timeout: float) -> sqlite3.Connection:
        """A connection to this database: any thread may use it (under a lock, or one thread
        alone), and it opens no transaction by itself (each one is explicit)."""
        return sqlite3.connect(self.path, timeout=timeout, check_same_thread=False, isolation_level=None)

    def _note(self, error: Exception | None) -> None:
        """`state` after an operation: "ok", or why it failed (what /health reports)."""
        self.state = "ok" if error is None else f"unavailable: {error}"

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.path} has schema version {version}; this lmstack knows up to "
                            f"{SCHEMA_VERSION} (upgrade lmstack)")
        if version == SCHEMA_VERSION:
            return
        tables = self.conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
        if version == 0 and tables:
            raise UserError(f"{self.path} is an SQLite database but not an lmstack feedback database")
        with self._tx():
            if version == 0:
                for stmt in filter(str.strip, SCHEMA.split(";")):
                    self.conn.execute(stmt)
            else:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in filter(str.strip, MIGRATIONS[v].split(";")):
                        self.conn.execute(stmt)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _tx(self):
        """`with db._tx() as conn:` one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) under the
        lock, which is released whatever fails (BEGIN itself too, when another writer holds the
        database past the busy timeout). A COMMIT that fails (a reader's lock, a full disk) is
        rolled back too: SQLite leaves its transaction open, and the shared connection could
        start no other."""
        with self._lock, self._failures():
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.conn.close()

    def _q(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock, self._failures():
            return self.conn.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _failures(self):
        """SQLite's own failures (locked, corrupt) -> DatabaseUnavailable; `state` follows."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            if isinstance(e, (sqlite3.IntegrityError, sqlite3.ProgrammingError)):
                raise
            self._note(e)
            raise DatabaseUnavailable(f"the feedback database {self.path} cannot answer: {e}") from None
        else:
            self._note(None)

    # --- conversations and ratings ------------------------------------------------------------

    def save_conversation(self, messages: list[dict], model: str | None = None, system: str | None = None,
                          conversation_id: int | None = None) -> int:
        now, blob = time.time(), json.dumps(messages, ensure_ascii=False)
        with self._tx() as c:
            if conversation_id is not None:
                cur = c.execute("UPDATE conversations SET messages=?, updated=?, system=? WHERE id=?",
                                (blob, now, system, conversation_id))
                if cur.rowcount == 0:
                    raise KeyError(f"no conversation {conversation_id}")
                return conversation_id
            return c.execute("INSERT INTO conversations (created, updated, model, system, messages) VALUES (?,?,?,?,?)",
                             (now, now, model, system, blob)).lastrowid

    def conversation(self, conversation_id: int) -> dict | None:
        rows = self._q("SELECT * FROM conversations WHERE id=?", (conversation_id,))
        return _conv(rows[0]) if rows else None

    def rate(self, conversation_id: int, message_index: int, rating: int, comment: str | None = None) -> int:
        """Thumbs up (1) or down (-1) on an assistant message. Thumbs down flags the conversation
        and queues its prompt (the messages before the rated reply) for labelling."""
        conv = self.conversation(conversation_id)
        if conv is None:
            raise KeyError(f"no conversation {conversation_id}")
        msgs = conv["messages"]
        if not 0 <= message_index < len(msgs) or msgs[message_index].get("role") != "assistant":
            raise ValueError(f"message {message_index} is not an assistant message of conversation {conversation_id}")
        now = time.time()
        with self._tx() as c:
            rid = c.execute("INSERT INTO ratings (created, conversation_id, message_index, rating, comment) "
                            "VALUES (?,?,?,?,?)", (now, conversation_id, message_index, rating, comment)).lastrowid
            if rating < 0:
                c.execute("UPDATE conversations SET flagged=1 WHERE id=?", (conversation_id,))
                prompt = msgs[:message_index]
                if conv["system"] and not (prompt and prompt[0].get("role") == "system"):
                    prompt = [{"role": "system", "content": conv["system"]}] + prompt
                c.execute("INSERT INTO label_queue (created, messages, source, conversation_id) VALUES (?,?,?,?)",
                          (now, json.dumps(prompt, ensure_ascii=False), "flagged", conversation_id))
        return rid

    def flagged(self, limit: int = 50) -> list[dict]:
        rows = self._q("SELECT * FROM conversations WHERE flagged=1 ORDER BY updated DESC LIMIT ?", (limit,))
        out = []
        for r in rows:
            conv = _conv(r)
            conv["ratings"] = [dict(x) for x in self._q(
                "SELECT message_index, rating, comment, created FROM ratings WHERE conversation_id=? ORDER BY id",
                (r["id"],))]
            out.append(conv)
        return out

    # --- the labelling queue -------------------------------------------------------------------

    def enqueue(self, messages: list[dict], source: str = "api") -> int:
        with self._tx() as c:
            return c.execute("INSERT INTO label_queue (created, messages, source) VALUES (?,?,?)",
                             (time.time(), json.dumps(messages, ensure_ascii=False), source)).lastrowid

    def next_to_label(self, after: int = 0) -> dict | None:
        """The first item waiting to be labelled whose id is above `after` (None: none waits)."""
        rows = self._q("SELECT * FROM label_queue WHERE done=0 AND id>? ORDER BY id LIMIT 1", (after,))
        if not rows:
            return None
        r = rows[0]
        return {"id": r["id"], "messages": json.loads(r["messages"]), "source": r["source"]}

    def waiting_to_label(self) -> int:
        return self._q("SELECT count(*) FROM label_queue WHERE done=0")[0][0]

    def queued_prompts(self) -> list[list[dict]]:
        """The messages of every item ever queued (labelled or not), oldest first."""
        return [json.loads(r["messages"]) for r in self._q("SELECT messages FROM label_queue ORDER BY id")]

    def queue_item(self, queue_id: int) -> dict | None:
        rows = self._q("SELECT * FROM label_queue WHERE id=?", (queue_id,))
        if not rows:
            return None
        return {"id": rows[0]["id"], "messages": json.loads(rows[0]["messages"]), "done": rows[0]["done"]}

    def label(self, queue_id: int, answer_a: str, answer_b: str, choice: str, ideal: str | None = None,
              labeller: str | None = None, comment: str | None = None) -> int:
        """Store a labelled comparison (and the ideal answer, if written); the item is done."""
        item = self.queue_item(queue_id)
        if item is None:
            raise KeyError(f"no queue item {queue_id}")
        now, msgs = time.time(), json.dumps(item["messages"], ensure_ascii=False)
        with self._tx() as c:
            cid = c.execute("INSERT INTO comparisons (created, queue_id, messages, answer_a, answer_b, choice, "
                            "ideal, labeller, comment) VALUES (?,?,?,?,?,?,?,?,?)",
                            (now, queue_id, msgs, answer_a, answer_b, choice, ideal, labeller, comment)).lastrowid
            if ideal:
                c.execute("INSERT INTO ideal_answers (created, queue_id, messages, answer, labeller) "
                          "VALUES (?,?,?,?,?)", (now, queue_id, msgs, ideal, labeller))
            c.execute("UPDATE label_queue SET done=1 WHERE id=?", (queue_id,))
        return cid

    # --- monitoring ----------------------------------------------------------------------------

    def stats(self) -> dict:
        (n, ok, pt, ct), = [tuple(r) for r in self._q(
            "SELECT count(*), coalesce(sum(status < 400), 0), coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0) FROM requests")]
        lat = [r[0] for r in self._q("SELECT latency_ms FROM requests WHERE status < 400 ORDER BY latency_ms")]
        ups, downs = (self._q("SELECT count(*) FROM ratings WHERE rating=?", (v,))[0][0] for v in (1, -1))

        def count(table, where="1"):
            return self._q(f"SELECT count(*) FROM {table} WHERE {where}")[0][0]
        return {"requests": n, "errors": n - ok, "prompt_tokens": pt, "completion_tokens": ct,
                "latency_ms": {"p50": _pct(lat, 50), "p99": _pct(lat, 99)},
                "thumbs_up": ups, "thumbs_down": downs, "conversations": count("conversations"),
                "flagged": count("conversations", "flagged=1"), "to_label": count("label_queue", "done=0"),
                "comparisons": count("comparisons"), "ideal_answers": count("ideal_answers")}

    # --- export --------------------------------------------------------------------------------

    def export(self, out) -> dict:
        """Write OUT/sft.jsonl and OUT/comparisons.jsonl (see the module doc); returns counts."""
        sft, pairs = [], []
        for r in self._q("SELECT messages, answer FROM ideal_answers ORDER BY id"):
            sft.append({"messages": json.loads(r["messages"]) + [{"role": "assistant", "content": r["answer"]}]})
        for r in self._q("SELECT c.messages, c.system, r.message_index FROM ratings r "
                         "JOIN conversations c ON c.id = r.conversation_id WHERE r.rating = 1 ORDER BY r.id"):
            msgs = json.loads(r["messages"])[:r["message_index"] + 1]
            if r["system"] and not (msgs and msgs[0].get("role") == "system"):
                msgs = [{"role": "system", "content": r["system"]}] + msgs
            sft.append({"messages": msgs})
        for r in self._q("SELECT * FROM comparisons ORDER BY id"):
            msgs = json.loads(r["messages"])
            prompt = msgs[0]["content"] if len(msgs) == 1 and msgs[0].get("role") == "user" else msgs
            meta = {"source": "feedback", "comparison_id": r["id"], "labeller": r["labeller"]}
            if r["choice"] in ("a", "b"):
                win, lose = (r["answer_a"], r["answer_b"]) if r["choice"] == "a" else (r["answer_b"], r["answer_a"])
                pairs.append({"prompt": prompt, "chosen": win, "rejected": lose,
                              "reason": r["comment"] or "preferred by a human labeller", "meta": meta})
            elif r["choice"] == "both_bad" and r["ideal"]:
                for lose in (r["answer_a"], r["answer_b"]):
                    pairs.append({"prompt": prompt, "chosen": r["ideal"], "rejected": lose,
                                  "reason": "the labeller's ideal answer beats both sampled answers", "meta": meta})
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "sft.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in sft))
        atomic_write_text(out / "comparisons.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in pairs))
        return {"sft": len(sft), "comparisons": len(pairs)}


class RequestLog:
    """The request log, written off the requests' path: the server queues a record and goes on;
    this thread writes it, on a connection of its own with a short busy timeout, so it never
    waits long and never holds up the database's other users. A write that fails (a locked
    database) is logged and counted, never raised, and the queue is bounded: when full, new
    records are dropped and counted. It runs while the server serves: `start()` and `close()`
    come with the batcher's (the app's lifespan)."""

    def __init__(self, db: FeedbackDB, size: int = 10_000, timeout: float = 0.5):
        self.db, self.timeout, self.queue = db, timeout, queue.Queue(maxsize=size)
        self.conn: sqlite3.Connection | None = None
        self.written = self.failed = self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="lmstack-request-log", daemon=True)

    def start(self) -> RequestLog:
        self.conn = self.db._connect(self.timeout)
        self._thread.start()
        return self

    def add(self, endpoint: str, status: int, latency_ms: float, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        if self._closed:
            self.dropped += 1
            return
        try:
            self.queue.put_nowait((time.time(), endpoint, status, prompt_tokens, completion_tokens, latency_ms))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            record = self.queue.get()
            try:
                if record is None:  # close(): nothing more comes
                    return
                self.conn.execute("INSERT INTO requests (created, endpoint, status, prompt_tokens, "
                                  "completion_tokens, latency_ms) VALUES (?,?,?,?,?,?)", record)
                self.written += 1
                self.db._note(None)
            except Exception as e:  # noqa: BLE001 - a log write must never take anything down
                self.failed += 1
                self.db._note(e)
                log.warning("request log: %s (%d records not written)", e, self.failed)
            finally:
                self.queue.task_done()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written or given up (True), at most `timeout` s."""
        end = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return not self.queue.unfinished_tasks

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, for at most `timeout` s (a locked database would hold shutdown
        up for half a second a record): what is left then is dropped and counted, as is anything
        added later. Then the thread ends, and its connection is closed."""
        self.flush(timeout)
        self._closed = True
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
                self.dropped += 1
                self.queue.task_done()
        self.queue.put(None)
        self._thread.join(self.timeout + 1)  # the write in progress: at most its busy timeout
        if not self._thread.is_alive():
            self.conn.close()


def _conv(r: sqlite3.Row) -> dict:
    return {"id": r["id"], "created": r["created"], "updated": r["updated"], "model": r["model"],
            "system": r["system"], "messages": json.loads(r["messages"]), "flagged": bool(r["flagged"])}


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return round(sorted_values[k], 1)


def export(db_path, out) -> dict:
    """`lmstack feedback export`."""
    if not Path(db_path).is_file():
        raise UserError(f"--db {db_path} does not exist")
    db = FeedbackDB(db_path)
    try:
        counts = db.export(out)
    finally:
        db.close()
    print(f"exported {counts['sft']} SFT conversations and {counts['comparisons']} comparisons -> {out}")
    return counts
