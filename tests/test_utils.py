"""lmstack/utils.py: the atomic writes' temporaries and their clean-up, reading JSON lines."""

import subprocess
import sys

from lmstack.utils import clear_stale


def dead_pid() -> int:
    """The pid of a process that has exited (so no writer of that pid runs)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_clear_stale_leaves_a_sibling_output_named_with_a_dot_alone(tmp_path):
    """Output x and output x.N (N a dead pid) share the prefix .x.: the live writer of x.N (pid 1
    always runs) keeps its temporary, and x.N's previous copy is never taken for x's."""
    gone = dead_pid()
    sibling_tmp = tmp_path / f".x.{gone}.1.abc.tmp"
    sibling_old = tmp_path / f".x.{gone}.1.def.old"
    sibling_tmp.write_text("x.N being written")
    sibling_old.mkdir()
    (sibling_old / "a").write_text("x.N's previous version")
    stale = tmp_path / f".x.{gone}.k3j_9z2q.tmp"  # a dead writer of x itself (mkstemp's alphabet)
    stale.write_text("half")
    clear_stale(tmp_path / "x")
    assert sibling_tmp.exists() and (sibling_old / "a").exists() and not (tmp_path / "x").exists()
    assert not stale.exists()
