"""`lmstack report`: the report card of a run folder, on a fabricated run (no training)."""

import json
import os
import re

import pytest

from lmstack.eval.report import report
from lmstack.utils import UserError
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

PNG = b"\x89PNG\r\n\x1a\n"
TINY = {"vocab_size": 256, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64, "max_seq_len": 128}


def _summary(acc, n=40, chance=None):
    s = {"n": n, "correct": acc * n, "acc": acc, "ci": [max(0.0, acc - 0.1), min(1.0, acc + 0.1)]}
    if chance is not None:
        s.update(chance=chance, above_chance=acc - 0.1 > chance)
    return s


def _task(acc, chance=None, slices=None, better="higher"):
    return {"kind": "choice" if chance else "generate", "format": "text", "metric": "accuracy", "better": better,
            "description": "", **_summary(acc, chance=chance), "items": [], "seconds": 0.1,
            "slices": {k: _summary(a, 20, chance) for k, a in (slices or {}).items()}}


def _results(tasks, bpb=None, fmt=None, time="2026-11-22T07:15:00+00:00"):
    r = {"model": "m", "chat": fmt is not None, "dtype": "float32", "world": None, "limit": 40, "time": time,
         "environment": {"python": "3.11", "torch": "2.x", "lmstack": "0.1.0", "platform": "TestOS",
                         "cpu": "Test CPU 9000", "cores": 2}, "seconds": 1.0, "tasks": tasks}
    if bpb is not None:
        r["lm"] = {"source": "data (val)", "tokens": 1000, "bytes": 4000, "loss": 1.5, "bpb": bpb}
    if fmt is not None:
        r["format"] = _summary(fmt)
        r["spelling"] = {"all": _summary(0.95), "facts_rank": _summary(1.0), "hallucination": _summary(0.3)}
    return r


def _stage(d, steps=30, start_loss=5.0, results=None, tok_per_s=1000.0):
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"dummy")  # discovery only: the report never loads weights
    (d / "config.json").write_text(json.dumps(TINY))
    (d / "run.json").write_text(json.dumps({"model": TINY, "train": {"seq_len": 64}}))
    recs = []
    for s in range(1, steps + 1):
        r = {"step": s, "loss": start_loss * 0.97 ** s, "lr": 1e-3, "grad_norm": 1.0, "tokens": 2048 * s,
             "tok_per_s": tok_per_s + s, "mfu": 0.3, "time": 0.5 * s}
        if s % 10 == 0:
            r.update(val_loss=r["loss"] * 1.05, val_bpb=0.5)
        recs.append(json.dumps(r))
    (d / "metrics.jsonl").write_text("\n".join(recs) + "\n")
    if results is not None:
        (d / "eval").mkdir()
        # An older result that must be ignored in favour of the newest (names are UTC timestamps).
        (d / "eval" / "20260101-000000.json").write_text(json.dumps(_results({"stale_task": _task(0.5)})))
        (d / "eval" / "20261122-071500.json").write_text(json.dumps(results))
        # A newer file that is not results (a saved `--compare`) is passed over.
        (d / "eval" / "20261122-080000.json").write_text(json.dumps({"a": "x", "b": "y", "tasks": {}}))


@pytest.fixture
def run(tmp_path):
    r = tmp_path / "run"
    base = _results({"facts_rank": _task(0.3, 0.1, {"relation=birth_city": 0.4, "relation=employer": 0.05}),
                     "arithmetic_text": _task(0.12, slices={"digits=1": 0.4})}, bpb=0.4868)
    chat = _results({"facts_rank": _task(0.5, 0.1, {"relation=birth_city": 0.6}),
                     "hallucination": _task(0.2, better="lower")}, bpb=0.51, fmt=0.98)
    _stage(r / "base", results=base)
    _stage(r / "chat", start_loss=2.0, results=chat, tok_per_s=2000.0)
    (r / "world").mkdir()  # not a stage: no model
    (r / "speedrun.json").write_text(json.dumps({"preset": "tiny", "people": 200, "overrides": ["train.max_steps=30"],
                                                 "stages": {"world": {"seconds": 0.4}, "pretrain": {"seconds": 20.0},
                                                            "sft": {"seconds": 10.0}}}))
    return r


def _cells(line):
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # "\|" inside a cell is escaped


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 5000, path


def test_report_of_a_run(run):
    path = report(run)
    assert path == run / "report.md"
    md = path.read_text()
    assert "# Report card: run" in md and "preset **tiny**" in md and "train.max_steps=30" in md
    assert "30.4 s" in md  # total time from speedrun.json
    # The task table: a column per stage in speedrun order, slices, dashes where a stage did not run a task.
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    assert header == "| task | chance | base | chat |"
    rows = {_cells(line)[0]: _cells(line) for line in md.splitlines() if line.startswith("| ")}
    assert rows["**facts_rank**"][2:] == ["30.0% [20.0–40.0] ▲", "50.0% [40.0–60.0] ▲"]
    assert rows["**facts_rank**"][1] == "10.0%"  # chance column
    hall = rows["**hallucination** (lower is better)"]
    assert hall[2] == "—" and hall[3].startswith("20.0%")  # base never ran it
    assert rows["**arithmetic_text**"][3] == "—"
    employer = rows["&nbsp;&nbsp;↳ relation=employer"]
    assert employer[2] == "5.0% [0.0–15.0]" and employer[3] == "—"
    bpb = next(v for k, v in rows.items() if k.startswith("**language modelling**"))
    assert bpb[2:] == ["0.4868", "0.5100"] and "bits per byte" in bpb[0]
    fmt = next(v for k, v in rows.items() if k.startswith("**chat format**"))
    assert fmt[2] == "—" and fmt[3].startswith("98.0%")
    spell = next(v for k, v in rows.items() if k.startswith("**spelling**"))
    assert spell[2] == "—" and spell[3].startswith("95.0%")
    # Under it, the tasks whose replies some stage garbles (under 90% well spelled), and only those.
    assert rows["&nbsp;&nbsp;↳ hallucination"][3].startswith("30.0%") and "&nbsp;&nbsp;↳ facts_rank" not in rows
    assert "stale_task" not in md  # only the newest results count
    # Costs: steps, tokens and the FLOPs of the tiny model.
    assert "| base | 20.0 s | 30 | 61.4 k |" in md and "| chat | 10.0 s | 30 |" in md
    assert "FLOP" in md and "Test CPU 9000" in md and "Wilson" in md
    for png in ["loss.png", "tasks.png", "throughput.png"]:
        assert f"]({png})" in md
        _check_png(run / png)
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]  # no temporaries left behind


def test_flops_match_the_model(run):
    import torch

    from lmstack.config import model_config_from_dict
    from lmstack.eval.report import costs, load_stage
    from lmstack.model import GPT

    c = costs(load_stage(run / "base", None))
    with torch.device("meta"):
        m = GPT(model_config_from_dict(TINY))
    # Counted by hand for TINY (d 64, SwiGLU 192, 2 layers, 4 heads of 16, 2 kv heads, vocab 256):
    # a layer is 2 x 64x64 + 2 x 64x32 + 3 x 64x192 + 2 x 64 = 49,280; 2 layers + the final norm
    # = 98,624 without embeddings; + 256 x 64 = 115,008. Per token at seq 64: 6 x (98,624 + the
    # head's 16,384) + 12 x 2 x 64 x 64 = 788,352; 30 steps of 2,048 tokens.
    assert c["flops"] == 788_352 * 30 * 2048 == m.flops_per_token(64) * 30 * 2048
    assert c["params"] == 115_008 == m.num_params() and c["params_ne"] == 98_624 == m.num_params(False)
    assert c["steps"] == 30 and c["tok_per_s"] == 1015.5 and c["mfu"] == 0.3


def test_stage_without_eval_and_out_dir(tmp_path, run):
    import shutil

    shutil.rmtree(run / "chat" / "eval")
    (run / "speedrun.json").unlink()
    (run / "chat" / "metrics.jsonl").write_text((run / "chat" / "metrics.jsonl").read_text() + '{"step": 31, "lo')
    out = tmp_path / "card"
    md = report(run, out=out).read_text()
    assert "chat: no eval results" in md and "| chat |" in md  # still a column and a costs row
    _check_png(out / "loss.png")
    assert not (run / "report.md").exists()


def test_single_model_folder(run, tmp_path):
    out = tmp_path / "one"
    md = report(run / "chat", out=out).read_text()
    assert "| task | chance | chat |" in md and "hallucination" in md
    _check_png(out / "loss.png")


def test_no_eval_anywhere_uses_this_machine(tmp_path):
    _stage(tmp_path / "r" / "base")
    (tmp_path / "r" / "tasks.png").write_bytes(PNG)  # a previous report's plot: now stale
    md = report(tmp_path / "r").read_text()
    assert "No stage has eval results yet" in md and "of the machine writing this report" in md
    assert not (tmp_path / "r" / "tasks.png").exists()
    _check_png(tmp_path / "r" / "loss.png")


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        report(tmp_path / "missing")
    (tmp_path / "empty" / "world").mkdir(parents=True)
    with pytest.raises(UserError, match="not a run or model folder"):
        report(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        report(tmp_path / "file")


@pytest.mark.slow
def test_cli(run, tmp_path):
    proc = run_cli("report", run / "nope")
    assert proc.returncode != 0 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("report", run, "--out", tmp_path / "card")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "card" / "report.md").is_file() and "report.md" in proc.stdout


def test_stage_order(run):
    from lmstack.eval.report import find_stages

    _stage(run / "a_dpo")  # a later stage speedrun.json does not name: after the named ones
    speedrun = json.loads((run / "speedrun.json").read_text())
    assert [d.name for d in find_stages(run, speedrun)] == ["base", "chat", "a_dpo"]
    # Without speedrun.json: the order their run.json was written.
    for i, name in enumerate(["chat", "a_dpo", "base"]):
        os.utime(run / name / "run.json", (1e9 + i, 1e9 + i))
    assert [d.name for d in find_stages(run, None)] == ["chat", "a_dpo", "base"]
    assert [d.name for d in find_stages(run / "base", None)] == ["base"]
