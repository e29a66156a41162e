"""Small shared helpers: the user-error type and atomic file/folder writes.

Every command writes its output atomically: into a hidden temporary sibling first, then
one `os.replace`/`rename` makes it appear whole. A crash, a kill or Ctrl-C mid-write
leaves the previous output (or nothing) behind, never a half-written file that looks whole.
Temporaries are named .NAME.PID.RANDOM.tmp (.old: a replaced folder's previous copy), so the
next write of the same output can tell a dead writer's leftovers from a live one's, and clears
them (`clear_stale`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class UserError(Exception):
    """A mistake in what the user asked for (bad argument, bad file, unknown name).

    The CLI prints it as one line and exits non-zero; it never shows a traceback.
    """


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clear_stale(path: str | os.PathLike) -> None:
    """Delete what writers of `path` that are gone (killed, crashed) left beside it: the files and
    folders named .NAME.PID.RANDOM.tmp or .old whose process no longer runs; never anything else. A
    replaced folder's previous copy (.old) is moved back to `path` if `path` itself is missing
    (a kill between the two renames of a replace)."""
    path = Path(path)
    prefix = f".{path.name}."
    # The whole name, not just its start: .x.N.PID.R.tmp is a temporary of output x.N, not of x.
    # R (mkstemp's letters, digits and _; or hex) has no dot.
    shape = re.compile(re.escape(prefix) + r"(\d+)\.[^.]+\.(tmp|old)")
    for p in sorted(path.parent.glob(glob.escape(prefix) + "*")):
        m = shape.fullmatch(p.name)
        if m is None or _alive(int(m[1])):
            continue
        if m[2] == "old" and not path.exists():
            os.rename(p, path)
            print(f"{path} was being replaced when its writer stopped: its previous version is back", flush=True)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path` to write the file at; when the block ends, the file
    gets a normal file's mode, is flushed to disk and renamed to `path` in one step (readers see
    the old file or the new one, never half of one); on any exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp (and some writers) make it 0600
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see either the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def fsync(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to disk, so a rename after it publishes whole data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike):
    """A JSON file's content, or None when it is missing or not JSON (optional run files)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def read_jsonl(path: str | os.PathLike, what: str = "data file", skipped: dict | None = None):
    """(line number, parsed row) of each non-blank line. A missing file is a one-line UserError
    naming `what` (e.g. "prompts file"); so is a line that is not JSON, unless `skipped` is given
    (a Counter of reasons): then it counts there as "bad JSON" and is passed over."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: name the .jsonl file)" if path.is_dir() else ""
        raise UserError(f"{what} {path} not found{hint}")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nested past the parser
                if skipped is None:
                    raise UserError(f"{path}:{n}: not valid JSON ({str(e).splitlines()[0]})") from None
                skipped["bad JSON"] = skipped.get("bad JSON", 0) + 1
                continue
            yield n, row


def available_memory() -> int | None:
    """Bytes of memory this machine can still give (/proc/meminfo's MemAvailable); None where it
    cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def describe_counts(counts: dict) -> str:
    """{"bad JSON": 2, "empty": 1} -> "2 bad JSON, 1 empty" (the most frequent first), for the
    one-line summaries of what was read and what was skipped and why."""
    return ", ".join(f"{n:,} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def check_output_dir(out: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output folder before any work starts (fail fast, one clear line); what dead
    writers left beside it is cleared first."""
    out = Path(out)
    clear_stale(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"output folder {out} is not empty (use --force to replace it)")
    return out


def check_output_file(out: str | os.PathLike, flag: str = "--out", what: str = "file") -> Path:
    """Validate an output file's path before any work starts (fail fast, one clear line): not a
    folder, and not under a file (where the atomic write would fail only at the end)."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder (name the {what} to write)")
    above = next(p for p in out.parents if p.exists())  # "/" or "." at the latest
    if not above.is_dir():
        raise UserError(f"{flag} {out}: {above} is a file, not a folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.

    On any exception (including KeyboardInterrupt) the temporary folder is deleted and `out` is
    left as it was. Replacing an existing `out` (force) moves it aside first, under a name that
    says so (.NAME.PID.RANDOM.old), renames the new one in, then deletes the old: at every
    instant a complete output is at `out` or beside it, and a kill between the two renames is
    undone by the next write (`clear_stale`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out = check_output_dir(out, force)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=_temp_prefix(out), suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the result is a normal folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f"{_temp_prefix(out)}{os.urandom(4).hex()}.old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit() -> str | None:
    """The lmstack checkout's commit (with "+dirty" when it has uncommitted changes), if it is one."""
    here = Path(__file__).resolve().parent  # the lmstack package: "+dirty" for a change anywhere in it
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None
