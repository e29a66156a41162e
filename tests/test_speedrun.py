"""`lmstack speedrun` end to end (tiny preset: seconds), through the real command line."""

import json
import math
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmstack", *args], capture_output=True, text=True)


def test_speedrun_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("speedrun", "--preset", "tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ["world/world.json", "tokenizer/tokenizer.json", "data/manifest.json",
                  "base/model.safetensors", "base/config.json", "base/tokenizer.json", "base/run.json",
                  "chat/model.safetensors", "chat/config.json", "chat/tokenizer.json", "chat/sft.json"]:
        assert (out / stage).is_file(), stage
    summary = json.loads((out / "speedrun.json").read_text())
    assert list(summary["stages"]) == ["world", "tokenizer", "data", "pretrain", "sft", "eval", "report"]
    final = summary["stages"]["pretrain"]["final"]
    assert final["val_loss"] < 0.8 * math.log(1024)  # well below a uniform guess over the vocabulary
    assert summary["stages"]["sft"]["final"]["step"] > 0
    ev = summary["stages"]["eval"]
    # The base model gets the text tasks, the assistant every task; both bits per byte.
    assert set(ev["base"]["tasks"]) == {"facts_rank", "inverse_rank", "reversal_rank", "arithmetic_text"}
    assert {"facts_qa", "refusal", "hallucination", "arithmetic_tool"} <= set(ev["chat"]["tasks"])
    for stage in ("base", "chat"):
        assert all(0 <= v <= 1 for v in ev[stage]["tasks"].values()) and ev[stage]["val_bpb"] > 0
        results = json.loads(open(ev[stage]["results"]).read())
        assert results["tasks"]["facts_rank"]["n"] == 20  # the tiny preset's limit per task
    assert 0 <= ev["chat"]["format"] <= 1
    report = (out / "report.md").read_text()
    assert "facts_qa" in report and "| task | chance | base | chat |" in report
    assert all((out / png).stat().st_size > 1000 for png in ("loss.png", "tasks.png"))
    assert "speedrun done" in proc.stdout and f"lmstack chat --model {out / 'chat'}" in proc.stdout
    assert "user:" in proc.stdout and "assistant:" in proc.stdout and "[truth:" in proc.stdout

    # A second run refuses to overwrite without --force, and --force starts over.
    again = run_cli("speedrun", "--preset", "tiny", "--out", str(out))
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr
    forced = run_cli("speedrun", "--preset", "tiny", "--out", str(out), "--force", "--set", "train.max_steps=4",
                     "--set", "sft.train.max_steps=3")
    assert forced.returncode == 0, forced.stderr[-2000:]
    stages = json.loads((out / "speedrun.json").read_text())["stages"]
    assert stages["pretrain"]["final"]["step"] == 4 and stages["sft"]["final"]["step"] == 3


def test_speedrun_never_deletes_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    proc = run_cli("speedrun", "--preset", "tiny", "--out", str(precious), "--force")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_speedrun_bad_preset_or_key_fails_before_any_work(tmp_path):
    for args in (["--preset", "huge"], ["--set", "train.nope=1"], ["--set", "sft.train.nope=1"],
                 ["--set", "sft.model.n_layer=3"]):
        proc = run_cli("speedrun", "--out", str(tmp_path / "r"), *args)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "r").exists()
