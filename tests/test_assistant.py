"""Assistants (lmstack/assistant.py), a conversation's memory (lmstack/tools/memory.py), paging
in the chat's fit, and the memory probe (lmstack/eval/memory.py)."""

import json
import shutil
from pathlib import Path

import pytest

from lmstack import assistant as A
from lmstack.chat import fit, recall
from lmstack.chatformat import chat_format
from lmstack.eval.lm import Reply
from lmstack.tools.memory import ConversationMemory
from lmstack.utils import UserError
from tiny import random_gpt, run_cli, save_model_dir, tokenizer_on  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = tokenizer_on(d, "Where was Ada Lind born? Ada Lind was born in Oslo. hello reply.\n" * 40)
    out = save_model_dir(d / "m", random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=128), tok)
    (out / "sft.json").write_text(json.dumps({"base": None, "data": []}))  # a chat model by its lineage
    return out


@pytest.fixture(scope="module")
def knowledge(tmp_path_factory):
    d = tmp_path_factory.mktemp("notes")
    (d / "people.md").write_text("Ada Lind was born in Oslo.\n\nBo Berg works at Acme Rail.\n")
    (d / "more.jsonl").write_text(json.dumps({"text": "Cy Dahl studied at Vero College."}) + "\n")
    (d / "image.png").write_bytes(b"\x89PNG")  # not knowledge: not copied
    (d / ".secret.txt").write_text("hidden")
    return d


def test_memory_pages_out_recalls_and_clears(tmp_path):
    with ConversationMemory(tmp_path / "mem") as m:
        assert m.recall("anything") == "no matching passages" and m.pages == 0
        m.page_out([{"role": "user", "content": "Where was Ada Lind born?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]},
                    {"role": "tool", "tool_call_id": "x", "content": "bulky result"},
                    {"role": "assistant", "content": "In   Oslo."}])
        m.page_out([{"role": "user", "content": "Who is Bo Berg?"}, {"role": "assistant", "content": "A driver."}])
        got = m.recall("where was Ada Lind born")
        assert got == "[1] page-00001.md:1\nuser: Where was Ada Lind born? assistant: In Oslo."
        assert "bulky" not in got and m.tool().fn(query="Bo Berg driver").endswith("assistant: A driver.")
    again = ConversationMemory(tmp_path / "mem")  # kept on disk: a later chat remembers
    assert again.pages == 2 and "Oslo" in again.recall("Ada Lind")
    again.clear()
    assert again.pages == 0 and again.recall("Ada Lind") == "no matching passages"
    again.close()
    temp = ConversationMemory()
    folder = temp.folder
    temp.close()
    assert not folder.exists()  # a session's memory goes with it


def test_fit_pages_out_what_it_drops_and_recall_brings_it_back(chat_model):
    from lmstack.tokenizer import Tokenizer
    fmt = chat_format(Tokenizer.load(chat_model))
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Where was Ada Lind born?"}, {"role": "assistant", "content": "Oslo."}]
    for i in range(12):
        history += [{"role": "user", "content": f"hello {i} " * 4}, {"role": "assistant", "content": f"reply {i}."}]
    history.append({"role": "user", "content": "Where was Ada Lind born?"})
    with ConversationMemory() as memory:
        kept = list(history)
        dropped, n = fit(fmt, kept, 128, 16, memory)
        assert dropped and memory.pages == dropped // 2 and kept[0] == history[0]
        assert all("Ada" not in (m["content"] or "") for m in kept[1:-1])  # the first turn left the context
        back = recall(kept, memory)  # the first turn is paged back in, just before the question
        assert back[:-3] == kept[:-1] and back[-1] == kept[-1]
        assert back[-3:-1] == [{"role": "user", "content": "Where was Ada Lind born?", "recalled": True},
                               {"role": "assistant", "content": "Oslo.", "recalled": True}]
        assert recall(back, memory) == back  # already just before the question: not paged in twice
        later = back[:-1] + history[3:7] + [history[-1]]  # two more turns since it came back, then the question
        moved = recall(later, memory)  # the copy further up moves down to the question
        assert moved == later[:-7] + later[-5:-1] + back[-3:-1] + [history[-1]]
        own = [history[0], history[1], history[2], *history[3:7], history[-1]]
        assert recall(own, memory) == own  # the conversation still holds that turn itself: nothing comes back
        assert recall(kept, None) == kept  # no memory: nothing added
        pages = memory.pages
        fit(fmt, back[:-1] + history[3:], 128, 16, memory)  # more turns after the recalled one
        assert memory.pages > pages  # the fillers are paged out ...
        assert sum("Ada" in p.read_text() for p in (memory.folder / "pages").iterdir()) == 1  # ... a recalled turn not
        assert fmt.prompt(back)  # the model's format renders it


def test_chat_pages_a_turn_out_and_back_in_across_sessions(chat_model, tmp_path):
    lines = ["Where was Ada Lind born?"] + [f"hello {i} " * 6 for i in range(8)] + ["Where was Ada Lind born?"]

    def chat(*text):
        p = run_cli("chat", "--model", chat_model, "--max-tokens", "4", "--seed", "0", "--memory", tmp_path / "mem",
                    cwd=ROOT, input="\n".join(text) + "\n", timeout=120)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        return p.stdout

    out = chat(*lines)
    assert "[paged out the 2 oldest messages to fit the context]" in out
    assert out.count("[recalled] user: Where was Ada Lind born?") == 1, out  # once, for the question asked again
    assert "[recalled] user: Where was Ada Lind born?" in out.split("\n> ")[len(lines)]  # at the last line
    later = chat("Where was Ada Lind born?")  # a new session with the same memory folder remembers
    assert "[recalled] user: Where was Ada Lind born?" in later


def test_an_abandoned_turn_takes_what_recall_put_before_it():
    from lmstack.chat import _before_last_user
    said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lookup = [{"role": "user", "content": "Ada?", "recalled": True, "lookup": True},
              {"role": "assistant", "content": "Oslo.", "recalled": True, "lookup": True}]
    assert _before_last_user(said + lookup + [{"role": "user", "content": "Ada?"}]) == said
    assert _before_last_user(said + [{"role": "user", "content": "Ada?"}]) == said


def test_create_an_assistant_and_what_it_shows_the_model(chat_model, knowledge, tmp_path):
    rules = tmp_path / "rules.md"
    rules.write_text("You answer in one sentence.\n")
    a = A.create(chat_model, tmp_path / "helper", instructions=rules, knowledge=knowledge,
                 tools="calculator,python,search")
    assert a.name == "helper" and a.retrieve and a.has_knowledge and a.instructions == "You answer in one sentence."
    assert sorted(p.name for p in (tmp_path / "helper" / "knowledge").iterdir()) == ["more.jsonl", "people.md"]
    assert sorted(a.registry().names()) == ["calculator", "python", "search"]
    conv = a.prepare([{"role": "user", "content": "Where was Ada Lind born?"}])
    assert conv[0] == {"role": "system", "content": "You answer in one sentence."}
    assert [m["role"] for m in conv] == ["system", "assistant", "tool", "user"]  # the lookup, then the question
    assert conv[1]["tool_calls"][0]["function"]["name"] == "search"
    assert conv[-1]["content"] == "Where was Ada Lind born?"
    assert "Ada Lind was born in Oslo." in conv[2]["content"] and "people.md:1" in conv[2]["content"]
    later = a.prepare([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                       {"role": "user", "content": "Where was Ada Lind born?"}])
    assert [m["role"] for m in later] == ["system", "user", "assistant", "assistant", "tool", "user"]
    assert A.knowledge_stats(a)["files"] == 2
    nothing = a.prepare([{"role": "user", "content": "zzz qqq"}])  # nothing found: nothing added
    assert [m["role"] for m in nothing] == ["system", "user"]
    # it travels whole
    shutil.move(tmp_path / "helper", tmp_path / "moved")
    b = A.load(tmp_path / "moved")
    assert "Oslo" in b.registry().call("search", {"query": "Ada Lind"})
    # no knowledge: no search tool, no retrieval
    bare = A.create(chat_model, tmp_path / "bare", tools="calculator,search")
    assert bare.tools == ["calculator"] and not bare.retrieve and bare.prepare([{"role": "user", "content": "hi"}]) == \
        [{"role": "user", "content": "hi"}]


def test_assistant_mistakes_are_one_line_errors(chat_model, knowledge, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(chat_model, base)
    (base / "sft.json").unlink()
    for kwargs, msg in (({"model": base}, "not a chat model"),
                        ({"model": tmp_path}, "not a model folder"),
                        ({"model": chat_model, "tools": "calculator,shell"}, "unknown shell"),
                        ({"model": chat_model, "name": "no spaces"}, "letters, digits"),
                        ({"model": chat_model, "knowledge": tmp_path / "nope"}, "not a folder"),
                        ({"model": chat_model, "instructions": tmp_path / "nope.md"}, "cannot read")):
        with pytest.raises(UserError, match=msg):
            A.create(out=tmp_path / "x", **kwargs)
        assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no passages"):
        A.create(chat_model, tmp_path / "x", knowledge=empty)
    assert not (tmp_path / "x").exists()  # nothing half-written
    with pytest.raises(UserError, match="not an assistant folder"):
        A.load(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "assistant.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        A.load(tmp_path / "bad")
    r = run_cli("assistant", "create", "--model", str(base), "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "not a chat model" in r.stderr and "Traceback" not in r.stderr


def test_chat_runs_an_assistant_with_its_knowledge(chat_model, knowledge, tmp_path):
    r = run_cli("assistant", "create", "--model", str(chat_model), "--knowledge", str(knowledge), "--out",
                str(tmp_path / "helper"))
    assert r.returncode == 0 and "looked up before every reply" in r.stdout
    shown = json.loads(run_cli("assistant", "show", str(tmp_path / "helper")).stdout)
    assert shown["name"] == "helper" and shown["knowledge"]["passages"] >= 2
    p = run_cli("chat", "--model", tmp_path / "helper", "--max-tokens", "4", "--seed", "0", cwd=ROOT,
                input="Where was Ada Lind born?\n", timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "[knowledge] [1] people.md:1" in p.stdout and "Ada Lind was born in Oslo." in p.stdout, p.stdout


class ReadingLM:
    """Answers with what the assistant said when the same question was asked earlier in what it
    can see, else with the last tool result (it reads its context and nothing else)."""

    def __init__(self, fmt, ctx):
        self.fmt, self.ctx = fmt, ctx

    def chat(self, convs, max_tokens, tools=None):
        out = []
        for c in convs:
            said = [b["content"] for a, b in zip(c[:-2], c[1:-1])
                    if a["role"] == "user" and a["content"] == c[-1]["content"] and b["role"] == "assistant"]
            tool = [m["content"] for m in c if m["role"] == "tool"]
            out.append(Reply(said[-1] if said else (tool[-1] if tool else "no idea"), True))
        return out


def test_memory_probe_separates_paging_from_forgetting(tmp_path):
    from lmstack.eval.memory import memory_eval, probe_conversations
    from lmstack.tokenizer import train_tokenizer
    from lmstack.world import generate

    w = generate(tmp_path / "w", people=60, progress=False)
    tok = train_tokenizer([w / "pretrain.jsonl"], vocab_size=512, out=tmp_path / "tok", progress=False)
    fmt = chat_format(tok)
    probes = probe_conversations(w, 128, fmt, n=20)
    assert len(probes) == 20 and all(len(fmt.prompt(p["messages"])) >= 3 * 128 for p in probes)
    assert all(p["messages"][0]["content"] == p["messages"][-1]["content"] for p in probes)
    r = memory_eval(ReadingLM(fmt, 128), w, n=20)
    assert r["in_context"]["acc"] == 1.0 and r["paged"]["acc"] >= 0.9 and r["forgotten"]["acc"] <= 0.2, r
    assert r["paged_vs_forgotten"]["significant"] and r["pages_per_conversation"] > 1
