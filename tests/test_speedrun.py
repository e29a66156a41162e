"""`lmstack speedrun` end to end (tiny preset: seconds), through the real command line."""

import json
import math

import pytest

from lmstack.config import load_config
from lmstack.speedrun import ALIGN_SET, GRPO_TOOLS, PRETRAIN_SET, WORLD_SET, knob_settings, speedrun, split_overrides
from lmstack.utils import UserError
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

ALIGNED = ("dpo", "ppo", "grpo")  # the aligned chat models (rm/ is the reward model)


@pytest.mark.slow
def test_speedrun_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("speedrun", "--preset", "tiny", "--out", str(out), "--set", "dpo.train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ["world/world.json", "tokenizer/tokenizer.json", "data/manifest.json",
                  "base/model.safetensors", "base/config.json", "base/tokenizer.json", "base/run.json",
                  "chat/model.safetensors", "chat/config.json", "chat/tokenizer.json", "chat/sft.json",
                  "rl_prompts/arithmetic.jsonl", "labels/chat.jsonl", "rm/reward_eval.json",
                  *[f"{m}/{f}" for m in ALIGNED for f in ("model.safetensors", "stage.json", "run.json")]]:
        assert (out / stage).is_file(), stage
    summary = json.loads((out / "speedrun.json").read_text())
    assert list(summary["stages"]) == ["world", "tokenizer", "data", "pretrain", "sft", "rl_prompts", "labels",
                                       "reward", "dpo", "ppo", "grpo", "eval", "winrate", "report"]
    final = summary["stages"]["pretrain"]["final"]
    assert final["val_loss"] < 0.8 * math.log(1024)  # well below a uniform guess over the vocabulary
    assert summary["stages"]["sft"]["final"]["step"] > 0
    ev = summary["stages"]["eval"]
    # The base model gets the text tasks, the assistant every task; both bits per byte.
    assert set(ev["base"]["tasks"]) == {"facts_rank", "vault_rank", "inverse_rank", "reversal_rank", "arithmetic_text"}
    assert {"facts_qa", "refusal", "hallucination", "arithmetic_tool"} <= set(ev["chat"]["tasks"])
    for stage in ("base", "chat", *ALIGNED):
        results = json.loads(open(ev[stage]["results"]).read())
        assert results["tasks"]["facts_rank"]["n"] == 20  # the tiny preset's limit per task
        for name, task in results["tasks"].items():  # the headline numbers are the scored items'
            assert ev[stage]["tasks"][name] == round(sum(it["hit"] for it in task["items"]) / task["n"], 4)
        # well below a uniform guess over the 1,024 tokens (10 bits a token) on the validation text
        lm = results["lm"]
        assert ev[stage]["val_bpb"] == round(lm["bpb"], 4) and lm["bpb"] < 0.8 * 10 * lm["tokens"] / lm["bytes"]
    for stage in ("chat", *ALIGNED):  # the aligned models are chat models: every task
        assert set(ev[stage]["tasks"]) == set(ev["chat"]["tasks"]) and 0 <= ev[stage]["format"] <= 1
        # SFT taught the format: most replies to questions end their turn (a model that never learnt
        # it: ~0). Arithmetic is left out: the tiny model's replies to it are digit loops that never
        # close (the world's worked scratchpads are long), whatever the format it learnt.
        results = json.loads(open(ev[stage]["results"]).read())
        closed = [it["closed"] for name, task in results["tasks"].items() if not name.startswith("arithmetic")
                  for it in task["items"] if "closed" in it]
        assert len(closed) >= 100 and sum(closed) / len(closed) >= 0.5, (stage, sum(closed) / len(closed))
        # Spelling is scored on every greedy chat reply (eval/spelling.py).
        replies = sum("reply" in it for task in results["tasks"].values() if task["format"] == "chat"
                      for it in task["items"])
        assert results["spelling"]["all"]["n"] == replies and ev[stage]["spelling"] == round(
            results["spelling"]["all"]["acc"], 4)
    st = summary["stages"]
    assert st["rl_prompts"]["rows"] > 0 and st["dpo"]["final"]["step"] == 4  # dpo.KEY reached the DPO stage only
    assert st["ppo"]["final"]["step"] > 0 and st["grpo"]["final"]["step"] > 0
    assert st["reward"]["held_out"]["n"] > 0 and st["reward"]["held_out"]["accuracy"] > 0.5  # above chance
    assert set(st["ppo"]["held_out_reward"]) == {"before", "after"}
    # the labeller compared pairs of chat/'s own samples; the reward model learnt from them too
    labelled = (out / "labels" / "chat.jsonl").read_text().splitlines()
    assert st["labels"]["judge"] == "labeller" and st["labels"]["pairs"] == len(labelled)
    assert st["labels"]["pairs"] + sum(st["labels"]["skipped"].values()) == st["labels"]["prompts"] == 200
    assert all(json.loads(r)["meta"]["source"] == "labeller" for r in labelled)
    assert json.loads((out / "rm" / "stage.json").read_text())["data"] == [
        str(out / "world" / "comparisons.jsonl"), str(out / "labels" / "chat.jsonl")]
    # PPO-ptx by default: the SFT loss on the conversations chat/ was fine-tuned on (its lineage)
    assert json.loads((out / "ppo" / "stage.json").read_text())["ptx_data"] == [str(out / "world" / "sft.jsonl")]
    assert "ptx_loss" in json.loads((out / "ppo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert json.loads((out / "grpo" / "run.json").read_text())["rl"]["tools"] == GRPO_TOOLS
    for m in ("dpo", "ppo"):  # ground-truth win rate against the SFT model
        w = st["winrate"][m]
        saved = json.loads((out / m / "winrate" / "vs_chat.json").read_text())
        assert w["path"] == str(out / m / "winrate" / "vs_chat.json") and saved["n"] == w["n"] == 40
        assert w["wins"] + w["losses"] + w["ties"] == 40 and len(w["ci"]) == 2
        decided = w["wins"] + w["losses"]  # the win rate counts the pairs the labeller decides
        if decided:
            assert w["win_rate"] == saved["win_rate"] == w["wins"] / decided
        else:
            assert w["win_rate"] is None and math.isnan(saved["win_rate"])  # all ties: no rate
    report = (out / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| task | chance |"))
    assert "facts_qa" in report and header.startswith("| task | chance | base | chat |")
    # a column per stage that writes answers, in pipeline order; the reward model gets a line
    assert header.strip("| ").split(" | ")[2:] == ["base", "chat", *ALIGNED]
    assert "- rm: a reward model; held-out pairwise accuracy" in report
    assert all((out / png).stat().st_size > 1000 for png in ("loss.png", "tasks.png"))
    assert "speedrun done" in proc.stdout and f"lmstack chat --model {out / 'chat'}" in proc.stdout
    assert "user:" in proc.stdout and "assistant:" in proc.stdout and "[truth:" in proc.stdout
    for line in ("reward model: held-out pairwise accuracy", "DPO: win rate vs chat", "PPO: win rate vs chat",
                 "GRPO: arithmetic", f"--model {out / 'dpo'}"):
        assert line in proc.stdout, line
    for label in ("DPO", "PPO"):  # the refusals the win rate ties on benign requests, beside it
        ev, chat = st["eval"][label.lower()]["tasks"], st["eval"]["chat"]["tasks"]
        assert (f"refuses {ev['refusal']:.0%} of harmful requests (chat {chat['refusal']:.0%}) and "
                f"{ev['false_refusal']:.0%} of benign near-misses (chat {chat['false_refusal']:.0%})") in next(
            line for line in proc.stdout.splitlines() if line.startswith(f"  {label}: win rate vs chat")), label

    # A second run refuses to overwrite without --force, and --force starts over.
    again = run_cli("speedrun", "--preset", "tiny", "--out", str(out))
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr
    # --no-align: today's pipeline, stopping after SFT.
    forced = run_cli("speedrun", "--preset", "tiny", "--out", str(out), "--force", "--no-align",
                     "--set", "train.max_steps=4", "--set", "sft.train.max_steps=3")
    assert forced.returncode == 0, forced.stderr[-2000:]
    stages = json.loads((out / "speedrun.json").read_text())["stages"]
    assert stages["pretrain"]["final"]["step"] == 4 and stages["sft"]["final"]["step"] == 3
    assert list(stages) == ["world", "tokenizer", "data", "pretrain", "sft", "eval", "report"]
    assert set(stages["eval"]) == {"seconds", "base", "chat"}
    assert not any((out / d).exists() for d in ("rl_prompts", "labels", "rm", *ALIGNED))
    assert "| task | chance | base | chat |\n" in (out / "report.md").read_text()
    assert "win rate" not in forced.stdout and f"lmstack chat --model {out / 'chat'}" in forced.stdout


@pytest.mark.slow
def test_speedrun_never_deletes_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    proc = run_cli("speedrun", "--preset", "tiny", "--out", str(precious), "--force")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (precious / "thesis.txt").read_text() == "years of work"


@pytest.mark.slow
def test_speedrun_bad_preset_or_key_fails_before_any_work(tmp_path):
    for preset, sets, align in (("huge", [], True), *(("tiny", [k], True) for k in (
            "train.nope=1", "sft.train.nope=1", "sft.model.n_layer=3", "dpo.train.nope=1", "rm.model.n_layer=3",
            "grpo.rl.max_new_tokens=200",  # longer than the tiny model's 128-token context
            "world.nope=1", "world.qa_docs=many", "world.permute=maybe", "tokenizer.vocab=3",
            "tokenizer.conversations=maybe")),
            ("tiny", ["ppo.train.max_steps=5"], False)):  # a stage that will not run (--no-align)
        with pytest.raises(UserError) as e:  # in-process: a subprocess each cost ~4 s of imports
            speedrun(out=tmp_path / "r", preset=preset, overrides=sets, align=align)
        assert "\n" not in str(e.value), str(e.value)
        stage = (sets or ["-"])[-1].partition(".")[0]
        assert stage not in ALIGNED + ("rm",) or stage in str(e.value), str(e.value)  # names the stage
        assert not (tmp_path / "r").exists()
    # the command line turns it into one line on stderr, no traceback
    proc = run_cli("speedrun", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "dpo.train.nope=1")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "dpo" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_split_overrides_routes_each_stage_its_keys():
    sets = split_overrides("tiny", ["train.lr=1", "train.seed=3", "dpo.pref.beta=0.5", "grpo.rl.group_size=2",
                                    "rm.train.max_steps=9", "world.qa_docs=2", "world.permute=false"])
    assert sets["pretrain"] == ["train.lr=1", "train.seed=3"]
    # the world's text (tiny's own settings first): no training keys
    assert sets["world"] == ["skill_people=0", "basic_skills=True", "qa_docs=2", "permute=false"]
    assert knob_settings("world", sets["world"]) == {"skill_people": 0, "basic_skills": True, "qa_docs": 2,
                                                     "permute": False}
    # a shared key reaches every training stage, not the knobs
    assert all("train.seed=3" in v for k, v in sets.items() if k not in ("world", "tokenizer"))
    assert sets["dpo"][-2:] == ["train.seed=3", "pref.beta=0.5"] and "pref.beta=0.5" not in sets["rm"]
    assert sets["grpo"][-1] == "rl.group_size=2" and f"rl.tools={GRPO_TOOLS}" in sets["grpo"]
    tiny_rm = ALIGN_SET["tiny"]["rm"]
    assert sets["rm"][:len(tiny_rm)] == tiny_rm and sets["rm"][-1] == "train.max_steps=9"
    assert split_overrides("small", [])["dpo"] == []  # small: the measured presets, unchanged
    # small's own pretraining and world settings come first (a --set wins over them) and are valid
    small = split_overrides("small", ["optim.lr=5e-4", "world.qa_docs=0"])
    assert small["pretrain"] == [*PRETRAIN_SET["small"], "optim.lr=5e-4"]
    assert knob_settings("world", small["world"]) == {**WORLD_SET["small"], "qa_docs": 0}
    # the tokenizer's knobs: none by default, typed, and only its own
    assert small["tokenizer"] == [] and split_overrides("small", ["tokenizer.conversations=true"])["tokenizer"] == [
        "conversations=true"]
    assert knob_settings("tokenizer", ["conversations=true"]) == {"conversations": True}
    for bad, message in (("conversations=maybe", "conversations takes true or false"),
                         ("vocab=3", "the tokenizer's keys are conversations")):
        with pytest.raises(UserError, match=message):
            knob_settings("tokenizer", [bad])
    assert load_config("small", small["pretrain"]).optim.lr == 5e-4
