"""Chat turns with tool calls (a scripted model that calls the calculator), and `lmstack chat`
driven through a pseudo-terminal the way a person types: streamed replies, history, /reset,
/system, /temp, unknown commands, Ctrl-C during a reply, Ctrl-D and Ctrl-C at the prompt."""

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from lmstack.chat import chat_completion, fit, stream_chat
from lmstack.chatformat import chat_format, render_chat
from lmstack.tools import default_registry
from test_engine import ScriptedModel  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import random_gpt, save_model_dir, tokenizer_on  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALL = '{"name": "calculator", "arguments": {"expression": "23 + 58"}}'


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real model folder: tokenizer + config + random weights of a tiny GPT."""
    d = tmp_path_factory.mktemp("model")
    tok = tokenizer_on(d, "What is 23 + 58? The calculator says 23 + 58 = 81. reply (system) hello.\n" * 40)
    return save_model_dir(d, random_gpt(tok, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=128), tok)


def scripted_chat_model(tok, max_seq_len: int = 512) -> ScriptedModel:
    """A model that behaves like a trained assistant with a calculator:
    - asked about "23 + 58": calls the calculator, then (seeing the tool turn) answers "23 + 58 = 81.";
    - asked anything with "forever": calls a tool every round, never answering;
    - asked anything with "slow": writes "a" forever, slowly (to be interrupted);
    - otherwise: "reply N." where N = the user messages it can see ("(system) " first if it has
      a system prompt): history and /reset show in its answers."""
    sid = tok.special_ids
    end = sid["<|end|>"]
    call = [sid["<|tool_call|>"]] + tok.encode(CALL) + [sid["<|/tool_call|>"], end]

    def next_token(ctx):
        a = len(ctx) - 1 - ctx[::-1].index(sid["<|assistant|>"])
        u = len(ctx) - 1 - ctx[::-1].index(sid["<|user|>"])
        user = tok.decode(ctx[u + 1:ctx.index(end, u)])
        if "slow" in user:
            time.sleep(0.05)
            return tok.encode("a")[0]
        if "forever" in user:
            reply = call
        elif "23 + 58" in user:
            reply = tok.encode("23 + 58 = 81.") + [end] if sid["<|tool|>"] in ctx[u:] else call
        else:
            system = "(system) " if sid["<|system|>"] in ctx else ""
            reply = tok.encode(f"{system}reply {ctx.count(sid['<|user|>'])}.") + [end]
        return reply[min(len(ctx) - a - 1, len(reply) - 1)]

    return ScriptedModel(tok.vocab_size, next_token, max_seq_len)


@pytest.fixture(scope="module")
def tok(model_dir):
    from lmstack.tokenizer import Tokenizer

    return Tokenizer.load(model_dir)


# --- the tool-call loop -----------------------------------------------------------------------

def test_tool_call_end_to_end(tok):
    m = scripted_chat_model(tok)
    messages = [{"role": "user", "content": "What is 23 + 58?"}]
    events = list(stream_chat(m, tok, messages, tools=default_registry(), temperature=0))
    kinds = [e["type"] for e in events]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("text") < kinds.index("done")
    done = events[-1]
    call, tool, final = done["messages"]
    assert call["role"] == "assistant" and call["content"] == ""
    assert call["tool_calls"] == [{"id": "call_1", "type": "function",
                                   "function": {"name": "calculator", "arguments": '{"expression": "23 + 58"}'}}]
    assert tool == {"role": "tool", "tool_call_id": "call_1", "content": "81"}
    assert final == {"role": "assistant", "content": "23 + 58 = 81."}
    assert "".join(e["text"] for e in events if e["type"] == "text") == "23 + 58 = 81."
    assert done["finish_reason"] == "stop" and messages == [{"role": "user", "content": "What is 23 + 58?"}]
    # the whole exchange renders back through THE chat template, with the call as special tokens
    ids, _ = render_chat(tok, messages + done["messages"])
    sid = tok.special_ids
    assert ids[-len(tok.encode(" 23 + 58 = 81.")) - 2:] == (  # message text follows one space
        [sid["<|assistant|>"]] + tok.encode(" 23 + 58 = 81.") + [sid["<|end|>"]])
    assert sid["<|tool_call|>"] in ids and tok.encode(CALL)[0] in ids
    # chat_completion: the same, collected
    out = chat_completion(m, tok, messages, tools=default_registry(), temperature=0.7, seed=1)
    assert out["message"] == final and out["finish_reason"] == "stop"


def test_tool_calls_without_registry_and_bounded_rounds(tok):
    m = scripted_chat_model(tok)
    out = chat_completion(m, tok, [{"role": "user", "content": "What is 23 + 58?"}], tools=None, temperature=0)
    assert out["finish_reason"] == "tool_calls" and len(out["messages"]) == 1
    assert out["message"]["tool_calls"][0]["function"]["name"] == "calculator"
    out = chat_completion(m, tok, [{"role": "user", "content": "call forever"}], tools=default_registry(),
                          temperature=0, max_tool_rounds=2)
    assert out["finish_reason"] == "tool_calls"
    assert [x["role"] for x in out["messages"]] == ["assistant", "tool", "assistant", "tool", "assistant"]


def test_malformed_tool_call_is_reported_not_raised(tok):
    sid = tok.special_ids
    bad = tok.encode("ok ") + [sid["<|tool_call|>"]] + tok.encode('{"name": ') + [sid["<|/tool_call|>"], sid["<|end|>"]]
    m = ScriptedModel(tok.vocab_size, lambda ctx: bad[min(len(ctx) - ctx.index(sid["<|assistant|>"]) - 1, len(bad) - 1)])
    events = list(stream_chat(m, tok, [{"role": "user", "content": "hi"}], tools=default_registry(), temperature=0))
    assert [e["type"] for e in events if e["type"] != "text"] == ["bad_tool_call", "done"]
    assert events[-2] == {"type": "bad_tool_call", "text": '{"name": '}
    assert events[-1]["messages"] == [{"role": "assistant", "content": "ok "}]


def test_fit_drops_the_oldest_turns_and_returns_the_length_left(tok):
    fmt = chat_format(tok)
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "the last question"})
    full = len(render_chat(tok, history, add_generation_prompt=True)[0])
    assert fit(fmt, list(history), full + 8, 8) == (0, full)  # it fits: nothing goes
    kept = list(history)
    dropped, n = fit(fmt, kept, full, 8)
    assert dropped % 2 == 0 and dropped > 0 and kept[0] == history[0] and kept[1:] == history[1 + dropped:]
    assert n == len(render_chat(tok, kept, add_generation_prompt=True)[0]) and n + 8 <= full
    alone = [history[0], history[-1]]  # nothing left to drop: the length is what is left
    assert fit(fmt, alone, 4, 8) == (0, len(render_chat(tok, alone, add_generation_prompt=True)[0]))


# --- the terminal chat through a pseudo-terminal --------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[()][A-Z0-9]|[\r\x07]")


class Terminal:
    """A child process on a pseudo-terminal it has as its controlling terminal, so Ctrl-C
    (\\x03) typed into it becomes SIGINT, as in a real terminal."""

    def __init__(self, args, cwd):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))

        def controlling_tty():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {**os.environ, "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env,
                                     preexec_fn=controlling_tty, close_fds=True)
        os.close(slave)
        self.out, self.pos = "", 0  # all output so far; where the next read_until looks from

    def read_until(self, pattern: str, timeout: float = 60.0) -> str:
        """Read until `pattern` (a regex) appears after the last match; return the text up to it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.out[self.pos:])
            if m:
                part = self.out[self.pos:self.pos + m.end()]
                self.pos += m.end()
                return part
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in output:\n{self.out[self.pos:]}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited ({self.proc.returncode}) before {pattern!r}:\n{self.out[self.pos:]}")
                self.out += ANSI.sub("", chunk.decode("utf-8", "replace"))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def finish(self, timeout: float = 30.0) -> tuple[int, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        while select.select([self.master], [], [], 0.1)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                break
            if not chunk:
                break
            self.out += ANSI.sub("", chunk.decode("utf-8", "replace"))
        os.close(self.master)
        return rc, self.out


PROMPT = r"(^|\n)> $"


@pytest.mark.slow
def test_chat_in_a_terminal_real_model(model_dir):
    """The real path (`python -m lmstack chat`) with a random model: replies stream (gibberish),
    commands answer, Ctrl-D exits cleanly."""
    t = Terminal([sys.executable, "-m", "lmstack", "chat", "--model", str(model_dir), "--max-tokens", "6",
                  "--seed", "0"], ROOT)
    banner = t.read_until(PROMPT)
    assert "lmstack chat" in banner and "tools: calculator" in banner
    t.type("hello there\n")
    t.read_until(PROMPT)
    for line, want in [("/temp 0.5", "temperature 0.5"), ("/temp hot", "/temp needs a number"),
                       ("/system be brief", "system prompt: be brief"), ("/reset", "conversation reset"),
                       ("/frobnicate", "unknown command /frobnicate; commands: /reset")]:
        t.type(line + "\n")
        assert want in t.read_until(PROMPT)
    t.type("\x04")  # Ctrl-D
    rc, out = t.finish()
    assert rc == 0 and "Traceback" not in out, out


@pytest.mark.slow
def test_chat_in_a_terminal_tools_history_and_ctrl_c(model_dir, tmp_path):
    """The same CLI with the scripted model put in place of the weights: the calculator call is
    shown, history and /reset and /system reach the model, Ctrl-C stops a reply, Ctrl-C exits."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_chat import scripted_chat_model\n"
        "from lmstack.tokenizer import Tokenizer\n"
        "from lmstack import modelio\n"
        "modelio.load_model = lambda d, device='cpu', kind='lm': scripted_chat_model(Tokenizer.load(d))\n"
        "from lmstack.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    t = Terminal([sys.executable, str(driver), "chat", "--model", str(model_dir)], ROOT)
    t.read_until(PROMPT)
    t.type("What is 23 + 58?\n")
    out = t.read_until(PROMPT)
    assert "[calculator] 23 + 58 -> 81\n23 + 58 = 81.\n" in out, out
    t.type("and then?\n")
    assert "reply 2." in t.read_until(PROMPT)  # it saw both user messages
    t.type("/reset\n")
    t.read_until(PROMPT)
    t.type("again\n")
    assert "reply 1." in t.read_until(PROMPT)
    t.type("/system you are terse\n")
    t.read_until(PROMPT)
    t.type("hi\n")
    assert "(system) reply 2." in t.read_until(PROMPT)
    for attempt in range(3):  # on a loaded machine the reply may reach its end before Ctrl-C lands
        t.type("go slow\n")
        t.read_until("aaa")
        t.type("\x03")  # Ctrl-C during the reply: stops it, back at the prompt
        out = t.read_until(PROMPT)
        if "[interrupted]" in out:
            break
        assert "[reply cut" in out, out  # it ran to its end first: start over and try again
        t.type("/reset\n")
        t.read_until(PROMPT)
    assert "[interrupted]" in out, out
    t.type("one more\n")
    # The interrupted turn was dropped: the model sees only "hi" (or nothing after a /reset).
    assert f"reply {3 if attempt == 0 else 1}." in t.read_until(PROMPT)
    t.type("\x03")  # Ctrl-C at the prompt: exits
    try:
        t.proc.wait(15)
    except subprocess.TimeoutExpired:  # under heavy load a key typed as the prompt appears can be lost
        t.type("\x03")
    rc, out = t.finish(120)
    assert rc == 0 and "Traceback" not in out and "KeyboardInterrupt" not in out, out


@pytest.mark.slow
def test_chat_refuses_a_folder_that_is_not_a_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmstack", "chat", "--model", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "is not a model folder" in r.stderr, r.stderr
