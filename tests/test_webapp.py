"""The web app: its JSON API in process (save a chat, thumbs up and down, the labelling queue,
sampled answer pairs, labels, the monitor, the export read back by the SFT reader, the tools
endpoint and a chat with a tool round done the page's way), bad input answered 4xx in OpenAI's
error shape, the API key and the missing database; and the page itself driven in headless
Chromium against a live server (key, chat with a streamed reply, thumbs down with a comment, a
label, the monitor, a reply with a calculator call), checked against the database."""

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from lmstack.chatformat import render_chat
from lmstack.serve.db import FeedbackDB, export
from lmstack.serve.server import build, load_label_prompts
from lmstack.tokenizer import Tokenizer
from lmstack.tools import default_registry
from lmstack.train.sft import load_docs
from lmstack.utils import UserError
from lmstack.world.labeller import GUIDE
from tiny import LiveServer, fit_sequences, random_gpt, save_model_dir, tokenizer_on  # noqa: E402  (tests/ is on sys.path)

KEY = "sk-webapp-test"
REPLY = "Ana was born in Paris and Bo works at Acme in Rome."
ANSWER = "23 + 58 = 81."
CALL_TEXT = '{"name": "calculator", "arguments": {"expression": "23 + 58"}}'
STEPS = 300
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny chat model trained for a moment to answer with REPLY (a random one mostly ends
    its turn at once: empty replies make weak tests), and "What is 23 + 58?" with a calculator
    call and then ANSWER (tests/test_serve.py's recipe)."""
    d = tmp_path_factory.mktemp("chat")
    tok = tokenizer_on(d, (REPLY + " What is 23 + 58? Tell me about Bo. Hi " + CALL_TEXT + " " + ANSWER + "\n") * 50,
                       vocab_size=400)
    model = random_gpt(tok, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=96)
    system = [{"role": "system", "content": "Be brief."}]  # as the tests' chats have it
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}]
             for q in ["Hi", "Where was Ana born?", "Tell me about Bo."]]
    chats.append(system + chats[0] + chats[1])
    seqs = [torch.tensor(render_chat(tok, m)[0]) for m in chats]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "23 + 58"})}}
    seqs.append(torch.tensor(render_chat(tok, [{"role": "user", "content": "What is 23 + 58?"},
                                               {"role": "assistant", "content": "", "tool_calls": [call]},
                                               {"role": "tool", "tool_call_id": "call_0", "content": "81"},
                                               {"role": "assistant", "content": ANSWER}])[0]))
    fit_sequences(model, seqs, steps=STEPS)
    return save_model_dir(d, model, tok)


def make_app(model_dir, db_path, api_key=None):
    return build(model_dir, api_key=api_key, db_path=db_path, slots=4, dtype="fp32", device="cpu", name="chat")


@pytest.fixture()
def client(model_dir, tmp_path):
    with TestClient(make_app(model_dir, tmp_path / "feedback.sqlite")) as c:
        c.db_path = tmp_path / "feedback.sqlite"
        yield c


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def stream_turn(c, messages, tools=None, max_tokens=40) -> tuple[str, list, str]:
    """A streamed chat completion read as the page reads it (SSE `data:` lines): its text, its
    tool calls (the `delta.tool_calls` chunk) and its finish reason. max_tokens None: as the
    page sends it by default (the room left in the context)."""
    text, calls, finish, done = "", [], None, False
    body = {"model": "chat", "messages": messages, "stream": True, "temperature": 0}
    if max_tokens:
        body["max_tokens"] = max_tokens
    if tools:
        body["tools"] = tools
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            choice = json.loads(data)["choices"][0]
            text += choice["delta"].get("content") or ""
            calls += [{k: v for k, v in tc.items() if k != "index"} for tc in choice["delta"].get("tool_calls") or []]
            finish = choice["finish_reason"] or finish
    assert done
    return text, calls, finish


def stream_reply(c, messages) -> str:
    return stream_turn(c, messages)[0]


# --- the API in process -------------------------------------------------------------------------

def test_chat_feedback_label_monitor_and_export(client, model_dir, tmp_path):
    c = client
    r = c.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/app"
    page = c.get("/app")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="messages"' in page.text and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
    for f in ("app.js", "app.css"):
        assert c.get(f"/static/{f}").status_code == 200
    assert ok(c.get("/api/guide"))["guide"] == GUIDE
    assert ok(c.get("/api/info")) == {"model": "chat", "max_model_len": 96, "database": True, "label_max_tokens": 128,
                                      "tools": default_registry().specs(),
                                      "models": [{"id": "chat", "assistant": False, "tools": ["calculator", "python"]}],
                                      "default": "chat"}
    assert ok(c.get("/api/label/next")) == {"item": None, "answers": None, "guide": GUIDE, "remaining": 0}

    # A chat of two turns, saved after each reply (the second save updates the first).
    system = "Be brief."
    msgs = [{"role": "user", "content": "Hi"}]
    msgs.append({"role": "assistant", "content": stream_reply(c, [{"role": "system", "content": system}] + msgs)})
    assert msgs[-1]["content"]
    cid = ok(c.post("/api/conversations", json={"system": system, "messages": msgs}))["id"]
    msgs += [{"role": "user", "content": "Where was Ana born?"}]
    msgs.append({"role": "assistant", "content": stream_reply(c, [{"role": "system", "content": system}] + msgs)})
    assert ok(c.post("/api/conversations", json={"id": cid, "system": system, "messages": msgs}))["id"] == cid

    # Thumbs up on the first reply, down (with a comment) on the second: flagged and queued.
    ok(c.post("/api/feedback", json={"conversation_id": cid, "message_index": 1, "rating": 1}))
    ok(c.post("/api/feedback", json={"conversation_id": cid, "message_index": 3, "rating": -1,
                                     "comment": "Paris is right, but say only that."}))
    m = ok(c.get("/api/monitor"))
    assert (m["conversations"], m["thumbs_up"], m["thumbs_down"], m["flagged"], m["to_label"]) == (1, 1, 1, 1, 1)
    assert m["requests"] == 2 and m["errors"] == 0 and m["prompt_tokens"] > 0  # the two chat calls
    assert m["latency_ms"]["p50"] is not None and m["load"]["slots"] == 4
    (conv,) = m["flagged_conversations"]
    assert conv["id"] == cid and conv["messages"] == msgs and conv["system"] == system
    assert [(x["message_index"], x["rating"], x["comment"]) for x in conv["ratings"]] == [
        (1, 1, None), (3, -1, "Paris is right, but say only that.")]

    # The flagged prompt comes up for labelling, with two sampled answers.
    nxt = ok(c.get("/api/label/next"))
    assert nxt["item"]["messages"] == [{"role": "system", "content": system}] + msgs[:3]
    assert nxt["item"]["source"] == "flagged" and nxt["remaining"] == 1 and nxt["guide"] == GUIDE
    a, b = nxt["answers"]
    assert isinstance(a, str) and isinstance(b, str) and (a or b)
    ok(c.post("/api/label", json={"item_id": nxt["item"]["id"], "answer_a": a, "answer_b": b, "choice": "a",
                                  "comment": "A says Paris", "labeller": "ana"}))
    assert ok(c.get("/api/label/next"))["item"] is None

    # Prompts added through the API (text or messages); both bad plus an ideal answer.
    q1 = ok(c.post("/api/label/queue", json={"prompt": "Tell me about Bo."}))["id"]
    q2 = ok(c.post("/api/label/queue", json={"messages": [{"role": "user", "content": "What is 23 + 58?"}]}))["id"]
    nxt = ok(c.get("/api/label/next"))
    assert nxt["item"]["id"] == q1 and nxt["remaining"] == 2
    assert nxt["item"]["messages"] == [{"role": "user", "content": "Tell me about Bo."}]
    assert ok(c.get(f"/api/label/next?after={q1}"))["item"]["id"] == q2  # skip
    assert ok(c.get(f"/api/label/next?after={q2}"))["item"]["id"] == q1  # and round again
    ok(c.post("/api/label", json={"item_id": q1, "answer_a": nxt["answers"][0], "answer_b": nxt["answers"][1],
                                  "choice": "both_bad", "ideal": "Bo works at Acme in Rome."}))
    ok(c.post("/api/label", json={"item_id": q2, "answer_a": "81", "answer_b": "82", "choice": "tie"}))

    # A queued prompt too long to answer: the item comes with an error instead of answers.
    server = c.app.state.server
    long_id = server.db.enqueue([{"role": "user", "content": "Hi " * 200}], "file")
    nxt = ok(c.get("/api/label/next"))
    assert nxt["item"]["id"] == long_id and nxt["answers"] is None and "context" in nxt["error"]

    m = ok(c.get("/api/monitor"))
    assert (m["comparisons"], m["ideal_answers"], m["to_label"]) == (3, 1, 1)

    # The export: SFT rows the SFT reader takes, comparisons as preference pairs.
    counts = export(c.db_path, tmp_path / "out")
    assert counts == {"sft": 2, "comparisons": 3}  # ideal + thumbs up; a, and both bad with an ideal (x2)
    tok = Tokenizer.load(model_dir)
    docs, stats = load_docs([tmp_path / "out" / "sft.jsonl"], tok, 1024)
    assert len(docs) == 2 and not stats.get("skipped")
    pairs = [json.loads(x) for x in (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()]
    assert len(pairs) == 3 and all(set(p) >= {"prompt", "chosen", "rejected"} for p in pairs)
    assert pairs[0]["chosen"] == a and pairs[0]["rejected"] == b and pairs[0]["reason"] == "A says Paris"
    assert pairs[1]["prompt"] == "Tell me about Bo." and pairs[1]["chosen"] == "Bo works at Acme in Rome."


def long_text(n):
    return "x" * n


BAD = [  # (method, path, body, status)
    ("post", "/api/conversations", {"messages": []}, 400),
    ("post", "/api/conversations", {"messages": "hi"}, 400),
    ("post", "/api/conversations", {}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user"}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400),
    ("post", "/api/conversations", {"id": 999, "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("post", "/api/conversations", {"id": "1", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": "hi"}] * 300}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": None}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "user", "content": "hi", "tool_call_id": "c1"}]}, 400),
    ("post", "/api/conversations", {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "function": {"name": "calculator"}}]}]}, 400),  # no arguments
    ("post", "/api/conversations", {"messages": [{"role": "assistant", "content": "", "tool_calls": [  # not JSON text
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": {}}}]}]}, 400),
    ("post", "/api/tools/calculator", {"arguments": "x" * 10_001}, 400),
    ("post", "/api/tools/calculator", {"arguments": {"expression": "1" * 10_001}}, 400),
    ("post", "/api/tools/calculator", {"arguments": 5}, 400),
    ("post", "/api/tools/calculator", {"args": "{}"}, 400),
    ("post", "/api/tools/calculator", b"[1]", 400),
    ("post", "/api/tools/search", {"arguments": "{}"}, 404),
    ("get", "/api/tools/calculator", None, 405),
    ("post", "/api/feedback", {"conversation_id": 999, "message_index": 1, "rating": -1}, 404),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 0, "rating": -1}, 400),  # a user message
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 7, "rating": 1}, 400),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1, "rating": 2}, 400),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1, "rating": "1"}, 400),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1, "rating": True}, 400),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1}, 400),
    ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1, "rating": 1, "comment": long_text(2001)}, 400),
    ("post", "/api/label", {"item_id": 1, "answer_a": "x", "answer_b": "y", "choice": "c"}, 400),
    ("post", "/api/label", {"item_id": 1, "answer_a": "x", "choice": "a"}, 400),
    ("post", "/api/label", {"item_id": 999, "answer_a": "x", "answer_b": "y", "choice": "a"}, 404),
    ("post", "/api/label", {"item_id": 1, "answer_a": "x", "answer_b": "y", "choice": "a",
                            "comment": long_text(2001)}, 400),
    ("post", "/api/label/queue", {}, 400),
    ("post", "/api/label/queue", {"prompt": "  "}, 400),
    ("post", "/api/label/queue", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400),
    ("post", "/api/label/queue", {"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}]}, 400),
    ("post", "/api/label/queue", {"prompt": "Hi " * 200}, 400),  # does not fit the context
    ("post", "/api/label/queue", b"{not json", 400),
    ("post", "/api/label/queue", b"[1, 2]", 400),
    ("get", "/api/label/next?after=-1", None, 400),
    ("get", "/api/label/next?after=x", None, 400),
    ("get", "/api/nothing", None, 404),
]


def test_bad_input_gets_4xx_in_openai_shape(client):
    c = client
    cid = ok(c.post("/api/conversations", json={"messages": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "hello"}]}))["id"]
    assert cid == 1
    qid = ok(c.post("/api/label/queue", json={"prompt": "Hi"}))["id"]
    assert qid == 1
    for method, path, body, status in BAD:
        if isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = getattr(c, method)(path, **({"json": body} if body is not None else {}))
        assert r.status_code == status, (path, str(body)[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    m = ok(c.get("/api/monitor"))  # nothing was written by the bad requests
    assert (m["conversations"], m["thumbs_up"], m["thumbs_down"], m["comparisons"], m["to_label"]) == (1, 0, 0, 0, 1)


def test_the_tools_endpoint(client):
    c = client

    def run(args):
        return ok(c.post("/api/tools/calculator", json={"arguments": args}))["content"]

    assert run('{"expression": "23 + 58"}') == "81"
    assert run({"expression": "(2 + 3) * 4"}) == "20"  # an object works as well as OpenAI's JSON text
    assert run('{"expression": "7 / 2"}') == "3.5"
    # A call that goes wrong is a result the model reads, not an HTTP error.
    for bad in ['{"expression": "__import__(\'os\').system(\'id\')"}', '{"expression": "1 / 0"}',
                '{"expression": "9 ** 9 ** 9"}', '{"expression": "23 +"}', '{"expr": "1"}', "{}", "not json",
                "[1]", '{"expression": "' + "1+" * 3000 + '1"}']:
        assert run(bad).startswith("error: "), bad
    assert ok(c.post("/api/tools/calculator", json={}))["content"].startswith("error: ")  # no arguments
    assert run("x" * 10_000).startswith("error: ")  # at the limit: run (and refused by the tool)
    r = c.post("/api/tools/calculator", json={"arguments": "x" * 10_001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "arguments"
    r = c.post("/api/tools/search", json={"arguments": '{"q": "x"}'})
    err = r.json()["error"]
    assert r.status_code == 404 and err["code"] == "tool_not_found" and "calculator" in err["message"]


def test_a_tool_round_the_way_the_page_does_it(client, model_dir, tmp_path):
    """The page sends the tools from /api/info; a reply ending with a calculator call gets the
    call run through /api/tools, the assistant message and the tool message appended, and the
    model asked again; the saved conversation holds all of it, and a thumbs up on the final
    reply (index 3) exports an SFT row with the tool use."""
    c = client
    tools = ok(c.get("/api/info"))["tools"]
    assert [t["function"]["name"] for t in tools] == ["calculator", "python"]
    msgs = [{"role": "user", "content": "What is 23 + 58?"}]
    # Without tools the call is dropped: an empty reply.
    assert stream_turn(c, msgs, max_tokens=None) == ("", [], "stop")

    text, calls, finish = stream_turn(c, msgs, tools, max_tokens=None)
    assert (text, finish) == ("", "tool_calls")
    (call,) = calls
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "23 + 58"}
    result = ok(c.post(f"/api/tools/{call['function']['name']}",
                       json={"arguments": call["function"]["arguments"]}))["content"]
    assert result == "81"
    msgs += [{"role": "assistant", "content": text, "tool_calls": calls},
             {"role": "tool", "tool_call_id": call["id"], "content": result}]
    assert stream_turn(c, msgs, tools, max_tokens=None) == (ANSWER, [], "stop")
    msgs.append({"role": "assistant", "content": ANSWER})

    cid = ok(c.post("/api/conversations", json={"messages": msgs}))["id"]
    assert c.app.state.server.db.conversation(cid)["messages"] == msgs
    # OpenAI's null content beside tool_calls is taken too (saved as "").
    null = [msgs[0], {**msgs[1], "content": None}] + msgs[2:]
    assert ok(c.post("/api/conversations", json={"id": cid, "messages": null}))["id"] == cid
    assert c.app.state.server.db.conversation(cid)["messages"] == msgs
    r = c.post("/api/feedback", json={"conversation_id": cid, "message_index": 2, "rating": 1})
    assert r.status_code == 400  # the tool message is not a reply
    ok(c.post("/api/feedback", json={"conversation_id": cid, "message_index": 3, "rating": 1}))
    assert export(c.db_path, tmp_path / "out") == {"sft": 1, "comparisons": 0}
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert row == {"messages": msgs}
    tok = Tokenizer.load(model_dir)
    docs, stats = load_docs([tmp_path / "out" / "sft.jsonl"], tok, 1024)
    assert len(docs) == 1 and not stats.get("skipped")
    assert docs[0][0].tolist() == render_chat(tok, msgs)[0]  # the call and its result are in the row


def test_the_key_guards_the_api_but_not_the_page(model_dir, tmp_path):
    with TestClient(make_app(model_dir, tmp_path / "db.sqlite", api_key=KEY)) as c:
        assert c.get("/app").status_code == 200 and c.get("/static/app.js").status_code == 200
        assert c.get("/", follow_redirects=False).status_code in (302, 307)
        for method, path in [("get", "/api/info"), ("get", "/api/monitor"), ("get", "/api/label/next"),
                             ("get", "/api/guide"), ("post", "/api/conversations"), ("post", "/api/feedback"),
                             ("post", "/api/tools/calculator"), ("post", "/api/tools/nothing")]:
            r = getattr(c, method)(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
        assert c.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert ok(c.get("/api/info", headers={"Authorization": f"Bearer {KEY}"}))["database"] is True
        r = c.post("/api/tools/calculator", json={"arguments": '{"expression": "2 * 21"}'})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert ok(c.post("/api/tools/calculator", json={"arguments": '{"expression": "2 * 21"}'},
                         headers={"Authorization": f"Bearer {KEY}"})) == {"content": "42"}


def test_without_a_database_the_chat_still_works(model_dir):
    with TestClient(make_app(model_dir, None)) as c:
        assert ok(c.get("/api/info"))["database"] is False
        assert ok(c.get("/api/guide"))["guide"] == GUIDE
        for method, path, body in [("get", "/api/monitor", None), ("get", "/api/label/next", None),
                                   ("post", "/api/conversations", {"messages": [{"role": "user", "content": "hi"}]}),
                                   ("post", "/api/feedback", {"conversation_id": 1, "message_index": 1, "rating": 1}),
                                   ("post", "/api/label/queue", {"prompt": "hi"})]:
            r = getattr(c, method)(path, **({"json": body} if body else {}))
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_database", path
            assert "--db" in r.json()["error"]["message"]
        assert stream_reply(c, [{"role": "user", "content": "Hi"}])


def test_label_prompts_from_a_file_queue_each_conversation_once(tmp_path):
    db = FeedbackDB(tmp_path / "f.sqlite")
    f = tmp_path / "prompts.jsonl"
    sft_row = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    f.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Where was Ana born?"},
        {"messages": sft_row},  # an SFT row: the prompt is what comes before the reply
        {"question": "What is 2 + 3?", "answer": "5"},  # a world probe
        {"prompt": "Where was Ana born?"}]) + "\n\n")
    assert load_label_prompts(db, f) == 3
    assert load_label_prompts(db, f) == 0  # already queued
    assert db.queued_prompts() == [[{"role": "user", "content": "Where was Ana born?"}], sft_row[:1],
                                   [{"role": "user", "content": "What is 2 + 3?"}]]
    assert db.next_to_label()["messages"] == [{"role": "user", "content": "Where was Ana born?"}]
    assert db.next_to_label(after=db.next_to_label()["id"])["messages"] == sft_row[:1]
    assert db.waiting_to_label() == 3
    for text, why in [('{"text": "a document"}', "no messages, prompt or question"), ("{oops", "not valid JSON"),
                      ('{"messages": [{"role": "system", "content": "Be brief."}]}', "does not end with a user")]:
        (tmp_path / "bad.jsonl").write_text(text + "\n")
        with pytest.raises(UserError, match=why) as e:
            load_label_prompts(db, tmp_path / "bad.jsonl")
        assert "bad.jsonl:1" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_label_prompts(db, tmp_path / "none.jsonl")


def test_label_prompts_without_a_database_are_refused_before_the_model_loads(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n')
    for db in ("", None):  # `--db ''`: no database to queue them in
        with pytest.raises(UserError, match=r"--label-prompts needs a feedback database \(--db FILE\)"):
            build(tmp_path / "no-model-here", db_path=db, label_prompts=tmp_path / "prompts.jsonl")


# --- the page in a real browser --------------------------------------------------------------------

def rows(db_path, sql):
    con = sqlite3.connect(db_path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def headless_chrome():
    """A function that starts headless Chromium through selenium (the test is skipped when either
    is not installed)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} not installed "
                    "(apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
              "--disable-gpu", "--no-first-run"):
        opts.add_argument(a)
    return lambda: webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.slow
def test_the_page_in_headless_chromium(model_dir, tmp_path):
    chrome = headless_chrome()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    db_path = tmp_path / "feedback.sqlite"
    with LiveServer(make_app(model_dir, db_path, api_key=KEY)) as live:
        driver = chrome()
        wait = WebDriverWait(driver, 30)

        def el(i):
            return driver.find_element(By.ID, i)

        try:
            # The page loads without the key, finds the API needs one, and asks for it.
            driver.get(live.url + "/app")
            wait.until(lambda d: el("key-dialog").is_displayed())
            el("api-key").send_keys(KEY)
            el("save-key").click()
            wait.until(lambda d: el("model-name").text.startswith("chat"))
            assert not el("key-dialog").is_displayed()

            # Chat: a streamed reply (greedy: the tiny model's REPLY), saved as a conversation.
            driver.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                                  "t.dispatchEvent(new Event('input'));")
            el("message").send_keys("Where was Ana born?")
            el("send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#msg-1.assistant.done"))
            reply = driver.find_element(By.CSS_SELECTOR, "#msg-1 .content").text
            assert reply and "empty reply" not in reply
            assert el("msg-0").text.endswith("Where was Ana born?")

            # Thumbs down with a comment: a rating row, the conversation flagged and queued.
            wait.until(lambda d: el("thumbs-down-1").is_enabled())
            el("thumbs-down-1").click()
            el("comment-1").send_keys("It should only say Paris.")
            el("send-feedback-1").click()
            wait.until(lambda d: "Thanks" in el("feedback-status-1").text)
            assert rows(db_path, "SELECT id, flagged FROM conversations") == [(1, 1)]
            (conv_messages,) = rows(db_path, "SELECT messages FROM conversations")[0]
            assert json.loads(conv_messages) == [{"role": "user", "content": "Where was Ana born?"},
                                                 {"role": "assistant", "content": reply}]
            assert rows(db_path, "SELECT conversation_id, message_index, rating, comment FROM ratings") == [
                (1, 1, -1, "It should only say Paris.")]

            # Label: the flagged prompt with two sampled answers; A is better, plus an ideal answer.
            el("tab-label").click()
            wait.until(lambda d: el("label-item").is_displayed())
            assert "Where was Ana born?" in el("label-prompt").text
            answers = el("label-answer-a").text, el("label-answer-b").text
            assert all(answers)
            el("label-a").click()
            driver.find_element(By.CSS_SELECTOR, "#ideal-box summary").click()
            el("label-ideal").send_keys("Ana was born in Paris.")
            el("label-submit").click()
            wait.until(lambda d: el("label-empty").is_displayed())
            ((choice, ideal, msgs),) = rows(db_path, "SELECT choice, ideal, messages FROM comparisons")
            assert choice == "a" and ideal == "Ana was born in Paris."
            assert json.loads(msgs) == [{"role": "user", "content": "Where was Ana born?"}]
            assert rows(db_path, "SELECT count(*) FROM label_queue WHERE done=0") == [(0,)]

            # Monitor: the counts and the flagged conversation with its comment.
            el("tab-monitor").click()
            wait.until(lambda d: d.find_elements(By.ID, "stat-comparisons"))
            assert el("stat-comparisons").text.split("\n")[0] == "1"
            assert el("stat-thumbs-down").text.split("\n")[0] == "1"
            assert el("stat-requests").text.split("\n")[0] == "1"
            assert "It should only say Paris." in el("flagged").text

            # A reply with a tool round (tools on by default): the calculator call shown as a line,
            # then the answer, in one bubble that has the index of the final reply.
            el("tab-chat").click()
            el("new-chat").click()
            assert el("tools").is_selected() and "calculator" in el("tools-names").text
            el("message").send_keys("What is 23 + 58?")
            el("send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#msg-3.assistant.done"))
            assert driver.find_element(By.CSS_SELECTOR, "#msg-3 .tool-call").text == "[calculator] 23 + 58 -> 81"
            content = driver.find_element(By.CSS_SELECTOR, "#msg-3 .content").text
            assert content == "[calculator] 23 + 58 -> 81\n" + ANSWER
            assert len(driver.find_elements(By.CSS_SELECTOR, "#messages .msg")) == 2
            wait.until(lambda d: el("thumbs-up-3").is_enabled())
            el("thumbs-up-3").click()
            el("send-feedback-3").click()
            wait.until(lambda d: "Thanks" in el("feedback-status-3").text)
            (saved,) = rows(db_path, "SELECT messages FROM conversations WHERE id=2")[0]
            saved = json.loads(saved)
            assert [m["role"] for m in saved] == ["user", "assistant", "tool", "assistant"]
            (call,) = saved[1]["tool_calls"]
            assert call["function"]["name"] == "calculator" and saved[1]["content"] == ""
            assert saved[2] == {"role": "tool", "tool_call_id": call["id"], "content": "81"}
            assert saved[3] == {"role": "assistant", "content": ANSWER}
            thumbs_up = rows(db_path, "SELECT conversation_id, message_index, rating FROM ratings WHERE rating=1")
            assert thumbs_up == [(2, 3, 1)]

            # Regenerate with tools off: the whole tool round goes, the call is dropped (an empty
            # reply), and as the old reply was rated the new one is a new conversation.
            el("tools").click()
            el("regenerate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#msg-1.assistant.done"))
            assert not driver.find_elements(By.CSS_SELECTOR, ".tool-call")
            assert "empty reply" in el("msg-1").text
            wait.until(lambda d: rows(db_path, "SELECT count(*) FROM conversations") == [(3,)])
            assert json.loads(rows(db_path, "SELECT messages FROM conversations WHERE id=3")[0][0]) == [
                {"role": "user", "content": "What is 23 + 58?"}, {"role": "assistant", "content": ""}]
            assert json.loads(rows(db_path, "SELECT messages FROM conversations WHERE id=2")[0][0]) == saved
            # ... and with tools on again, the tool round comes back.
            el("tools").click()
            el("regenerate").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#msg-3.assistant.done"))
            assert driver.find_element(By.CSS_SELECTOR, "#msg-3 .tool-call").text == "[calculator] 23 + 58 -> 81"
            saved3 = "SELECT messages FROM conversations WHERE id=3"
            wait.until(lambda d: len(json.loads(rows(db_path, saved3)[0][0])) == 4)

            errors = [e["message"] for e in driver.get_log("browser")
                      if e["level"] == "SEVERE" and "401" not in e["message"]]  # the first, keyless call
            assert not errors, errors
        finally:
            driver.quit()

    # The export feeds the trainers: the ideal answer is an SFT row, the label a preference pair.
    counts = export(db_path, tmp_path / "out")
    assert counts == {"sft": 2, "comparisons": 1}  # the ideal answer, and the thumbs-up tool reply
    docs, stats = load_docs([tmp_path / "out" / "sft.jsonl"], Tokenizer.load(model_dir), 1024)
    assert len(docs) == 2 and not stats.get("skipped")
    assert json.loads((tmp_path / "out" / "sft.jsonl").read_text().splitlines()[1]) == {"messages": saved}
    (pair,) = [json.loads(x) for x in (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()]
    assert pair["prompt"] == "Where was Ana born?" and pair["chosen"] == answers[0] and pair["rejected"] == answers[1]
