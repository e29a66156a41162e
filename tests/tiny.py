"""Tiny models for tests: train one for about a second, save it as a model folder.

A random model mostly repeats one token or ends its turn at once, which makes weak tests of
stop strings, greedy decoding, tool calls and accuracy; a second of training fixes that.
"""

import contextlib
import dataclasses
import faulthandler
import io
import os
import signal
import socket
import subprocess
import sys
import traceback

import torch

from lmstack.config import ModelConfig, load_config
from lmstack.model import GPT
from lmstack.modelio import save_weights, write_run_files
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.utils import atomic_write_json
from lmstack.world import generate


def fit_windows(model, data: torch.Tensor, steps: int = 150, batch: int = 8, window: int = 49, lr: float = 1e-2):
    """Train on random windows of one long token sequence (plain next-token loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - window, (batch,))
        x = torch.stack([data[i:i + window] for i in starts])
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def fit_sequences(model, seqs: list, steps: int = 300, lr: float = 1e-2):
    """Train on whole sequences (e.g. rendered chats), one per step, in turn."""
    seqs = [torch.as_tensor(s) for s in seqs]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        seq = seqs[step % len(seqs)][None]
        loss = torch.nn.functional.cross_entropy(model(seq[:, :-1])[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def tokenizer_on(d, text: str, vocab_size: int = 300) -> Tokenizer:
    """A tokenizer trained on `text` (written to d/text.txt; the tokenizer's files in d/tok)."""
    (d / "text.txt").write_text(text)
    return train_tokenizer([d / "text.txt"], vocab_size=vocab_size, out=d / "tok", progress=False)


def random_gpt(tok, seed: int = 0, **shape) -> GPT:
    """A GPT of this shape (ModelConfig's fields) for `tok`'s vocabulary, random weights from `seed`."""
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, **shape))


def save_model_dir(d, model, tok):
    """A model folder: tokenizer.json, config.json, model.safetensors."""
    tok.save(d)
    save_weights(model, d / "model.safetensors")
    atomic_write_json(d / "config.json", dataclasses.asdict(model.cfg))
    return d


def run_cli(*args, cwd=None, timeout=None, input=None, fresh=False) -> subprocess.CompletedProcess:
    """`lmstack ARGS` (arguments passed through str): its exit code, stdout and stderr as text.

    It runs in this process, as `python -m lmstack` runs it: the same `cli.main`, an uncaught
    exception printed as a traceback with exit code 1, SystemExit's code kept; the working
    directory, torch's thread count and the signal handlers are put back after. A fresh
    interpreter costs about 4 s of imports per call (torch, lm_eval), which was a quarter of
    the suite. A timeout is a watchdog: past it the test process dumps its stacks and exits,
    so a hang fails the suite instead of stalling it. `fresh=True` runs a real
    `python -m lmstack` subprocess, for what only a new process shows. `input` is the text on
    stdin (an empty one when None)."""
    argv = [str(a) for a in args]
    if fresh:
        return subprocess.run([sys.executable, "-m", "lmstack", *argv], capture_output=True, text=True,
                              cwd=cwd, timeout=timeout, input=input or "")
    from lmstack.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, threads, stdin = os.getcwd(), torch.get_num_threads(), sys.stdin
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if timeout:
        faulthandler.dump_traceback_later(timeout, exit=True, file=sys.__stderr__)
    try:
        if cwd is not None:
            os.chdir(cwd)
        sys.stdin = io.StringIO(input or "")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = 0 if e.code is None else e.code
                if not isinstance(rc, int):  # sys.exit("message")
                    print(rc, file=sys.stderr)
                    rc = 1
            except BaseException:  # noqa: BLE001 - what the interpreter would print at exit
                traceback.print_exc()
                rc = 1
    finally:
        if timeout:
            faulthandler.cancel_dump_traceback_later()
        os.chdir(here)
        sys.stdin = stdin
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return subprocess.CompletedProcess(["lmstack", *argv], rc, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app served by uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        import httpx

        self.thread.start()
        for _ in range(200):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


class Interrupt:
    """Wraps a batch source class (monkeypatched where a stage builds it) so that Ctrl-C arrives
    in the middle of a run: at its micro-batch `at` (0-based), from inside `next()`."""

    def __init__(self, cls, at: int):
        self.cls, self.at, self.calls = cls, at, 0

    def __call__(self, *a, **kw):
        batches = self.cls(*a, **kw)
        real_next = batches.next

        def next_():
            self.calls += 1
            if self.calls == self.at + 1:
                raise KeyboardInterrupt
            return real_next()
        batches.next = next_
        return batches


def world_and_tiny_model(root, folder: str, people: int, seed: int = 0):
    """A generated world (root/world), a tokenizer trained on it (root/tok, 600 ids) and an untrained
    model of the `tiny` preset saved with its run.json in root/folder: what a stage test trains from."""
    generate(root / "world", people=people, seed=seed, progress=False)
    train_tokenizer([root / "world" / "pretrain.jsonl"], vocab_size=600, out=root / "tok", progress=False)
    cfg = load_config("tiny", [], vocab_size=Tokenizer.load(root / "tok").vocab_size)
    torch.manual_seed(0)
    write_run_files(root / folder, cfg.to_dict(), root / "tok" / "tokenizer.json")
    save_weights(GPT(cfg.model), root / folder / "model.safetensors")
    return root
