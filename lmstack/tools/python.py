"""The python tool: runs model-written Python in a separate process that the OS isolates.

The result is what the program printed (stdout, then stderr), or one "error: ..." string:
timed out, CPU time, memory, output, process, file size or disk limit, a non-zero exit (with
the traceback's last lines), or the sandbox unavailable. `run_python` never raises and returns
within its wall-clock limit (plus the moment it takes to kill and clean up, and at most one more
wall-clock limit waiting for a free slot when MAX_RUNNING programs run already).

There is no Python-level sandbox here (no restricted builtins): the program is an ordinary
`python -I -S` (isolated mode, standard library only) and the isolation is the kernel's.

What protects the user (Linux, where namespaces may be created):
- Namespaces, made by util-linux `unshare`: a **network** namespace (only a loopback that is down:
  no connection can be made, not even to 127.0.0.1 of the host), a **PID** namespace (the program
  sees only its own processes, so it cannot signal the caller or anything else; killing the
  namespace's first process kills every process in it), a **mount** namespace, and IPC and UTS.
- The filesystem is a whitelist. A new root (a small tmpfs, read-only once built) holds read-only
  bind mounts of the system's /usr, /bin, /sbin, /lib*, /etc and the Python interpreter's install
  folder, /dev/null, /dev/zero, /dev/random, /dev/urandom, the program at /main.py, and its
  working directory /sandbox, a fresh tmpfs of `disk` MB (also HOME and TMPDIR) that vanishes
  with the namespace. Everything else is not there: /root, /home, /work, /tmp, /var, /opt, /run,
  /proc, /sys, the repository, the model folders. Folders granted with `readonly_dirs` are bound
  read-only at their own paths. After `pivot_root` the old root is unmounted, so there is no
  path back to it.
- Privileges: run as root (here, in CI), the program drops to uid/gid 65534 (nobody) with no
  supplementary groups, an empty capability bounding set and no-new-privs (`setpriv`). Run as
  an ordinary user, the namespaces are made inside a user namespace (`unshare --user
  --map-root-user`) and the program keeps the user's uid with every capability dropped.
- Resource limits (setrlimit, set just before the program starts): CPU seconds, address space
  (memory), file size, processes (RLIMIT_NPROC, counted per uid: the PID namespace and the
  wall-clock kill make a fork bomb finite), open files, no core dumps; and `nice 19`.
- A wall-clock deadline kills the whole process group, and with it the PID namespace.
- The environment is empty but for PATH, HOME, TMPDIR and LANG: no inherited variable (API keys,
  tokens) reaches the program, and without /proc it cannot read the caller's.
- stdout and stderr are read into bounded buffers; past `output` bytes the program is stopped.
- At most MAX_RUNNING programs run at once (a server's threads cannot start a hundred).

What it does NOT protect against:
- Kernel bugs (a namespace exploit), CPU side channels (Spectre-like), and denial of service
  beyond the limits (limits are per process: `processes` x `memory` is the worst case, 8 GB by
  default, which is why `processes` is 16, not more; RLIMIT_NPROC counts every process of uid
  65534 on the machine, so two sandboxes running at once share the count). There is no seccomp
  filter: every system call the kernel allows an unprivileged process is allowed (including
  making a nested user namespace, where the mounts stay locked read-only).
- Reading world-readable system files: /etc (e.g. /etc/passwd, /etc/hostname) and the
  system's programs and libraries are visible by choice (read-only); secrets belong in the
  user's folders, which are not. Whatever a granted folder holds is readable.
- Where namespaces cannot be made (not Linux; a container that forbids `unshare`) the tool
  refuses with "error: sandbox unavailable: ..." unless built with `unisolated_ok=True`; then
  every result starts with a line naming what is missing (the program runs as the caller's user:
  it can read and write the user's files, use the network and see other processes), and only
  the resource limits, the wall-clock kill, the empty environment and the temporary working
  directory apply. `python_sandbox_report()` says which case this machine is.
"""

from __future__ import annotations

import functools
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from lmstack.tools.registry import Tool


@dataclass(frozen=True)
class SandboxLimits:
    wall: float = 10.0  # seconds of wall clock for the whole run; then everything is killed
    cpu: int = 5  # seconds of CPU time per process (RLIMIT_CPU)
    memory: int = 512  # MB of address space per process (RLIMIT_AS)
    file_size: int = 1  # MB per file written (RLIMIT_FSIZE)
    disk: int = 16  # MB in the working directory (a tmpfs; not bounded without namespaces)
    processes: int = 16  # processes and threads (RLIMIT_NPROC)
    output: int = 65_536  # bytes of stdout + stderr; past this the program is stopped


DEFAULT_LIMITS = SandboxLimits()  # read at each call: a test or a server may replace it
MAX_CODE = 100_000  # bytes of program text
MAX_RUNNING = 4  # programs running at once in this process; more wait (within their wall time)
OPEN_FILES = 256  # RLIMIT_NOFILE
UNPRIVILEGED = 65534  # nobody: the uid the program runs as when we are root
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
SYSTEM_DIRS = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/etc"]
READY = b"lmstack-sandbox-ready\n"  # the setup script's last word before the program starts

# Inside the new namespaces, as (namespace) root: build the new root, pivot into it, and run
# the program ("$@", not exec'd, so it is not the namespace's PID 1, which ignores signals).
# $1 the host folder holding root/ and main.py, $2 the working dir's owner, $3 its size in MB,
# $4 how many read-only folders follow, then those folders, then the command.
SETUP = r"""
set -eu
base=$1 uid=$2 disk=$3 n=$4; shift 4
root=$base/root
mount --make-rprivate /
mount -t tmpfs -o size=2m,mode=755,nosuid,nodev lmstack-root "$root"
while [ "$n" -gt 0 ]; do
  d=$1; shift; n=$((n - 1))
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$root$d"  # /bin -> usr/bin on a merged-/usr system
  elif [ -d "$d" ]; then
    mkdir -p "$root$d"; mount --bind "$d" "$root$d"; mount -o remount,bind,ro,nosuid,nodev "$root$d"
  fi
done
mkdir -p "$root/dev" "$root/sandbox" "$root/proc" "$root/.old"
for f in null zero random urandom; do touch "$root/dev/$f"; mount --bind "/dev/$f" "$root/dev/$f"; done
mount -t tmpfs -o "size=${disk}m,mode=700,uid=$uid,gid=$uid,nosuid,nodev" lmstack-work "$root/sandbox"
cp "$base/main.py" "$root/main.py"
mount -t proc proc "$root/proc"  # only for umount below (it reads /proc/self/mountinfo); removed
cd "$root"
pivot_root . .old
umount -l /.old
rmdir /.old
umount /proc
rmdir /proc
mount -o remount,ro,nosuid,nodev /
cd /sandbox
printf 'lmstack-sandbox-ready\n'
set +e
"$@"
exit $?
"""

# The first Python the sandbox runs: set the resource limits, then become the program (execv
# keeps the limits). argv: RLIMIT_NAME=soft,hard ... /path/to/main.py
LAUNCH = """\
import os, resource, sys
for arg in sys.argv[1:-1]:
    name, value = arg.split("=")
    which, (soft, hard) = getattr(resource, name), map(int, value.split(","))
    have = resource.getrlimit(which)[1]
    if have != resource.RLIM_INFINITY:
        soft, hard = min(soft, have), min(hard, have)
    try:
        resource.setrlimit(which, (soft, hard))
    except (ValueError, OSError) as e:  # say so (some systems refuse some limits): never pretend
        print(f"[sandbox: {name} could not be set: {e}]", file=sys.stderr)
os.execv(sys.executable, [sys.executable, "-I", "-S", sys.argv[-1]])
"""

_running = threading.BoundedSemaphore(MAX_RUNNING)


def run_python(code: str, limits: SandboxLimits | None = None, readonly_dirs=(),
               unisolated_ok: bool = False) -> str:
    """Run `code` as a Python program in the sandbox; what it printed, or "error: ...".
    readonly_dirs: folders the program may read (at their own paths), never write.
    unisolated_ok: where no OS sandbox can be made, run with resource limits only (and say so)
    instead of refusing."""
    try:
        return _run(code, limits or DEFAULT_LIMITS, readonly_dirs, unisolated_ok)
    except Exception as e:  # noqa: BLE001 - the tool's contract: a result, never an exception
        return f"error: the python tool failed: {type(e).__name__}: {e}"


def _run(code, limits: SandboxLimits, readonly_dirs, unisolated_ok: bool) -> str:
    if not isinstance(code, str):
        return "error: code must be a string"
    if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE:
        return f"error: the program is longer than {MAX_CODE} bytes"
    dirs = []
    for d in readonly_dirs:
        p = os.path.realpath(d)
        if not os.path.isdir(p) or p == "/":
            return f"error: readonly_dirs: {d} is not a folder that can be granted"
        dirs.append(p)
    kind, why = isolation()
    if kind is None and not unisolated_ok:
        return f"error: sandbox unavailable ({why}); the python tool runs code only in an OS sandbox"
    if not _running.acquire(timeout=limits.wall):
        return f"error: busy: {MAX_RUNNING} python programs are running already; try again"
    base = tempfile.mkdtemp(prefix="lmstack-python-")
    try:
        with open(os.path.join(base, "main.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        os.chmod(os.path.join(base, "main.py"), 0o644)  # readable by nobody inside
        cmd, cwd = _command(kind, base, limits, dirs)
        out, err, status, stopped = _supervise(cmd, cwd, limits, ready=kind is not None)
    finally:
        _running.release()
        shutil.rmtree(base, ignore_errors=True)
    result = _result(out, err, status, stopped, limits)
    return result if kind is not None else f"[not isolated: {why}; only resource limits apply]\n{result}"


def _command(kind, base: str, limits: SandboxLimits, dirs: list[str]) -> tuple[list[str], str]:
    """The command line (and working directory) that runs base/main.py for this kind of isolation."""
    mb = 1 << 20
    rlimits = {"RLIMIT_CPU": (limits.cpu, limits.cpu + 1), "RLIMIT_AS": (limits.memory * mb,) * 2,
               "RLIMIT_FSIZE": (limits.file_size * mb,) * 2, "RLIMIT_NPROC": (limits.processes,) * 2,
               "RLIMIT_NOFILE": (OPEN_FILES,) * 2, "RLIMIT_CORE": (0, 0)}
    python = _interpreter()
    launch = [python, "-I", "-S", "-c", LAUNCH, *(f"{k}={s},{h}" for k, (s, h) in rlimits.items())]
    nice = [shutil.which("nice", path=PATH) or "nice", "-n", "19"]
    if kind is None:
        os.mkdir(os.path.join(base, "work"))
        return nice + launch + [os.path.join(base, "main.py")], os.path.join(base, "work")
    os.mkdir(os.path.join(base, "root"))
    user = [f"--reuid={UNPRIVILEGED}", f"--regid={UNPRIVILEGED}", "--clear-groups"] if kind == "root" else []
    drop = [_tool("setpriv"), *user, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--",
            _tool("env"), "-i", f"PATH={PATH}", "HOME=/sandbox", "TMPDIR=/sandbox", "LANG=C.UTF-8"]
    prefix = os.path.realpath(sys.base_prefix)
    binds = SYSTEM_DIRS + ([] if any(prefix.startswith(d + os.sep) for d in SYSTEM_DIRS) else [prefix]) + dirs
    owner = UNPRIVILEGED if kind == "root" else 0
    unshare = [_tool("unshare"), *(["--user", "--map-root-user"] if kind == "userns" else []),
               "--mount", "--net", "--pid", "--fork", "--kill-child", "--ipc", "--uts"]
    return (nice + unshare + ["--", _tool("sh"), "-c", SETUP, "sh", base, str(owner), str(limits.disk),
                              str(len(binds)), *binds] + drop + launch + ["/main.py"]), base


def _interpreter() -> str:
    """The real interpreter (a venv's python is a link into the base install, which is what the
    sandbox mounts; the venv and its packages stay outside)."""
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if exe.startswith(prefix + os.sep):
        return exe
    return os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")


def _tool(name: str) -> str:
    path = shutil.which(name, path=PATH)
    if path is None:
        raise FileNotFoundError(f"{name} not found in {PATH}")
    return path


def _supervise(cmd, cwd, limits: SandboxLimits, ready: bool):
    """Run cmd, reading its output into bounded buffers until it ends, the wall clock runs out
    or the output passes the limit. -> (stdout, stderr, exit status, why it was stopped or None).
    `ready`: stdout starts with READY once the sandbox is set up (None in stdout if it never was)."""
    deadline = time.monotonic() + limits.wall
    proc = subprocess.Popen(cmd, cwd=cwd, env={"PATH": PATH, "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    cap = limits.output + (len(READY) if ready else 0)
    stopped = None
    with selectors.DefaultSelector() as sel:
        for f in bufs:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map() and stopped is None:
            left = deadline - time.monotonic()
            if left <= 0:
                stopped = "wall"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                bufs[key.fileobj] += chunk
                if sum(map(len, bufs.values())) > cap:
                    stopped = "output"
    if stopped is None:
        try:  # the output closed; the program may still run (it can close its stdout)
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stopped = "wall"
    if stopped is not None:
        try:  # the group holds unshare and the namespace's first process: its death ends the namespace
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    out = bytes(bufs[proc.stdout])
    if ready:
        out = out[len(READY):] if out.startswith(READY) else None
    status = proc.returncode
    if ready and out is not None and status > 128:  # the setup shell reports a signal as 128 + n
        status = -(status - 128)
    return out, bytes(bufs[proc.stderr]).decode("utf-8", "replace"), status, stopped


# The last line of a traceback -> the limit the program ran into.
_DIAGNOSES = [("MemoryError", "memory limit ({memory} MB of address space) reached"),
              ("[Errno 11] Resource temporarily unavailable", "process limit ({processes} processes) reached"),
              ("can't start new thread", "process limit ({processes} processes and threads) reached"),
              ("[Errno 27] File too large", "file size limit ({file_size} MB per file) reached"),
              ("[Errno 28] No space left on device", "disk limit ({disk} MB in the working directory) reached"),
              ("[Errno 24] Too many open files", f"open files limit ({OPEN_FILES}) reached")]


def _result(out: bytes | None, err: str, status: int, stopped, limits: SandboxLimits) -> str:
    text = "" if out is None else out.decode("utf-8", "replace")
    everything = text + ("\n" if text and err and not text.endswith("\n") else "") + err
    said = f"\n{_tail(everything)}" if everything.strip() else ""
    if stopped == "wall":
        return f"error: timed out after {limits.wall:g} s (wall clock); the program and all it started were killed{said}"
    if stopped == "output":
        return (f"error: output limit: the program wrote more than {limits.output} bytes and was stopped; "
                f"it began:\n{text[:1000]}")
    if out is None:
        return f"error: sandbox unavailable: its setup failed (exit status {status}): {_tail(err, 5)}"
    if status == 0:
        return everything.rstrip() or "(no output)"
    if status == -signal.SIGXCPU:
        return f"error: CPU time limit ({limits.cpu} s) reached; the program was killed{said}"
    if status == -signal.SIGKILL:
        return (f"error: the program was killed by SIGKILL (the CPU time limit's hard stop at {limits.cpu + 1} s, "
                f"or the program itself){said}")
    if status < 0:
        return f"error: the program was killed by {signal.Signals(-status).name}{said}"
    last = err.rstrip().rsplit("\n", 1)[-1]
    for needle, what in _DIAGNOSES:
        if needle in last:
            return f"error: {what.format(**vars(limits))}{said}"
    return f"error: the program exited with status {status}{said}"


def _tail(text: str, lines: int = 20, chars: int = 2000) -> str:
    """The last lines of a program's output (a traceback's end is what explains it)."""
    kept = "\n".join(text.rstrip().split("\n")[-lines:])
    return kept if len(kept) <= chars else "..." + kept[-chars:]


@functools.lru_cache(maxsize=None)
def isolation() -> tuple[str | None, str]:
    """How this machine isolates the program: ("root" | "userns", description), or (None, why
    not). Found once per process by running a probe program each way."""
    if sys.platform != "linux":
        return None, f"no Linux namespaces on {sys.platform}"
    try:
        for name in ("unshare", "setpriv", "sh", "env", "mount", "umount", "pivot_root"):
            _tool(name)
    except FileNotFoundError as e:
        return None, str(e)
    kinds = (["root"] if os.geteuid() == 0 else []) + ["userns"]
    probe = SandboxLimits(wall=30, cpu=5, memory=256, processes=4, output=1000)
    failures = []
    for kind in kinds:
        base = tempfile.mkdtemp(prefix="lmstack-python-")
        try:
            with open(os.path.join(base, "main.py"), "w") as f:
                f.write("print(6 * 7)\n")
            os.chmod(os.path.join(base, "main.py"), 0o644)
            out, err, status, stopped = _supervise(*_command(kind, base, probe, []), probe, ready=True)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        if out == b"42\n" and status == 0:
            return kind, {"root": f"namespaces (mount, pid, net, ipc, uts) as root, the program as uid {UNPRIVILEGED}",
                          "userns": "namespaces in a user namespace, the program with no capabilities"}[kind]
        failures.append(f"{kind}: {_tail(err, 2, 300) or f'exit status {status}'}")
    return None, "namespaces cannot be made here (" + "; ".join(failures) + ")"


def python_sandbox_report() -> str:
    """One paragraph on what the python tool's sandbox is on this machine."""
    kind, why = isolation()
    if kind is not None:
        return (f"python tool: isolated by Linux {why}: no network, no view of the user's files or other "
                f"processes, an empty environment, resource limits and a wall-clock kill")
    return (f"python tool: NOT isolated ({why}). It refuses to run code unless built with unisolated_ok=True; "
            "then the code runs as your user and can read and write your files, use the network and see "
            "other processes: only the resource limits, the wall-clock kill, the empty environment and a "
            "temporary working directory apply")


def python_tool(limits: SandboxLimits | None = None, readonly_dirs=(), unisolated_ok: bool = False) -> Tool:
    """The python tool with these limits and granted folders (read-only, at their own paths)."""
    dirs = [os.path.realpath(d) for d in readonly_dirs]

    def python(code: str) -> str:
        return run_python(code, limits, dirs, unisolated_ok)

    shown = limits or DEFAULT_LIMITS
    grant = f" It may read (not write) these folders: {', '.join(dirs)}." if dirs else ""
    return Tool(name="python", fn=python,
                description=("Run a Python 3 program (standard library only) in a sandbox with no network "
                             f"and no access to the user's files, for at most {shown.wall:g} s; the result is "
                             f"what it prints, so print() the answer.{grant}"),
                parameters={"type": "object",
                            "properties": {"code": {"type": "string", "description": "e.g. \"print(sum(range(101)))\""}},
                            "required": ["code"]})


PYTHON = python_tool()
