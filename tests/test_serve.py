"""`lmstack serve`: the official openai client against a live server on loopback (plain,
streaming, stop sequences, n > 1, tools, errors, auth), continuous batching against the
engine, a table of malformed requests answered 4xx while a good request still succeeds,
lm_eval's local-completions scoring the server, and the feedback export."""

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lmstack.engine import generate
from lmstack.serve.protocol import Limits
from lmstack.serve.server import build
from lmstack.chatformat import chat_format, render_chat
from lmstack.tokenizer import Tokenizer, train_tokenizer
from tiny import LiveServer, fit_sequences, random_gpt, run_cli, save_model_dir, tokenizer_on  # noqa: E402  (tests/ is on sys.path)

openai = pytest.importorskip("openai")
KEY = "sk-test-key"


pytestmark = pytest.mark.usefixtures("one_thread")


REPLY = "Ana was born in Paris and Bo works at Acme in Rome, they say. "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny chat model trained for a second to answer every question with (a few) REPLY
    sentences: a random model mostly ends its turn at once, which makes weak tests."""
    d = tmp_path_factory.mktemp("chat")
    call_text = '{"name": "calculator", "arguments": {"expression": "23 + 58"}} 23 + 58 = 81.'
    tok = tokenizer_on(d, (REPLY + "What is 23 + 58? Tell me about Bo. Hi " + call_text + "\n") * 50)
    model = random_gpt(tok, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=128)
    questions = ["Tell me about Bo.", "Hi", "Where was Ana born?", "Who works at Acme?"]
    seqs = [render_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY * (1 + i % 2)}])[0]
            for i, q in enumerate(questions)]
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": "23 + 58"})}}
    seqs.append(render_chat(tok, [{"role": "user", "content": "What is 23 + 58?"},
                                  {"role": "assistant", "content": "", "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "call_0", "content": "81"},
                                  {"role": "assistant", "content": "23 + 58 = 81."}])[0])
    fit_sequences(model, seqs, steps=500)  # 300 left the tool call unlearnt with one seed
    return save_model_dir(d, model, tok)


@pytest.fixture(scope="module")
def live(model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "feedback.sqlite"
    app = build(model_dir, api_key=KEY, db_path=db, slots=4, dtype="fp32", device="cpu", name="chat",
                limits=Limits(max_body_bytes=20_000, max_tokens=64, max_n=4, request_timeout=30))
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def engine_model(model_dir):
    from lmstack.modelio import load_model

    return load_model(model_dir), Tokenizer.load(model_dir)


def greedy_chat(engine_model, text, max_tokens):
    model, tok = engine_model
    ids, _ = render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
    from lmstack.chatformat import TURN_ENDS

    new = generate(model, ids, max_tokens, temperature=0.0, stop_ids={tok.special_ids[t] for t in TURN_ENDS})
    ends = {tok.special_ids[t] for t in TURN_ENDS}
    text = tok.decode([t for t in new if t not in ends], skip_special=True)
    return text.removeprefix(chat_format(tok).lead), bool(new) and new[-1] in ends  # a reply loses the format's lead


# --- the openai client ------------------------------------------------------------------------

def test_models_and_plain_chat_equal_the_engine(client, engine_model):
    assert [m.id for m in client.models.list().data] == ["chat"]
    r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Where was Ana born?"}],
                                       temperature=0, max_tokens=20)
    want, closed = greedy_chat(engine_model, "Where was Ana born?", 20)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("stop" if closed else "length")
    assert r.usage.completion_tokens <= 20 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_concatenates_to_the_plain_reply(client, live):
    kw = dict(model="chat", messages=[{"role": "user", "content": "Tell me about Bo."}], temperature=0, max_tokens=30)
    r = client.chat.completions.create(**kw)
    plain = r.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # The monitor's log has the streamed request with its tokens (logged when the stream ended).
    db = live.app.state.server.db
    for _ in range(50):
        last = db._q("SELECT endpoint, status, completion_tokens FROM requests ORDER BY id DESC LIMIT 1")
        if last and tuple(last[0]) == ("/v1/chat/completions", 200, r.usage.completion_tokens):
            break
        time.sleep(0.05)
    assert tuple(last[0]) == ("/v1/chat/completions", 200, r.usage.completion_tokens)


def test_stop_sequences_cut_the_reply(client):
    kw = dict(model="chat", messages=[{"role": "user", "content": "Tell me about Bo."}], temperature=0, max_tokens=40)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_tool_calls_round_trip(client):
    parameters = {"type": "object", "properties": {"expression": {"type": "string"}}}
    tools = [{"type": "function",
              "function": {"name": "calculator", "description": "arithmetic", "parameters": parameters}}]
    msgs = [{"role": "user", "content": "What is 23 + 58?"}]
    r = client.chat.completions.create(model="chat", messages=msgs, tools=tools, temperature=0, max_tokens=64)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "calculator"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"expression": "23 + 58"}
    # The caller runs the tool and sends the result back (OpenAI's protocol).
    msgs += [c.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": c.message.tool_calls[0].id, "content": "81"}]
    r2 = client.chat.completions.create(model="chat", messages=msgs, tools=tools, temperature=0, max_tokens=64)
    assert r2.choices[0].message.content == "23 + 58 = 81." and r2.choices[0].finish_reason == "stop"
    # Streamed, the call arrives as a tool_calls delta.
    chunks = list(client.chat.completions.create(model="chat", messages=msgs[:1], tools=tools, temperature=0,
                                                 max_tokens=64, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "calculator"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_and_seed(client):
    kw = dict(model="chat", messages=[{"role": "user", "content": "Hi"}], temperature=2.0, max_tokens=12, seed=7)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own sample


def test_completions_echo_logprobs_match_a_forward_pass(client, engine_model):
    model, tok = engine_model
    r = client.completions.create(model="chat", prompt="Ana was born in", max_tokens=1, temperature=0,
                                  echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    ids = tok.encode("Ana was born in")
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[tok.bos_id] + ids]))[0].float(), -1)
    want = [float(logp[i, t]) for i, t in enumerate(ids)]
    assert lp.token_logprobs[:len(ids)] == pytest.approx(want, abs=1e-4)
    assert r.choices[0].text.startswith("Ana was born in")
    assert "".join(lp.tokens[:len(ids)]) == "Ana was born in"
    # Token-id prompts too; several prompts in one request.
    r = client.completions.create(model="chat", prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]


def test_errors_have_openai_shape(client, live):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi " * 200}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200  # health needs no key


# --- malformed requests, each a 4xx, while a good one is served ------------------------------

HI = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
BAD = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", {"model": "chat"}, 400),  # no messages
    ("/v1/chat/completions", {"model": "chat", "messages": []}, 400),
    ("/v1/chat/completions", {"model": "chat", "messages": "hi"}, 400),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": 5}]}, 400),
    ("/v1/chat/completions", {**HI, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {**HI, "temperature": 9}, 400),
    ("/v1/chat/completions", {**HI, "n": 50}, 400),
    ("/v1/chat/completions", {**HI, "max_tokens": 0}, 400),
    ("/v1/chat/completions", {**HI, "stop": ["a"] * 5}, 400),
    ("/v1/chat/completions", {**HI, "bogus": 1}, 400),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x" * 30_000}]}, 413),
    ("/v1/completions", {"model": "chat", "prompt": [1, 2, 99999]}, 400),
    ("/v1/completions", {"model": "chat", "prompt": []}, 400),
    ("/v1/completions", {"model": "chat", "prompt": "hi", "logprobs": 99}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/v1/nothing", {}, 404),
]


def test_malformed_requests_get_4xx_while_a_good_request_succeeds(live):
    headers = {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=30) as c:
            good = asyncio.create_task(c.post("/v1/chat/completions", json={
                "model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "temperature": 0}))
            bad = []
            for path, body, _ in BAD:
                if isinstance(body, bytes):
                    bad.append(c.post(path, content=body, headers={"content-type": "application/json"}))
                else:
                    bad.append(c.post(path, json=body))
            return await good, await asyncio.gather(*bad)

    good, bad = asyncio.run(main())
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None
    for (path, body, status), r in zip(BAD, bad):
        assert r.status_code == status, (path, body if not isinstance(body, dict) else list(body), r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


# --- continuous batching --------------------------------------------------------------------

def test_concurrent_requests_equal_each_alone(live, engine_model):
    """Requests arriving together (more than the 4 slots) are decoded together, each joining
    when a slot frees, and each gets exactly the greedy reply it gets alone."""
    prompts = [f"Question {i}: where does {'Bo' if i % 2 else 'Ana'} work?" + " Please." * (i % 3) for i in range(7)]
    headers = {"Authorization": f"Bearer {KEY}"}

    async def main():
        async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/chat/completions", json={
                "model": "chat", "messages": [{"role": "user", "content": p}], "max_tokens": 16 + 3 * i,
                "temperature": 0}) for i, p in enumerate(prompts)])

    results = asyncio.run(main())
    for i, (p, r) in enumerate(zip(prompts, results)):
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == greedy_chat(engine_model, p, 16 + 3 * i)[0]


def test_a_client_that_disconnects_frees_its_slot(live):
    batcher = live.app.state.server.batcher
    with httpx.stream("POST", live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64,
                            "stream": True, "temperature": 1.0}, timeout=30) as r:
        for _ in r.iter_lines():
            break  # read one event, then hang up
    for _ in range(100):
        if batcher.load["live"] == 0:
            break
        time.sleep(0.05)
    assert batcher.load["live"] == 0


# --- lm_eval scores the server --------------------------------------------------------------

@pytest.mark.slow
def test_lm_eval_local_completions_scores_the_server(live, tmp_path, engine_model):
    pytest.importorskip("lm_eval")
    rows = [{"q": "Ana was born in", "choices": [" Paris", " Rome", " Acme"], "label": i % 3} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.yaml").write_text(
        "task: srv_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'd.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    code = (
        "import json, sys\n"
        "from lm_eval import simple_evaluate\nfrom lm_eval.tasks import TaskManager\n"
        f"r = simple_evaluate(model='local-completions', model_args='model=chat,base_url={live.url}/v1/completions,"
        f"tokenizer_backend=remote,tokenized_requests=True,num_concurrent=2,max_retries=1,auth_token={KEY}',"
        f" tasks=['srv_mc'], task_manager=TaskManager(include_path='{tmp_path}'), limit=6)\n"
        "print(json.dumps(r['results']['srv_mc']))\n")
    env = {"OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = json.loads(proc.stdout.strip().splitlines()[-1])["acc,none"]
    # The same accuracy computed from our own scoring of the same choices.
    from lmstack.eval.lm import ModelLM

    model, tok = engine_model
    lm = ModelLM(model, tok)
    hits = 0
    for r in rows:
        scores = [s for s, _ in lm.loglikelihood([(r["q"], c) for c in r["choices"]])]
        hits += max(range(3), key=lambda k: scores[k]) == r["label"]
    assert acc == pytest.approx(hits / len(rows))


# --- the feedback database and the command line -----------------------------------------------

def test_feedback_db_schema_rate_label_export(tmp_path):
    import sqlite3

    from lmstack.serve.db import SCHEMA_VERSION, FeedbackDB
    from lmstack.utils import UserError

    db = FeedbackDB(tmp_path / "f.sqlite")
    conv = [{"role": "user", "content": "Where was Ana born?"}, {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Paris."}]
    cid = db.save_conversation(conv, model="chat", system="Be brief.")
    db.rate(cid, 3, 1)  # the good reply: an SFT example up to it
    db.rate(cid, 1, -1, "wrong city")  # the bad one: flagged, its prompt queued
    with pytest.raises(ValueError):
        db.rate(cid, 0, 1)  # a user message
    with pytest.raises(KeyError):
        db.rate(999, 1, 1)
    item = db.next_to_label()
    assert item["messages"] == [{"role": "system", "content": "Be brief."}, conv[0]]
    db.label(item["id"], "Paris.", "Rome.", "a", labeller="me")
    q2 = db.enqueue([{"role": "user", "content": "Who is Bo?"}])
    db.label(q2, "A cat.", "A dog.", "both_bad", ideal="Bo works at Acme.")
    assert db.next_to_label() is None
    s = db.stats()
    assert (s["thumbs_up"], s["thumbs_down"], s["flagged"], s["comparisons"], s["ideal_answers"]) == (1, 1, 1, 2, 1)
    counts = db.export(tmp_path / "out")
    sft = [json.loads(x) for x in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (tmp_path / "out" / "comparisons.jsonl").read_text().splitlines()]
    assert counts == {"sft": 2, "comparisons": 3}
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "Bo works at Acme."}
    assert sft[1]["messages"][0]["role"] == "system" and sft[1]["messages"][-1]["content"] == "Paris."
    assert pairs[0]["chosen"] == "Paris." and pairs[0]["rejected"] == "Rome." and isinstance(pairs[0]["prompt"], list)
    assert {p["rejected"] for p in pairs[1:]} == {"A cat.", "A dog."} and pairs[1]["prompt"] == "Who is Bo?"
    # The SFT reader takes the export as it is.
    from lmstack.train.sft import load_docs

    tok_dir = tmp_path / "tok"
    (tmp_path / "t.txt").write_text("Where was Ana born? Paris. Bo works at Acme. " * 30)
    tok = train_tokenizer([tmp_path / "t.txt"], vocab_size=300, out=tok_dir, progress=False)
    docs, stats = load_docs([tmp_path / "out" / "sft.jsonl"], tok, 512)
    assert len(docs) == 2 and not stats["skipped"]
    db.close()
    # Versions: a newer schema and a foreign database are refused; a corrupt file too.
    con = sqlite3.connect(tmp_path / "f.sqlite")
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(UserError, match="newer|upgrade"):
        FeedbackDB(tmp_path / "f.sqlite")
    con = sqlite3.connect(tmp_path / "other.sqlite")
    con.execute("CREATE TABLE x (a)")
    con.close()
    with pytest.raises(UserError, match="not an lmstack feedback database"):
        FeedbackDB(tmp_path / "other.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(UserError):
        FeedbackDB(tmp_path / "junk.sqlite")


@pytest.mark.slow
def test_serve_and_feedback_command_line_errors(tmp_path):
    for args in (["serve", "--model", str(tmp_path / "nope")],
                 ["feedback", "export", "--db", str(tmp_path / "x.db"), "--out", str(tmp_path / "o")]):
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_request_time_limit_gives_408_and_frees_the_slot(model_dir, tmp_path):
    app = build(model_dir, api_key=None, db_path=None, slots=2, dtype="fp32", device="cpu", name="chat",
                limits=Limits(request_timeout=0.0))
    with LiveServer(app) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=30, json={
            "model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50})
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        assert app.state.server.batcher.load["live"] == 0
        assert httpx.get(s.url + "/v1/models").status_code == 200  # no key set: open
