"""Assistants served as their own model ids (`lmstack serve --model ASSISTANT`, `--assistant DIR`):
listed in /v1/models, answering with their instructions and knowledge, their tool calls run by the
server through THE tool loop and the batcher (plain and streamed), what `--tools` lets run, the
plain model's requests unchanged, the web app's picker data and saved conversations, one-line
errors; and the page in headless Chromium with an assistant picked."""

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient

from lmstack import assistant as A
from lmstack.chatformat import LEAD
from lmstack.serve.generation import MAX_TOOL_ROUNDS
from lmstack.serve.server import app_for, build, make_server
from lmstack.tools.python import isolation
from lmstack.utils import UserError
from test_engine import ScriptedModel  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import LiveServer, random_gpt, run_cli, save_model_dir, tokenizer_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

INSTRUCTIONS = "Answer from the notes."
CALC = '{"name": "calculator", "arguments": {"expression": "23 + 58"}}'
PY = '{"name": "python", "arguments": {"code": "print(6 * 7)"}}'


class SlotScript(ScriptedModel):
    """ScriptedModel with the batcher's KV-cache slots: prompts prefilled (in chunks, right-padded)
    into rows slot.. from a position on, a decode step feeding one token to each decoding row at
    its own position, a row moved when a slot frees. Like a real KV cache, a write at position p
    replaces what was there from p on (a row's padding is overwritten by its next tokens)."""

    def hidden(self, idx, start_pos=0, attn_mask=None, slot: int = 0):
        """The logits as "hidden states" (lm_head is the identity): every position's next token."""
        out = torch.full((*idx.shape, self.cfg.vocab_size), -30.0)
        for b, ids in enumerate(idx.tolist()):
            row = self.rows[slot + b] = self.rows[slot + b][:start_pos] + ids
            for j in range(len(ids)):
                try:
                    out[b, j, self.next_token(row[:start_pos + j + 1])] = 30.0
                except ValueError:  # a context the script cannot read (part of a prompt): no logit matters
                    pass
        return out

    def lm_head(self, h):
        return h

    def forward(self, idx, start_pos=None, attn_mask=None, slot: int = 0):
        if not torch.is_tensor(start_pos):  # a prefill into `slot`
            return self.hidden(idx, start_pos, attn_mask, slot)
        logits = torch.full((idx.shape[0], 1, self.cfg.vocab_size), -30.0)
        for b, (t, p) in enumerate(zip(idx[:, 0].tolist(), start_pos.tolist())):
            self.rows[b] = self.rows[b][:p] + [t]
            logits[b, -1, self.next_token(self.rows[b])] = 30.0
        return logits

    def move_cache_row(self, src: int, dst: int) -> None:
        self.rows[dst] = list(self.rows[src])


def scripted(tok) -> SlotScript:
    """A model that says what it sees: asked "23 + 58" it calls the calculator and then answers
    "sum: RESULT."; asked for "python" it calls python, then "python says RESULT."; asked to call
    "forever" it calls the calculator every round; anything else gets "system=S; tool=T." with S
    its system message and T the last tool result since its last reply ("none" for either)."""
    sid = tok.special_ids
    end = sid["<|end|>"]

    def call(text):
        return [sid["<|tool_call|>"]] + tok.encode(text) + [sid["<|/tool_call|>"], end]

    def between(ctx, start):  # a message's text (the format encodes it after its lead)
        return tok.decode(ctx[start + 1:ctx.index(end, start)]).removeprefix(LEAD)

    def next_token(ctx):
        a = len(ctx) - 1 - ctx[::-1].index(sid["<|assistant|>"])
        u = len(ctx) - 1 - ctx[::-1].index(sid["<|user|>"])
        user = between(ctx, u)
        # the tool results since its last reply in words (the knowledge lookup comes before the question)
        said = max((i for i in range(u) if ctx[i] == sid["<|assistant|>"] and ctx[i + 1] != sid["<|tool_call|>"]),
                   default=0)
        tools = [i for i in range(said, a) if ctx[i] == sid["<|tool|>"]]
        result = between(ctx, tools[-1]) if tools else None
        if "forever" in user:
            reply = call(CALC)
        elif "23 + 58" in user:
            reply = tok.encode(f"sum: {result}.") + [end] if result else call(CALC)
        elif "python" in user:
            reply = tok.encode(f"python says {result.strip()}.") + [end] if result else call(PY)
        else:
            system = between(ctx, ctx.index(sid["<|system|>"])) if sid["<|system|>"] in ctx else "none"
            reply = tok.encode(f"system={system}; tool={result or 'none'}.") + [end]
        return reply[min(len(ctx) - a - 1, len(reply) - 1)]

    return SlotScript(tok.vocab_size, next_token, max_seq_len=1024)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A chat model folder (random tiny weights), the knowledge, and two assistants on the model
    (helper: instructions, knowledge, calculator + python + search; plain: no knowledge)."""
    d = tmp_path_factory.mktemp("assistants")
    tok = tokenizer_on(d, "What is 23 + 58? Where was Ada Lind born? Ada Lind was born in Oslo. system tool none "
                       "sum python says print reply.\n" * 40)
    model = save_model_dir(d / "chat", random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64,
                                                  max_seq_len=128), tok)
    (model / "sft.json").write_text(json.dumps({"base": None, "data": []}))  # a chat model by its lineage
    (d / "notes").mkdir()
    (d / "notes" / "people.md").write_text("Ada Lind was born in Oslo.\n")
    (d / "rules.md").write_text(INSTRUCTIONS + "\n")
    A.create(model, d / "helper", instructions=d / "rules.md", knowledge=d / "notes", tools="calculator,python,search")
    A.create(model, d / "plain", tools="calculator")
    return {"dir": d, "tok": tok, "model": model, "helper": d / "helper", "plain": d / "plain"}


def scripted_app(folders, tools=None, db=None):
    """The app build() makes, on the scripted model (the assistants loaded from their folders)."""
    tok = folders["tok"]
    server = make_server(scripted(tok), tok, "chat", [A.load(folders["helper"]), A.load(folders["plain"])], tools,
                         db=db, slots=4, prefix_cache_mb=0)  # the script has no keys/values to cache
    return app_for(server)


@pytest.fixture(scope="module")
def client(folders):
    with TestClient(scripted_app(folders)) as c:
        yield c


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def chat(c, model, messages, **kw) -> dict:
    return ok(c.post("/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0, **kw}))


def stream(c, model, messages, **kw) -> list[dict]:
    """The streamed chunks' choices (the [DONE] checked)."""
    body = {"model": model, "messages": messages, "temperature": 0, "stream": True, **kw}
    out, done = [], False
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                assert "error" not in obj, obj
                out += obj["choices"]
    assert done
    return out


# --- the API ---------------------------------------------------------------------------------------

def test_an_assistant_sees_its_instructions_and_knowledge_and_the_plain_model_does_not(client):
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Ada Lind born?"}]
    r = chat(client, "helper", ask)
    assert r["model"] == "helper"
    (choice,) = r["choices"]
    lookup = "[1] people.md:1\nAda Lind was born in Oslo."
    # the instructions first, the client's system message after them in the same message; the passage
    assert choice["message"] == {"role": "assistant",
                                 "content": f"system={INSTRUCTIONS}\n\nBe brief.; tool={lookup}."}
    assert choice["finish_reason"] == "stop"
    search, result, final = choice["messages"]
    assert search["tool_calls"][0]["function"] == {"name": "search",
                                                   "arguments": json.dumps({"query": "Where was Ada Lind born?"})}
    assert result == {"role": "tool", "tool_call_id": search["tool_calls"][0]["id"], "content": lookup}
    assert final == choice["message"]
    # The same request to the plain model: as before, no instructions, no lookup, no extra field.
    plain = chat(client, "chat", ask)
    assert plain["model"] == "chat" and plain["choices"][0]["message"] == {"role": "assistant",
                                                                          "content": "system=Be brief.; tool=none."}
    assert "messages" not in plain["choices"][0]
    # An assistant without instructions or knowledge adds nothing.
    assert chat(client, "plain", ask[1:])["choices"][0]["message"]["content"] == "system=none; tool=none."


def test_an_assistants_tool_calls_run_on_the_server(client):
    ask = [{"role": "user", "content": "What is 23 + 58?"}]
    r = chat(client, "helper", ask)
    (choice,) = r["choices"]
    assert choice["message"] == {"role": "assistant", "content": "sum: 81."} and choice["finish_reason"] == "stop"
    call, result, final = choice["messages"]  # no lookup: the notes have nothing on it
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "calculator"
    assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "81"}
    assert final == choice["message"]
    # every round's prompt counted (the second holds the call and its result)
    assert r["usage"]["prompt_tokens"] > 2 * len(client.post("/tokenize", json={"messages": ask}).json()["tokens"])
    # The plain model hands the call to the client, as OpenAI does.
    calc = ok(client.get("/api/info"))["tools"][:1]
    plain = chat(client, "chat", ask, tools=calc)["choices"][0]
    assert plain["finish_reason"] == "tool_calls" and plain["message"]["tool_calls"][0]["function"]["name"] == \
        "calculator" and "messages" not in plain

    # Streamed: the call and its result as tool events, then the answer; the last chunk has the messages.
    chunks = stream(client, "helper", ask, stream_options={"include_usage": True})
    events = [c["tool_event"] for c in chunks if "tool_event" in c]
    assert [e["type"] for e in events] == ["tool_call", "tool_result"]
    assert events[1]["name"] == "calculator" and events[1]["content"] == "81"
    assert json.loads(events[1]["arguments"]) == {"expression": "23 + 58"}
    assert "".join(c["delta"].get("content") or "" for c in chunks) == "sum: 81."
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["messages"] == choice["messages"]
    # The knowledge lookup streams as a search call and its result.
    chunks = stream(client, "helper", [{"role": "user", "content": "Where was Ada Lind born?"}])
    events = [c["tool_event"] for c in chunks if "tool_event" in c]
    assert [(e["type"], e["name"]) for e in events] == [("tool_call", "search"), ("tool_result", "search")]
    assert "Oslo" in events[1]["content"]


def test_out_of_rounds_n_choices_and_what_an_assistant_refuses(client):
    (choice,) = chat(client, "helper", [{"role": "user", "content": "call forever"}])["choices"]
    assert choice["finish_reason"] == "tool_calls"  # the last reply's calls were not run
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"]
    assert [m["role"] for m in choice["messages"]] == ["assistant", "tool"] * MAX_TOOL_ROUNDS + ["assistant"]
    r = chat(client, "helper", [{"role": "user", "content": "What is 23 + 58?"}], n=2)
    assert [c["message"]["content"] for c in r["choices"]] == ["sum: 81."] * 2
    assert [c["index"] for c in r["choices"]] == [0, 1]
    ask = {"model": "helper", "messages": [{"role": "user", "content": "hi"}]}
    for extra, param in (({"tools": [{"type": "function", "function": {"name": "x"}}]}, "tools"),
                         ({"tool_choice": "none"}, "tool_choice"), ({"logprobs": True}, "logprobs"),
                         ({"messages": [{"role": "user"}]}, "messages")):
        r = client.post("/v1/chat/completions", json={**ask, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.post("/v1/completions", json={"model": "helper", "prompt": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_unknown_ids_get_404(client):
    for r in (client.post("/v1/chat/completions", json={"model": "nobody", "messages": [{"role": "user", "content": "hi"}]}),
              client.get("/v1/models/nobody")):
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and "`helper`" in err["message"]
    assert ok(client.get("/v1/models/helper"))["parent"] == "chat"


def test_tools_limits_what_the_server_runs(folders):
    with TestClient(scripted_app(folders, tools=["calculator", "search"])) as c:
        info = ok(c.get("/api/info"))
        assert [t["function"]["name"] for t in info["tools"]] == ["calculator"]
        assert info["models"] == [{"id": "chat", "assistant": False, "tools": ["calculator"]},
                                  {"id": "helper", "assistant": True, "tools": ["calculator", "search"]},
                                  {"id": "plain", "assistant": True, "tools": ["calculator"]}]
        r = c.post("/api/tools/python", json={"arguments": '{"code": "print(1)"}'})
        assert r.status_code == 404 and r.json()["error"]["code"] == "tool_not_found"
        (choice,) = chat(c, "helper", [{"role": "user", "content": "run python"}])["choices"]
        assert choice["messages"][1]["content"].startswith("error: unknown tool 'python'")  # not run
        assert chat(c, "helper", [{"role": "user", "content": "What is 23 + 58?"}])["choices"][0]["message"][
            "content"] == "sum: 81."
    with TestClient(scripted_app(folders, tools=[])) as c:  # --tools '': nothing runs; the lookup still does
        assert ok(c.get("/api/info"))["tools"] == []
        (choice,) = chat(c, "helper", [{"role": "user", "content": "What is 23 + 58?"}])["choices"]
        assert choice["finish_reason"] == "tool_calls" and len(choice["messages"]) == 1
        assert "Oslo" in chat(c, "helper", [{"role": "user", "content": "Where was Ada Lind born?"}])["choices"][0][
            "message"]["content"]


def test_by_default_python_runs_in_its_sandbox(client):
    if isolation()[0] is None:
        pytest.skip(f"no sandbox on this machine ({isolation()[1]}): the python tool refuses to run")
    (choice,) = chat(client, "helper", [{"role": "user", "content": "run python"}])["choices"]
    assert choice["messages"][1]["content"] == "42" and choice["message"]["content"] == "python says 42."


def test_the_web_app_saves_an_assistant_chat_as_the_model_saw_it(folders, tmp_path):
    with TestClient(scripted_app(folders, db=None)) as c:
        assert c.post("/api/conversations", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 503
    from lmstack.serve.db import FeedbackDB

    db = FeedbackDB(tmp_path / "f.sqlite")
    with TestClient(scripted_app(folders, db=db)) as c:
        ask = [{"role": "user", "content": "Where was Ada Lind born?"}]
        msgs = ask + chat(c, "helper", ask)["choices"][0]["messages"]
        cid = ok(c.post("/api/conversations", json={"model": "helper", "system": "Be brief.", "messages": msgs}))["id"]
        saved = db.conversation(cid)
        assert saved["model"] == "helper" and saved["system"] == f"{INSTRUCTIONS}\n\nBe brief."
        assert saved["messages"] == [{**m, "content": m["content"] or ""} for m in msgs]
        r = c.post("/api/conversations", json={"model": "nobody", "messages": ask})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# --- lmstack serve on the folders ----------------------------------------------------------------------

def test_serve_an_assistant_folder_and_more_beside_it(folders, tmp_path):
    with TestClient(build(folders["helper"], db_path=None, device="cpu", dtype="fp32",
                          assistants=[folders["plain"]])) as c:
        models = ok(c.get("/v1/models"))["data"]
        assert [m["id"] for m in models] == ["chat", "helper", "plain"]
        assert models[1]["parent"] == "chat" and models[1]["tools"] == ["calculator", "python", "search"]
        assert models[1]["knowledge"] is True and models[2]["knowledge"] is False
        assert ok(c.get("/api/info"))["default"] == "helper"  # the web app opens with the assistant
        r = c.post("/v1/chat/completions", json={"model": "helper", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "helper"  # a real model through the batcher
    other = save_model_dir(tmp_path / "other", random_gpt(folders["tok"], n_layer=1, n_head=2, d_model=32,
                                                          ffn_hidden=64, max_seq_len=64), folders["tok"])
    (other / "sft.json").write_text("{}")
    A.create(other, tmp_path / "elsewhere", tools="calculator")
    shutil.copytree(folders["plain"], tmp_path / "twin")  # the same name twice
    for model, extra, tools, msg in (
            (folders["model"], [tmp_path / "elsewhere"], None, "runs on the model"),
            (folders["plain"], [tmp_path / "twin"], None, "'plain' is served twice"),
            (folders["model"], [tmp_path], None, "not an assistant folder"),
            (folders["model"], [], "calculator,shell", "--tools: unknown shell")):
        with pytest.raises(UserError, match=msg) as e:
            build(model, db_path=None, assistants=extra, tools=tools)
        assert "\n" not in str(e.value)
    r = run_cli("serve", "--model", str(folders["model"]), "--assistant", str(tmp_path / "elsewhere"), "--db", "")
    assert r.returncode == 2 and "runs on the model" in r.stderr and "Traceback" not in r.stderr


# --- the page in a real browser ------------------------------------------------------------------------

@pytest.mark.slow
def test_the_page_picks_an_assistant_and_shows_its_tool_calls(folders, tmp_path):
    """The picker lists the model and the assistants; with helper picked, a question its notes
    answer shows the knowledge lookup as a [search] line, a calculator question its call and
    result, and the saved conversation holds every message with the assistant's id."""
    from test_webapp import headless_chrome, rows

    chrome = headless_chrome()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from lmstack.serve.db import FeedbackDB

    db_path = tmp_path / "feedback.sqlite"
    with LiveServer(scripted_app(folders, db=FeedbackDB(db_path))) as live:
        driver = chrome()
        wait = WebDriverWait(driver, 30)

        def el(i):
            return driver.find_element(By.ID, i)

        def ask(text, index):
            el("message").send_keys(text)
            el("send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#msg-{index}.assistant.done"))
            return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f"#msg-{index} .tool-call")]

        try:
            driver.get(live.url + "/app")
            wait.until(lambda d: el("model-name").text.startswith("chat"))
            picker = Select(el("model"))
            assert [o.text for o in picker.options] == ["chat", "helper (assistant)", "plain (assistant)"]
            picker.select_by_value("helper")
            assert el("model-name").text.startswith("helper (assistant)")
            assert el("tools-names").text == "calculator, python, search" and not el("tools").is_enabled()

            # The lookup and the reply: message 0 the question, 1-2 the search call and result, 3 the reply.
            lines = ask("Where was Ada Lind born?", 3)
            assert lines == ["[search] Where was Ada Lind born? -> [1] people.md:1\nAda Lind was born in Oslo."]
            assert driver.find_element(By.CSS_SELECTOR, "#msg-3 .content").text.endswith(
                f"system={INSTRUCTIONS}; tool=[1] people.md:1\nAda Lind was born in Oslo..")
            # A tool round run by the server: 4 the question, 5-6 the call and its result, 7 the answer.
            lines = ask("What is 23 + 58?", 7)
            assert lines == ["[calculator] 23 + 58 -> 81"]
            assert driver.find_element(By.CSS_SELECTOR, "#msg-7 .content").text == "[calculator] 23 + 58 -> 81\nsum: 81."
            wait.until(lambda d: rows(db_path, "SELECT count(*) FROM conversations") == [(1,)] and len(json.loads(
                rows(db_path, "SELECT messages FROM conversations")[0][0])) == 8)
            ((model, system, msgs),) = rows(db_path, "SELECT model, system, messages FROM conversations")
            msgs = json.loads(msgs)
            assert model == "helper" and system == INSTRUCTIONS
            assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"] * 2
            assert msgs[5]["tool_calls"][0]["function"]["name"] == "calculator" and msgs[6]["content"] == "81"
            assert msgs[7] == {"role": "assistant", "content": "sum: 81."}

            # Back to the model: a new chat, where the page runs the calculator itself (no lookup).
            picker.select_by_value("chat")
            assert not driver.find_elements(By.CSS_SELECTOR, "#messages .msg") and el("tools").is_enabled()
            assert ask("What is 23 + 58?", 3) == ["[calculator] 23 + 58 -> 81"]
            errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
        finally:
            driver.quit()
