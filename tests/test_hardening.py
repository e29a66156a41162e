"""Faults an adversarial probe found, each reproduced: one bad request or a locked database never
takes the server down; every bad input is a 4xx (or 503) in OpenAI's error shape; no crash leaves
a dead end or litter behind."""

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import checks as C

from lmstack import utils
from lmstack.chatformat import ChatFormatError, chat_format
from lmstack.config import ModelConfig
from lmstack.model import GPT
from lmstack.modelio import load_model, load_model_and_tokenizer
from lmstack.serve.batcher import Batcher, GenRequest
from lmstack.serve.db import DatabaseUnavailable, FeedbackDB, RequestLog
from lmstack.serve.protocol import Limits
from lmstack.serve.server import build
from lmstack.tokenizer import train_tokenizer
from lmstack.tools import default_registry
from lmstack.train import checkpoint
from lmstack.train.checkpoint import output_folder
from lmstack.utils import UserError, atomic_output_dir, atomic_write_text, check_output_dir
from test_train import make_data  # noqa: E402  (tests/ is on sys.path under pytest)
import tiny  # noqa: E402
from tiny import LiveServer, random_gpt, save_model_dir, tokenizer_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = tokenizer_on(d, "Ana was born in Paris and Bo works at Acme in Rome. Hello there.\n" * 40)
    return save_model_dir(d, random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=64), tok)


def app_for(model_dir, db=None, **kw):
    return build(model_dir, db_path=db, slots=4, dtype="fp32", device="cpu", name="m",
                 limits=kw.pop("limits", Limits(max_tokens=8, request_timeout=30)), **kw)


def chat(client, messages=HELLO, **kw):
    return client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 4, **kw})


def openai_error(r, status: int) -> dict:
    """The response is `status` with OpenAI's error body; returns the error."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# --- the database ---------------------------------------------------------------------------------

def test_a_locked_database_is_a_503_for_its_request_and_never_blocks_completions(model_dir, tmp_path):
    db_path = tmp_path / "f.sqlite"
    app = app_for(model_dir, db_path, db_timeout=0.2)
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").json()["database"] == "ok"
        other = sqlite3.connect(db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock (past the busy timeout)
        try:
            e = openai_error(c.post("/api/conversations", json={"messages": HELLO}), 503)
            assert e["code"] == "database_unavailable" and "locked" in e["message"]
            assert not app.state.server.db._lock.locked()  # the failed BEGIN released the server's lock
            openai_error(c.post("/api/conversations", json={"messages": HELLO}), 503)  # so this one fails too
            for _ in range(3):  # completions go on; their request log waits on a thread of its own
                assert chat(c).status_code == 200
            assert app.state.server.request_log.flush()  # the log thread gave up: counted, never raised
            health = c.get("/health").json()
            assert health["status"] == "degraded" and health["database"].startswith("unavailable")
            assert health["request_log"]["failed"] >= 1
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert c.post("/api/conversations", json={"messages": HELLO}).status_code == 200  # back to normal
        assert app.state.server.request_log.flush()
        assert c.get("/health").json()["database"] == "ok"


def test_a_failed_commit_is_rolled_back_so_the_next_write_succeeds(tmp_path):
    """A COMMIT that fails (here: a reader's lock in rollback-journal mode) must not leave the
    shared connection inside its transaction, where every later write would fail too."""
    db = FeedbackDB(tmp_path / "f.sqlite", timeout=0.2)
    db.conn.execute("PRAGMA journal_mode=DELETE")  # a reader blocks a commit (WAL's readers do not)
    first = db.save_conversation(HELLO)
    reader = sqlite3.connect(tmp_path / "f.sqlite", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM conversations").fetchall()  # a SHARED lock, held until its COMMIT
    try:
        with pytest.raises(DatabaseUnavailable, match="locked"):
            db.save_conversation(HELLO)  # BEGIN and INSERT go through; COMMIT cannot get the lock
    finally:
        reader.execute("COMMIT")
        reader.close()
    assert db.save_conversation(HELLO) == first + 1  # the failed write was rolled back, not kept
    assert db.state == "ok" and len(db._q("SELECT id FROM conversations")) == 2
    db.close()


def test_the_request_log_runs_while_the_app_serves(model_dir, tmp_path):
    app = app_for(model_dir, tmp_path / "f.sqlite")
    request_log = app.state.server.request_log
    assert request_log.conn is None  # no thread, no connection before the app serves
    with TestClient(app) as c:
        assert chat(c).status_code == 200
    assert not request_log._thread.is_alive()  # stopped at shutdown, what was queued written first
    with sqlite3.connect(tmp_path / "f.sqlite") as con:
        assert con.execute("SELECT count(*) FROM requests").fetchone()[0] == 1

    # A locked database cannot hold shutdown up: what is left is dropped, and counted.
    other = sqlite3.connect(tmp_path / "f.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        db = FeedbackDB(tmp_path / "f.sqlite")
        request_log = RequestLog(db, timeout=0.1).start()
        for _ in range(20):
            request_log.add("/v1/completions", 200, 1.0)
        request_log.close(timeout=0)
        request_log.add("/v1/completions", 200, 1.0)  # after close: dropped
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert not request_log._thread.is_alive()
    assert request_log.written == 0 and request_log.failed + request_log.dropped == 21
    db.close()


def test_the_database_says_where_it_is(model_dir, tmp_path, capsys):
    app_for(model_dir, tmp_path / "f.sqlite")
    assert f"feedback database: {tmp_path / 'f.sqlite'} (new)" in capsys.readouterr().out
    app_for(model_dir, tmp_path / "f.sqlite")
    assert "(new)" not in capsys.readouterr().out


def test_a_corrupt_database_page_is_a_503(model_dir, tmp_path):
    db_path = tmp_path / "f.sqlite"
    with TestClient(app_for(model_dir, db_path)) as c:
        for _ in range(60):  # enough rows for the tables to span pages
            c.post("/api/conversations", json={"messages": [{"role": "user", "content": "x" * 2000}]})
    with sqlite3.connect(db_path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(db_path.read_bytes())
    page = 4096
    data[5 * page:9 * page] = b"\xff" * (4 * page)  # pages in the middle, past the schema
    db_path.write_bytes(bytes(data))
    with TestClient(app_for(model_dir, db_path), raise_server_exceptions=False) as c:
        e = openai_error(c.get("/api/monitor"), 503)
        assert e["code"] == "database_unavailable"
        assert chat(c).status_code == 200


# --- one request never reaches another ------------------------------------------------------------

@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1, 2 ** 70])
def test_an_out_of_range_seed_is_a_400(model_dir, seed):
    with TestClient(app_for(model_dir)) as c:
        assert openai_error(chat(c, seed=seed), 400)["param"] == "seed"
        r = c.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2, "seed": seed})
        assert openai_error(r, 400)["param"] == "seed"
        assert chat(c, seed=2 ** 63 - 1, n=3).status_code == 200  # the largest seed, and seed + i


def test_a_failing_request_fails_alone_in_the_batcher(model_dir):
    model, tok = load_model_and_tokenizer(model_dir)
    batcher = Batcher(model, tok, slots=4).start()
    try:
        events = {}

        def req(name, **kw):
            done = threading.Event()

            def on_event(ev):
                events.setdefault(name, []).append(ev)
                if isinstance(ev, tuple) and ev[0] == "error" or getattr(ev, "finish_reason", None):
                    done.set()
            r = GenRequest(prompt=[tok.bos_id] + tok.encode("Hello"), max_tokens=6, temperature=1.0,
                           on_event=on_event, **kw)
            batcher.submit(r)
            return done

        good = [req(f"good{i}", seed=i) for i in range(3)]
        bad_seed = req("bad_seed", seed=2 ** 70)  # past the API's check: manual_seed raises at admission
        bad_step = req("bad_step", top_logprobs=10 ** 6)  # topk over the vocabulary raises while sampling
        for d in good + [bad_seed, bad_step]:
            assert d.wait(30)
        for name in ("bad_seed", "bad_step"):
            assert events[name][-1][0] == "error", events[name]
        for i in range(3):
            assert events[f"good{i}"][-1].finish_reason == "length" and len(events[f"good{i}"]) == 6
        assert req("after", seed=1).wait(30)  # and the batcher goes on
    finally:
        batcher.close()


# --- bad input: a 4xx in OpenAI's shape, never a bare 500 -----------------------------------------

def test_bad_input_is_a_4xx_in_openai_shape(model_dir, tmp_path):
    nested = "[" * 5000 + "]" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": nested}}
    big = 2 ** 63
    with TestClient(app_for(model_dir, tmp_path / "f.sqlite"), raise_server_exceptions=False) as c:
        surrogate = '{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'
        cases = [
            (c.post("/v1/chat/completions", content=surrogate, headers={"content-type": "application/json"}), 400),
            (c.post("/v1/completions", content='{"model": "m", "prompt": "a\\udfff"}',
                    headers={"content-type": "application/json"}), 400),
            (c.post("/tokenize", content='{"prompt": "\\ud800"}', headers={"content-type": "application/json"}), 400),
            (c.post("/api/conversations", content='{"messages": [{"role": "user", "content": "\\ud800"}]}',
                    headers={"content-type": "application/json"}), 400),  # in a nested model: checked by the body
            (chat(c, [{"role": "assistant", "content": "x", "tool_calls": 5}, *HELLO]), 400),
            (chat(c, [{"role": "assistant", "content": "", "tool_calls": [call]}, *HELLO]), 400),
            (c.post("/v1/chat/completions", content='{"model": "m", "messages": ' + "[" * 3000 + "]" * 3000 + "}",
                    headers={"content-type": "application/json"}), 400),
            (c.post("/api/conversations", json={"id": big, "messages": HELLO}), 400),
            (c.post("/api/feedback", json={"conversation_id": big, "message_index": 0, "rating": 1}), 400),
            (c.get(f"/api/label/next?after={big}"), 400),
        ]
        for r, status in cases:
            openai_error(r, status)
        # the tools endpoint and the registry: a result, never an exception
        r = c.post("/api/tools/calculator", json={"arguments": json.dumps({"expression": nested})[:9000]})
        assert r.status_code == 200 and r.json()["content"].startswith("error:")
        assert default_registry().call("calculator", nested).startswith("error:")
        r = c.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"


def test_a_chunked_body_over_the_limit_is_413(model_dir):
    """(One over the limit with a Content-Length: tests/test_serve.py's table of malformed requests.)"""
    with TestClient(app_for(model_dir, limits=Limits(max_body_bytes=1000))) as c:
        def chunks():
            for _ in range(10):
                yield b'{"model": "m", "messages": [' + b" " * 200

        openai_error(c.post("/v1/chat/completions", content=chunks()), 413)  # no Content-Length: chunked
        assert chat(c).status_code == 200


def test_unexpected_failures_are_logged_500s_in_openai_shape(model_dir, monkeypatch, caplog):
    app = app_for(model_dir)
    monkeypatch.setattr(app.state.server, "check_model", lambda name: 1 / 0)
    with TestClient(app, raise_server_exceptions=False) as c:
        e = openai_error(chat(c), 500)
        assert e["code"] == "internal_error" and "ZeroDivisionError" in e["message"]
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)  # with its traceback


def test_405_says_what_is_allowed_and_the_schema_lists_the_errors(model_dir):
    with TestClient(app_for(model_dir)) as c:
        r = c.get("/v1/chat/completions")
        assert openai_error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "POST"
        schema = c.get("/openapi.json").json()
        responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert {"200", "400", "401", "404", "408", "413", "500"} <= set(responses)
        assert "503" in schema["paths"]["/api/monitor"]["get"]["responses"]


def test_a_huge_prompt_is_refused_before_it_is_tokenized(model_dir, monkeypatch):
    app = app_for(model_dir)
    server = app.state.server
    calls = []
    real = server.tok.encode
    monkeypatch.setattr(server.tok, "encode", lambda text: calls.append(len(text)) or real(text))
    with TestClient(app) as c:
        e = openai_error(chat(c, [{"role": "user", "content": "word " * 200_000}]), 400)  # ~1 MB
        assert e["code"] == "context_length_exceeded" and "at least" in e["message"]
        r = c.post("/v1/completions", json={"model": "m", "prompt": "word " * 200_000, "max_tokens": 2})
        assert openai_error(r, 400)["code"] == "context_length_exceeded"
        r = c.post("/v1/completions", json={"model": "m", "prompt": "Hello", "stream": True, "echo": True,
                                            "logprobs": 1})
        assert openai_error(r, 400)["param"] == "echo"  # what the body alone refuses
        assert calls == []  # none was tokenized
        assert chat(c).status_code == 200 and calls  # an ordinary one is


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hello"}]}),
    ("/v1/completions", {"model": "m", "max_tokens": 2, "prompt": "Hello"}),
    ("/tokenize", {"prompt": "Hello"}),
    ("/api/label/queue", {"prompt": "Hello"}),
    ("/api/label/next", None)])  # two answers sampled for the item queued below
def test_tokenizing_runs_off_the_event_loop(model_dir, tmp_path, monkeypatch, route, body):
    """The tokenizer is called from a worker thread, never from the event loop's thread (where a
    long text would stop every other request, /health included, until it is done)."""
    app = app_for(model_dir, tmp_path / "f.sqlite", limits=Limits(request_timeout=30))
    app.state.server.db.enqueue(HELLO)
    real, on_loop = app.state.server.tok.encode, []

    def recording_encode(text):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)  # called from a coroutine: the event loop's thread
        except RuntimeError:
            on_loop.append(False)  # a worker thread has no running loop
        return real(text)

    monkeypatch.setattr(app.state.server.tok, "encode", recording_encode)
    with TestClient(app) as c:
        r = c.post(route, json=body) if body is not None else c.get(route)
        assert r.status_code == 200 and "error" not in r.json(), r.text
    assert on_loop and not any(on_loop), on_loop


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_tok")
    (d / "a.txt").write_text("hello world [ ] { } " * 50)
    return train_tokenizer([d / "a.txt"], vocab_size=280, out=d / "tok", progress=False)


def test_chat_format_refuses_what_would_crash_it(small_tok):
    tok = small_tok
    fmt = chat_format(tok)
    deep = [{"function": {"name": "f", "arguments": "[" * 10_000}}]
    for msgs in ([{"role": "assistant", "content": "", "tool_calls": 5}],
                 [{"role": "assistant", "content": "", "tool_calls": deep}]):
        with pytest.raises(ChatFormatError):
            fmt.render(msgs)
    assert fmt.parse(tok.encode("[" * 5000)).calls == []  # a model writing nonsense is not a crash either


@pytest.mark.slow
def test_schemathesis_conformance_against_the_live_server(model_dir, tmp_path):
    """schemathesis generates requests from the OpenAPI document (valid and invalid ones) and
    checks every answer: no 5xx, only documented status codes, content types and headers, bodies
    matching the documented schemas, 405 with Allow for a method a route does not take."""
    conformance = [C.not_a_server_error, C.status_code_conformance, C.content_type_conformance,
                   C.response_headers_conformance, C.response_schema_conformance, C.unsupported_method]
    calls = {}
    with LiveServer(app_for(model_dir, tmp_path / "f.sqlite")) as live:
        schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
        for result in schema.get_all_operations():
            op = result.ok()

            @settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def check(case):
                calls[op.label] = calls.get(op.label, 0) + 1
                case.call_and_validate(checks=conformance)

            check()
    assert len(calls) >= 15 and sum(calls.values()) > 200, calls


# --- crash recovery: no dead end, no litter ---------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("corpus"), n_docs=300)


def dead_pid() -> int:
    """The pid of a process that has exited (so no writer of that pid runs)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


run_cli = partial(tiny.run_cli, timeout=300)  # past 300 s the process is killed and the test fails


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(data_dir, tmp_path):
    out = tmp_path / "run"
    base = ["pretrain", "--preset", "tiny", "--data", data_dir, "--out", out, "--set", "train.batch_tokens=1024",
            "--set", "train.micro_batch_size=8", "--set", "train.seq_len=64", "--set", "train.eval_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "lmstack", *map(str, base), "--set", "train.max_steps=100000",
                             "--set", "train.save_every=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, lines = time.time() + 60, 0
    while time.time() < deadline and lines < 2:
        time.sleep(0.1)
        lines = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    proc.send_signal(signal.SIGKILL)  # no Ctrl-C handler runs: nothing is saved
    proc.wait()
    assert lines >= 2  # it was killed while training, past its first steps
    assert not (out / "model.safetensors").exists() and (out / "run.json").is_file()
    again = run_cli(*base, "--set", "train.max_steps=3")
    assert again.returncode == 2 and "--resume starts it again" in again.stderr
    resumed = run_cli(*base, "--set", "train.max_steps=3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "starting it again from step 0" in resumed.stdout
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # from step 0: the killed run's lines are gone
    assert run_cli(*base, "--set", "train.max_steps=3", "--resume").returncode == 0  # a real resume now


def test_an_unfinished_start_of_any_stage_is_not_a_dead_end(tmp_path):
    first = tmp_path / "sweep_run"
    first.mkdir()
    (first / f".run.json.{os.getpid()}.x1y2.tmp").write_text("{")  # killed while writing its first file
    with pytest.raises(UserError, match="--resume starts it again"):
        output_folder(first, resume=False)
    assert output_folder(first, resume=True) == (first, False)
    with pytest.raises(UserError, match="nothing to resume"):  # a new, empty folder is not a killed run
        output_folder(tmp_path / "new", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="nothing to resume"):
        output_folder(tmp_path / "empty", resume=True)
    out = tmp_path / "dpo"
    out.mkdir()
    (out / "stage.json").write_text("{}")  # killed between the stage's record and its run files
    with pytest.raises(UserError, match="--resume starts it again"):
        output_folder(out, resume=False)
    assert output_folder(out, resume=True) == (out, False)  # resumes... from step 0
    tmp = out / "state" / ".step_00000001.x1y2.tmp"  # killed while writing its first checkpoint
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"half")
    assert output_folder(out, resume=True) == (out, False)
    (out / "model.safetensors").write_bytes(b"")  # a finished (or checkpointed) run: not an unfinished start
    with pytest.raises(UserError, match="nothing to resume"):
        output_folder(out, resume=True)
    with pytest.raises(UserError, match="use --resume"):
        output_folder(out, resume=False)


def test_dead_writers_temporaries_are_cleared_and_nothing_else(tmp_path):
    gone, alive = dead_pid(), 1  # pid 1 always runs
    stale = [tmp_path / f".out.{gone}.abc.tmp", tmp_path / f".out.{gone}.def.tmp", tmp_path / f".f.txt.{gone}.x.tmp"]
    stale[0].mkdir()
    (stale[0] / "shard.bin").write_bytes(b"x" * 1000)
    stale[1].write_text("half")
    stale[2].write_text("half")
    kept = [tmp_path / f".out.{alive}.abc.tmp", tmp_path / ".out.notes", tmp_path / "out.tmp",
            tmp_path / f".outer.{gone}.a.tmp"]
    for k in kept:
        k.write_text("someone else's")
    with atomic_output_dir(tmp_path / "out") as t:
        (t / "a").write_text("new")
    atomic_write_text(tmp_path / "f.txt", "whole")
    assert not any(p.exists() for p in stale) and all(k.exists() for k in kept)
    assert (tmp_path / "out" / "a").read_text() == "new" and (tmp_path / "f.txt").read_text() == "whole"


def test_a_kill_between_the_two_renames_of_a_replace_loses_nothing(tmp_path, monkeypatch):
    out = tmp_path / "world"
    with atomic_output_dir(out) as t:
        (t / "a").write_text("old")
    real, calls = utils.os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the old one is aside, the new one not yet in: the process dies here
            raise KeyboardInterrupt
        real(a, b)

    monkeypatch.setattr(utils.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out, force=True) as t:
            (t / "a").write_text("new")
    monkeypatch.setattr(utils.os, "rename", real)
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert not out.exists() and len(aside) == 1 and (aside[0] / "a").read_text() == "old"  # beside it, named so
    gone = aside[0].with_name(aside[0].name.replace(f".{os.getpid()}.", f".{dead_pid()}."))
    aside[0].rename(gone)  # as the next process sees it: its writer is gone
    with pytest.raises(utils.UserError, match="not empty"):
        check_output_dir(out)  # the previous version is back in place, so this is a replace again
    assert (out / "a").read_text() == "old" and not gone.exists()


def test_pruning_a_checkpoint_never_leaves_a_visible_half(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    model.cfg = ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8, tie_embeddings=False)
    opt = torch.optim.AdamW(model.parameters())
    real = checkpoint.shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes the weights, then the process dies
        (path / "model.safetensors").unlink()
        raise KeyboardInterrupt

    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, model, opt, {"tokens": 0, "data": {}}, keep_last=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 3, model, opt, {"tokens": 0, "data": {}}, keep_last=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    visible = checkpoint.checkpoints(tmp_path)
    assert [p.name for p in visible] == ["step_00000002", "step_00000003"]
    assert all((p / "model.safetensors").is_file() for p in visible)
    checkpoint.save_checkpoint(tmp_path, 4, model, opt, {"tokens": 0, "data": {}}, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step_00000003", "step_00000004"]


def test_what_cannot_fit_is_refused_in_one_line(data_dir, small_tok, tmp_path):
    r = run_cli("world", "--people", 1_000_000_000, "--out", tmp_path / "w")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "GB" in r.stderr and not (tmp_path / "w").exists()
    r = run_cli("pretrain", "--data", data_dir, "--out", tmp_path / "p", "--set", "model.d_model=4000000")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "GiB of memory" in r.stderr, r.stderr

    d = tmp_path / "m"
    cfg = ModelConfig(vocab_size=300, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=16)
    save_model_dir(d, GPT(cfg), small_tok)
    (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "d_model": 4_000_000}))
    with pytest.raises(UserError, match="GiB of memory"):
        load_model(d)
