"""`lmstack capabilities`: the emerged rule on constructed scores, the continuous scores eval
records (an answer given in the context is likelier; digits right on known strings), and the
tracker over a tiny model folder with two checkpoints and a hand-written results store."""

import dataclasses
import json

import pytest
import torch
from test_eval_lm import Copier
from tiny import fit_windows, random_gpt, save_model_dir, tokenizer_on

from lmstack.cli import main
from lmstack.eval.lm import ModelLM
from lmstack.eval.tasks import digit_accuracy, make_spec, run_task
from lmstack.experiments.capabilities import capabilities, emerged, results_tasks
from lmstack.model import GPT
from lmstack.modelio import read_config, save_weights
from lmstack.stats import summarize
from lmstack.utils import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Ana was born in Paris. Bo works at Acme in Rome. 2 + 3 = 5. 4 + 4 = 8. The code is 4821 ; 7305 ; 9164\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the rule -------------------------------------------------------------------------------------

def test_emerged_means_the_whole_interval_is_beyond_the_bar():
    assert emerged({"acc": 0.5, "ci": [0.4, 0.6], "chance": 0.25})
    assert not emerged({"acc": 0.3, "ci": [0.2, 0.4], "chance": 0.25})  # straddles chance
    # Above chance yet not above the answer's prior (the subject-swapped score): not emerged.
    assert not emerged({"acc": 0.5, "ci": [0.4, 0.6], "chance": 0.1, "baseline": 0.45})
    assert emerged({"acc": 0.5, "ci": [0.4, 0.6], "chance": 0.1, "baseline": 0.3})
    # No chance level: the bar is 0 (any right answer, surely more than none).
    assert emerged({"acc": 0.1, "ci": [0.05, 0.2]}) and not emerged({"acc": 0.0, "ci": [0.0, 0.1]})
    # Lower is better (copying's loss ratio, chance 1): the whole interval below it.
    assert emerged({"acc": 0.3, "ci": [0.2, 0.4], "chance": 1.0}, "lower")
    assert not emerged({"acc": 0.98, "ci": [0.9, 1.05], "chance": 1.0}, "lower")
    assert emerged({"acc": 0.2, "ci": [0.1, 0.3]}, "lower") is None  # a rate with no level to beat
    assert emerged({"acc": float("nan"), "ci": [0.0, 1.0], "n": 0, "chance": 0.1}) is None
    # On eval's own results (Wilson intervals): 30 of 100 clears 10%, 2 of 10 does not; a task's
    # score with the subject swapped is its prior; copying's ratio is lower-is-better with chance 1.
    results = {"tasks": {"a": {**summarize([1] * 30 + [0] * 70, 0.1), "better": "higher", "slices": {
                               "k=1": summarize([1] * 2 + [0] * 8, 0.1)}},
                         "b": {**summarize([1] * 30 + [0] * 70, 0.1), "swapped": summarize([1] * 28 + [0] * 72),
                               "better": "higher", "slices": {}}},
               "copy": {"ratio": 0.4, "ci": [0.3, 0.5], "sequences": 64}}
    cells = results_tasks(results)
    assert cells["a"]["emerged"] and cells["a"]["slices"]["k=1"]["emerged"] is False
    assert cells["b"]["baseline"] == cells["b"]["bar"] == 0.28 and cells["b"]["emerged"] is False
    assert cells["copy"]["better"] == "lower" and cells["copy"]["bar"] == 1.0 and cells["copy"]["emerged"]


def test_per_digit_accuracy_on_known_strings():
    assert digit_accuracy("81", "81") == 1.0
    assert digit_accuracy("71", "81") == 0.5
    assert digit_accuracy("181", "81") == pytest.approx(2 / 3)  # an extra digit is a wrong one
    assert digit_accuracy("1", "81") == 0.5  # units right, tens missing
    assert digit_accuracy("-5", "5") == 0.5 and digit_accuracy("-12", "-12") == 1.0
    assert digit_accuracy("1234", "1,234") == 1.0
    assert digit_accuracy(None, "81") == 0.0


# --- the continuous scores ------------------------------------------------------------------------

def test_an_answer_given_in_the_context_has_a_higher_log_probability(tmp_path):
    """A hand-written induction head ranks codes: where the prompt already holds the code, its log-
    probability is near 0; where it does not, near -ln V per token; exact match says the same
    only as 1 vs chance."""
    tok = tokenizer_on(tmp_path, TEXT * 30)
    codes = ["4821", "7305", "9164", "2650"]
    rows = []
    for i in range(24):
        code = codes[i % 4]
        given = i % 2 == 0
        rows.append({"cloze": (f"={code};" if given else "") + "=", "answer": code,
                     "distractors": [c for c in codes if c != code], "given": "yes" if given else "no"})
    data = write_jsonl(tmp_path / "codes.jsonl", rows)
    spec = make_spec({"name": "codes", "data": str(data), "kind": "choice", "prompt": "{cloze}",
                      "distractors": "distractors", "choice_prefix": "", "slices": ["given"]}, "test")
    r = run_task(ModelLM(Copier(tok.vocab_size, ctx=64), tok), spec)
    yes, no = r["slices"]["given=yes"], r["slices"]["given=no"]
    assert yes["acc"] == 1.0 and yes["answer_logprob"] > -0.5
    assert no["answer_logprob"] < yes["answer_logprob"] - 10  # three tokens at about -ln 300 each
    assert r["answer_logprob"] == pytest.approx((yes["answer_logprob"] + no["answer_logprob"]) / 2)
    assert all("answer_lp" in it for it in r["items"])


# --- the tracker ----------------------------------------------------------------------------------

SEQ = 64
TASKS = """
[[task]]
name = "born"
data = "born.jsonl"
kind = "choice"
prompt = "{q}"
distractors = "wrong"

[[task]]
name = "sums"
data = "sums.jsonl"
prompt = "{q}"
check = "number"
max_tokens = 4
slices = ["digits"]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with one trained model folder ("base"): checkpoints at steps 5 (the random
    start) and 10 (= its final weights), metrics with tokens and validation losses, no eval yet;
    and a task spec of its own."""
    root = tmp_path_factory.mktemp("cap")
    d = root / "run" / "base"
    d.mkdir(parents=True)
    tok = tokenizer_on(root, TEXT * 40)
    model = random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=SEQ)
    for step in (5, 10):  # the random start, then (trained) the final weights
        (d / "state" / f"step_{step:08d}").mkdir(parents=True)
        if step == 10:
            fit_windows(model, torch.tensor(tok.encode(TEXT * 40)), steps=40, window=33)
        save_weights(model, d / "state" / f"step_{step:08d}" / "model.safetensors")
    save_model_dir(d, model, tok)
    (d / "run.json").write_text(json.dumps({"model": dataclasses.asdict(model.cfg), "train": {"seq_len": SEQ}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "loss": 6 - s / 5, "tokens": 512 * s, **({"val_loss": 6.1 - s / 5} if s % 5 == 0 else {})}) + "\n"
        for s in range(1, 11)))
    (root / "run" / "speedrun.json").write_text(json.dumps({"preset": "tiny", "stages": {"pretrain": {}}}))
    write_jsonl(root / "born.jsonl", [{"q": f"{n} was born in", "answer": c, "wrong": [x for x in ("Paris", "Rome",
                                       "Acme") if x != c]} for n, c in (("Ana", "Paris"), ("Bo", "Rome"))] * 5)
    write_jsonl(root / "sums.jsonl", [{"q": f"{a} + {b} =", "answer": str(a + b), "digits": len(str(a + b))}
                                      for a, b in ((2, 3), (4, 4), (5, 6), (7, 9))])
    (root / "tasks.toml").write_text(TASKS)
    return root


def store_record(scale: str, acc: float, ci: list, flops: float, command: str = "lmstack experiment run reversal"):
    return {"experiment": "reversal", "variant": "plain", "scale": scale, "seed": 0, "commit": "abc", "time": "t",
            "model": f"runs/x/{scale}/chat", "stage": "base", "N": 1000, "N_total": 5000, "D": 10 ** 6, "flops": flops,
            "val_loss": 3.0, "command": command,
            "metrics": {"reversal_rank": {"acc": acc, "ci": ci, "n": 200, "chance": 0.1, "baseline": 0.12,
                                          "better": "higher",
                                          "slices": {"group=control": {"acc": 0.5, "ci": [0.4, 0.6], "n": 100,
                                                                       "chance": 0.1, "baseline": 0.12}}},
                        "copy": {"acc": 0.95, "ci": [0.9, 1.01], "n": 64, "chance": 1.0, "baseline": None,
                                 "better": "lower"}}}


def test_the_tracker_over_checkpoints_and_a_results_store(run, capsys):
    store = run / "results"
    store.mkdir()
    write_jsonl(store / "reversal.jsonl", [store_record("tiny", 0.3, [0.24, 0.37], 1e3),
                                           store_record("small", 0.13, [0.09, 0.18], 1e15)])
    out = run / "out"
    tasks = f"{run / 'tasks.toml'},copy"  # the spec's two tasks and in-context copying
    doc = capabilities([run / "run"], results=store, out=out, with_checkpoints=True, tasks=tasks, dtype="fp32")
    cols = doc["columns"]
    assert [c["label"] for c in cols] == ["reversal/plain base tiny seed 0", "run/base @5", "run/base",
                                          "reversal/plain base small seed 0"]  # by training compute
    ckpt, final = cols[1], cols[2]
    fpt = GPT(read_config(run / "run" / "base")).flops_per_token(SEQ)
    assert (ckpt["flops"], final["flops"]) == (fpt * 512 * 5, fpt * 512 * 10)
    assert (ckpt["D"], final["D"], ckpt["val_loss"], final["val_loss"]) == (2560, 5120, 5.1, 4.1)
    assert ckpt["kind"] == "checkpoint" and final["kind"] == "model" and ckpt["val_source"] == "training"
    assert set(final["tasks"]) == {"born", "sums", "copy"} and set(cols[0]["tasks"]) == {"copy"}  # --tasks only
    sums = final["tasks"]["sums"]
    assert {"acc", "ci", "bar", "emerged", "answer_logprob", "digit_acc"} <= set(sums) and sums["bar"] == 0.0
    assert set(sums["slices"]) == {"digits=1", "digits=2"}
    assert "answer_logprob" in final["tasks"]["born"]
    assert final["tasks"]["born"]["chance"] == pytest.approx(1 / 3, abs=1e-5)
    assert final["tasks"]["copy"]["better"] == "lower" and final["tasks"]["copy"]["bar"] == 1.0
    # The teacher-forced answer log-prob is the model's log-likelihood of " 5" after "2 + 3 =".
    saved = json.loads(next((run / "run" / "base" / "eval").glob("*.json")).read_text())  # evaluated: it had none
    item = next(it for it in saved["tasks"]["sums"]["items"] if it["line"] == 0)
    lm = ModelLM.load(run / "run" / "base", dtype="fp32", device="cpu")
    assert item["answer_lp"] == pytest.approx(lm.loglikelihood([("2 + 3 =", " 5")])[0][0], abs=1e-3)
    # The checkpoint was evaluated with its own weights (the random start), kept in OUT/evals.
    assert (out / "evals" / "run_base" / "step_00000005.json").is_file()
    assert ckpt["tasks"]["sums"]["answer_logprob"] != sums["answer_logprob"]

    md = (out / "capabilities.md").read_text()
    table = md.split("## Tasks")[1].split("## What fails")[0]
    assert "| **born** | 33.3% |" in table and "↳ digits=1" in table
    assert "| **copy** (lower is better) | 1.000 |" in table
    assert "| task | chance | reversal/plain base tiny seed 0 | run/base @5 | run/base |" in table
    # What fails at the largest scale measured: copying in the small record (its interval reaches 1),
    # with the command that runs it one scale up; the model folder's tasks, one preset up from its own.
    fails = {f["task"]: f for f in doc["fails"]}
    assert fails["copy"]["column"] == "reversal/plain base small seed 0"
    assert fails["copy"]["command"] == f"lmstack experiment run reversal --scale gpt2 --results {store}  " \
                                       "(gpt2 wants a GPU)"
    for task in set(fails) - {"copy"}:
        assert fails[task]["command"] == f"lmstack speedrun --preset small --out runs/small && " \
                                         f"lmstack capabilities runs/small --out {out}"
    assert "`lmstack experiment run reversal --scale gpt2" in md.split("## What fails")[1]
    assert json.loads((out / "capabilities.json").read_text())["columns"][1]["label"] == "run/base @5"
    for task in ("born", "sums", "copy"):
        assert (out / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    # Again: the checkpoint's results are reused, the model's own found in its folder: nothing evaluated.
    capsys.readouterr()
    again = capabilities([run / "run"], results=store, out=out, with_checkpoints=True, tasks=tasks, dtype="fp32")
    assert "evaluating" not in capsys.readouterr().out
    assert [c["tasks"] for c in again["columns"]] == [c["tasks"] for c in cols]


def test_bad_input_is_one_line_and_a_store_alone_is_enough(tmp_path, capsys):
    store = tmp_path / "results"
    store.mkdir()
    command = "lmstack experiment run reversal --scale {} --seeds 2 --out 'runs/my exp'"  # as the runner writes it
    write_jsonl(store / "reversal.jsonl", [store_record("tiny", 0.3, [0.24, 0.37], 1e9, command.format("tiny")),
                                           store_record("small", 0.13, [0.09, 0.18], 1e12, command.format("small"))])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    out = str(tmp_path / "out")
    for args, msg in ((["--out", out], "needs model or run folders"),
                      ([str(tmp_path / "empty"), "--out", out], "holds no model folder"),
                      ([str(tmp_path / "nope"), "--out", out], "does not exist"),
                      (["--results", str(store), "--tasks", "reversal_rank,factz", "--out", out],
                       "unknown task 'factz'"),
                      (["--results", str(store), "--out", str(tmp_path / "file.txt")], "is a file"),
                      (["--results", str(store), "--limit", "-1", "--out", out], "--limit")):
        assert main(["capabilities", *args]) == 2, args
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    assert main(["capabilities", "--results", str(store), "--out", out]) == 0
    assert "2 columns; 2 task(s) not emerged" in capsys.readouterr().out
    md = (tmp_path / "out" / "capabilities.md").read_text()
    rev = next(line for line in md.splitlines() if line.startswith("| **reversal_rank**"))
    assert "30.0% [24.0%–37.0%] ▲ · prior 12.0%" in rev and "13.0% [9.0%–18.0%] ▽ · prior 12.0%" in rev
    fails = md.split("## What fails")[1]
    assert ("| reversal_rank | reversal/plain base small seed 0 (1e+12 FLOPs) | 13.0% [9.0%–18.0%] ▽ · prior 12.0% "
            "| `lmstack experiment run reversal --scale gpt2 --seeds 2 --out 'runs/my exp'  (gpt2 wants a GPU)` "
            "|") in fails


def test_a_world_the_lineage_does_not_name_is_given_with_world(run, tmp_path):
    """A model trained on a copied data folder: its lineage finds no world, so evaluating a world
    task asks for --world in one line, and --world scores it."""
    from lmstack.world import generate

    world = generate(tmp_path / "world", people=20, seed=1, progress=False)
    out = tmp_path / "cap"
    with pytest.raises(UserError, match="pass --world DIR"):
        capabilities([run / "run"], out=out, with_checkpoints=True, tasks="facts_rank", limit=5, dtype="fp32")
    doc = capabilities([run / "run"], out=out, with_checkpoints=True, tasks="facts_rank", limit=5, dtype="fp32",
                       world=world)
    at5 = next(c for c in doc["columns"] if c["label"] == "run/base @5")
    assert at5["tasks"]["facts_rank"]["n"] == 5
