"""lmstack/utils.py: the atomic writes' temporaries and their clean-up, reading JSON lines."""

import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.utils import UserError, check_output_file, clear_stale, read_json, read_jsonl


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


def test_read_jsonl_a_line_nested_past_the_parser_is_a_bad_line(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": 1}\n' + "[" * 100_000 + "\n" + '{"a": 2}\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: not valid JSON"):
        list(read_jsonl(f))
    skipped = {}
    assert [row for _, row in read_jsonl(f, skipped=skipped)] == [{"a": 1}, {"a": 2}]
    assert skipped == {"bad JSON": 1}
    (tmp_path / "run.json").write_text("[" * 100_000)
    assert read_json(tmp_path / "run.json") is None  # an optional file that is not JSON


def test_check_output_file_refuses_a_folder_and_a_path_under_a_file(tmp_path):
    with pytest.raises(UserError, match=r"^--out .* is a folder \(name the \.json file to write\)$"):
        check_output_file(tmp_path, what=".json file")
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"^--to .*f/a/b.jsonl: .*f is a file, not a folder$"):
        check_output_file(tmp_path / "f" / "a" / "b.jsonl", "--to")
    assert check_output_file(tmp_path / "new" / "b.jsonl") == tmp_path / "new" / "b.jsonl"
    assert check_output_file("b.jsonl") == Path("b.jsonl")
