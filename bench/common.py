"""What every benchmark here shares: the load average to print beside each figure, the
one-line JSON result (printed, and appended to --json FILE when given), and, for the serving
benchmarks, a live `lmstack serve` in a subprocess (`running_server`).

A script imports this as `from common import ...`: Python puts the script's own folder (bench/)
first on sys.path, so the scripts run from anywhere (`.venv/bin/python bench/NAME.py`)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def emit(result: dict, json_path: str | None) -> None:
    line = json.dumps(result)
    print(line)
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")


# --- machine and process state ------------------------------------------------------------------

def busy_cpu_seconds() -> float:
    """CPU seconds used machine-wide: all but idle and iowait (steal counts: it is lost to us)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process has used (user + system)."""
    t = os.times()
    return t.user + t.system


# --- a live server -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM it if this process dies without reaching the finally."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    stopped_on_sigterm: bool | None = None  # set when the block ends: SIGTERM stopped it in time


@contextlib.contextmanager
def running_server(model, args=(), db=None, src=None, env=None, startup_timeout: float = 180.0,
                   stop_timeout: float = 20.0):
    """`python -m lmstack serve --model MODEL --port FREE --db DB ARGS...`, waited for on /health;
    yields a `Served`. db: the feedback database (default: a throwaway one); src: run lmstack
    from that checkout (on PYTHONPATH; the server runs in a temporary folder, so no checkout
    in the working folder comes first); env: variables added to the server's environment.
    Stopped with SIGTERM (SIGKILL past `stop_timeout` s) however the block ends; its log is
    printed if it failed to start or the block raised."""
    import httpx  # only the serving benchmarks need it (a dev dependency)

    tmp = tempfile.mkdtemp(prefix="lmstack-serve-bench-")
    port = free_port()
    cmd = [sys.executable, "-m", "lmstack", "serve", "--model", str(Path(model).resolve()), "--port", str(port),
           "--db", str(Path(db).resolve()) if db else os.path.join(tmp, "feedback.sqlite"), *map(str, args)]
    env = {**os.environ, **(env or {})}
    if src:
        env["PYTHONPATH"] = str(Path(src).resolve())
    log = open(os.path.join(tmp, "server.log"), "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True,
                            preexec_fn=_die_with_parent)
    served = Served(f"http://127.0.0.1:{port}", proc)
    ok = False
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {proc.returncode} before answering /health")
            try:
                if httpx.get(served.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > startup_timeout:
                raise RuntimeError(f"the server did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.2)
        print(f"server up in {time.monotonic() - t0:.1f} s: {' '.join(cmd)}", flush=True)
        yield served
        ok = True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=stop_timeout)
                served.stopped_on_sigterm = True
            except subprocess.TimeoutExpired:
                served.stopped_on_sigterm = False
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        if not ok and text.strip():
            print("--- server log (tail) ---\n" + text[-4000:] + "\n---", file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
