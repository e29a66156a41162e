"""System 2 (lmstack/think/): the estimators against brute force, the curve on scripted replies
whose right answers are known, and `lmstack think curve` end to end on a tiny model."""

import itertools
import json
import math
import random
import re
from types import SimpleNamespace

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.eval.lm import Reply
from lmstack.model import GPT
from lmstack.think import curve as C
from lmstack.think.estimators import best_of_k, bootstrap_ci, ks_up_to, majority_at_k, pass_at_k
from lmstack.tokenizer import train_tokenizer
from tiny import run_cli, save_model_dir  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong: always
    # the mean over every k-subset of "some sample is right"
    hits = [1, 0, 0, 1, 0, 0, 0]
    subsets = list(itertools.combinations(range(7), 3))
    assert pass_at_k(7, 2, 3) == pytest.approx(sum(any(hits[i] for i in s) for s in subsets) / len(subsets))


def test_best_of_k_is_exact_against_every_subset():
    rng = random.Random(0)
    for _ in range(20):
        n, k = rng.randint(1, 8), None
        scores = [rng.random() for _ in range(n)]
        hits = [rng.randint(0, 1) for _ in range(n)]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = sum(hits[max(s, key=lambda i: scores[i])] for s in subsets) / len(subsets)
            assert best_of_k(scores, hits, k) == pytest.approx(brute)
    # a verifier that puts the right samples first is the oracle; one that puts them last is worst
    hits = [1, 0, 0, 0]
    assert best_of_k([9, 1, 2, 3], hits, 2) == pytest.approx(pass_at_k(4, 1, 2))
    assert best_of_k([0, 1, 2, 3], hits, 2) == 0.0


def test_majority_vote_counts_ties_and_abstentions():
    assert majority_at_k(["5", "5", "7"], "5", 3) == 1.0
    assert majority_at_k(["5", "7"], "5", 2) == 0.5  # a tie of two: a coin flip
    assert majority_at_k([None, None, "7"], "7", 3) == 1.0  # no answer: no vote
    assert majority_at_k([None, None], "7", 2) == 0.0
    answers = ["5", "5", "7", "8", "5", "9"]
    subsets = list(itertools.combinations(answers, 3))
    exact = sum(majority_at_k(list(s), "5", 3) for s in subsets) / len(subsets)
    assert majority_at_k(answers, "5", 3, draws=4000) == pytest.approx(exact, abs=0.03)
    # a vote of one is exact, so it never exceeds pass@1 (256 sampled draws gave 0.043 here, over 1/32)
    rare = ["7"] + ["8"] * 20 + [None] * 11
    assert majority_at_k(rare, "7", 1, draws=256, seed=0) == pass_at_k(32, 1, 1) == 1 / 32


def test_bootstrap_and_ks():
    assert ks_up_to(16) == [1, 2, 4, 8, 16] and ks_up_to(6) == [1, 2, 4, 6] and ks_up_to(1) == [1]
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert bootstrap_ci([1.0] * 10) == [1.0, 1.0]


class ScriptedLM:
    """Replies drawn from a known distribution: right with probability p, else one of five wrong
    numbers; greedy always says the most likely wrong answer (a model whose single best guess is
    wrong, while the right answer is its most frequent sample)."""

    def __init__(self, p: float):
        self.p, self.tok = p, SimpleNamespace(encode=lambda text: text.split())

    def chat(self, convs, max_tokens, tools=None, temperature=0.0, seed=0):
        rng = random.Random(seed)
        out = []
        for c in convs:
            a, b = map(int, c[-1]["content"].split("What is ")[1].split("?")[0].split(" + "))
            if temperature == 0.0:
                n = a + b + 1
            else:
                n = a + b if rng.random() < self.p else a + b + rng.randint(1, 5)
            out.append(Reply(f"Ones: ... Answer: {a} + {b} = {n}", True))
        return out


def problems(n=40):
    rng = random.Random(1)
    return [{"question": f"What is {a} + {b}?", "answer": str(a + b), "digits": 2}
            for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n))]


def test_self_consistency_beats_greedy_when_the_right_answer_is_the_mode():
    records = C.sample(ScriptedLM(0.4), problems(), n=16)
    assert all(len(r["samples"]) == 16 and r["greedy"]["hit"] == 0 for r in records)
    res = C.curve(records)
    ks = [p["k"] for p in res["points"]]
    assert ks == [1, 2, 4, 8, 16] and res["greedy"]["acc"] == 0.0
    maj = [p["majority"]["acc"] for p in res["points"]]
    oracle = [p["pass"]["acc"] for p in res["points"]]
    assert 0.3 < maj[0] < 0.5 and maj[-1] > 0.75  # 40% per sample; the vote of 16 mostly right
    assert all(b >= a - 1e-9 for a, b in zip(oracle, oracle[1:]))  # pass@k never falls with k
    assert all(o >= m - 0.02 for o, m in zip(oracle, maj))  # a vote is right only if some sample is
    lo, hi = res["points"][-1]["majority"]["ci"]
    assert lo <= maj[-1] <= hi
    assert res["gain_over_greedy"] > 0.75 and res["majority_saturates_at_k"] in (8, 16)
    assert res["points"][1]["tokens"] == pytest.approx(2 * res["points"][0]["tokens"])


def test_a_verifier_that_knows_picks_the_right_sample():
    records = C.sample(ScriptedLM(0.2), problems(20), n=8)
    for r in records:  # a perfect verifier, and a useless one on a copy
        for s in r["samples"]:
            s["score"] = float(s["hit"])
    good = C.curve(records)
    assert [p["verifier"]["acc"] for p in good["points"]] == pytest.approx([p["pass"]["acc"] for p in good["points"]])
    for r in records:
        for s in r["samples"]:
            s["score"] = -float(s["hit"])
    bad = C.curve(records)
    assert bad["points"][-1]["verifier"]["acc"] == 0.0 and "| 8 |" in C.table(bad)


def test_load_problems_filters_and_limits(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in problems(30)[:20] + [
        {"question": "What is 1 + 2?", "answer": "3", "digits": 1}]))
    assert len(C.load_problems(f, {"digits": [1]})) == 1
    assert len(C.load_problems(f, limit=5)) == 5
    with pytest.raises(Exception, match="no problems left"):
        C.load_problems(f, {"digits": [4]})
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(Exception, match="needs \"question\" and \"answer\""):
        C.load_problems(tmp_path / "bad.jsonl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("think")
    (d / "a.txt").write_text("What is 23 + 58? Think step by step. Answer: 23 + 58 = 81\n" * 50)
    tok = train_tokenizer([d / "a.txt"], vocab_size=300, out=d / "tok", progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    return save_model_dir(d / "model", GPT(cfg), tok)


def test_think_curve_end_to_end(model_dir, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in problems(4)))
    out = tmp_path / "out"
    r = run_cli("think", "curve", "--model", str(model_dir), "--problems", str(f), "--n", "4", "--max-tokens", "8",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "curve.json").read_text())
    assert res["problems"] == 4 and res["n"] == 4 and [p["k"] for p in res["points"]] == [1, 2, 4]
    assert res["points"][0]["flops"] > 0 and "2" in res["by"]["digits"]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(x["samples"]) == 4 for x in rows)
    assert (out / "curve.png").stat().st_size > 0 and "| greedy |" in (out / "curve.md").read_text()
    # bad input: one line, non-zero, nothing written
    bad = run_cli("think", "curve", "--model", str(model_dir), "--problems", str(f), "--prompt", "{nope}",
                  "--out", str(tmp_path / "o2"))
    assert bad.returncode == 2 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "o2").exists()
    again = run_cli("think", "curve", "--model", str(model_dir), "--problems", str(f), "--out", str(out))
    assert again.returncode == 2 and "Traceback" not in again.stderr  # an existing folder without --force
    assert math.isfinite(res["greedy"]["acc"])


# --- verifiers and the step-level search ---------------------------------------------------------

from lmstack.think import beam as B  # noqa: E402
from lmstack.think import verifier as V  # noqa: E402
from lmstack.world import arithmetic as ar  # noqa: E402


def _rec(a, op, b, texts):
    p = {"question": f"What is {a} {op} {b}?", "answer": str(ar.compute(a, op, b)), "a": a, "op": op, "b": b,
         "digits": len(str(a))}
    truth = str(ar.compute(a, op, b))
    from lmstack.world.labeller import final_number
    return {"problem": p, "truth": truth,
            "samples": [{"text": t, "answer": final_number(t), "hit": int(final_number(t) == truth)} for t in texts]}


def test_first_wrong_step_and_process_pairs():
    right = ar.worked(47, "+", 38)
    steps = right.split("\n")
    wrong = right.replace("Tens: 4 + 3 + 1 = 8. Write 8", "Tens: 4 + 3 + 1 = 9. Write 9").replace("= 85", "= 95")
    assert wrong.count("9") >= 2 and wrong != right
    assert V.first_wrong_step(right, steps) is None
    assert V.first_wrong_step(wrong, steps) == 2
    assert V.first_wrong_step("\n".join(steps[:2]), steps) == 2  # stopped early
    recs = [_rec(47, "+", 38, [right, wrong, wrong, "\n".join(steps[:2]), "", " \n"])]  # + two empty replies
    pp = V.process_pairs(recs)
    assert len(pp) == 1  # the wrong sample once (deduplicated); stopping early is not a step error
    assert pp[0]["chosen"] == "\n".join(steps[:3]) and pp[0]["rejected"] == "\n".join(wrong.split("\n")[:3])
    assert pp[0]["meta"] == {"type": "process", "op": "+", "digits": 2, "step": 2}
    op_ = V.outcome_pairs(recs)
    assert all(p["chosen"] == right and p["rejected"] != right for p in op_) and len(op_) == 2
    assert all(p["rejected"].strip() for p in op_ + pp)  # empty replies make no comparison (reward train refuses them)
    assert op_[0]["prompt"] == [{"role": "user", "content": "What is 47 + 38? Think step by step."}]


def test_training_problems_never_include_the_probes(tmp_path):
    from lmstack.world import generate
    from lmstack.world.rl_prompts import held_out
    w = generate(tmp_path / "w", people=40, progress=False, probe_arith_per_cell=20)
    rows = V.training_problems(w, digits=(1, 2), per_op=30)
    held = held_out(w)
    assert rows and not {(r["a"], r["op"], r["b"]) for r in rows} & held
    assert {r["digits"] for r in rows} == {1, 2} and all(str(ar.compute(r["a"], r["op"], r["b"])) == r["answer"] for r in rows)
    with pytest.raises(Exception, match="digits"):
        V.training_problems(w, digits=(9,))


class StepLM:
    """Writes the true solution line by line, each line right with probability p (else its last
    number is one too big); ends its turn after the answer line."""

    def __init__(self, problems, p):
        self.p, self.by_prompt = p, {}
        self.tok = SimpleNamespace(encode=lambda text: [ord(c) for c in text])
        self.fmt = SimpleNamespace(prompt=lambda conv: [ord(c) for c in conv[-1]["content"]] + [0], stop_ids=[1],
                                   text_ids=self.tok.encode, lead="")
        for pr in problems:
            self.by_prompt[pr["question"]] = ar.worked(pr["a"], pr["op"], pr["b"]).split("\n")

    def generate(self, prompts, max_tokens, until=(), stop_ids=(), temperature=0.0, seed=0):
        rng, out = random.Random(seed), []
        for ids in prompts:
            text = "".join(chr(i) for i in ids)
            q, _, done = text.partition("\x00")
            steps = self.by_prompt[q.removesuffix(" Think step by step.")]
            i = done.count("\n")
            line = steps[i] if rng.random() < self.p else re.sub(r"(\d+)(\D*)$", lambda m: f"{int(m[1]) + 1}{m[2]}", steps[i])
            last = i == len(steps) - 1
            out.append(SimpleNamespace(ids=[0] * 5, text=line, stop=1 if last else "\n"))
        return out


def test_beam_search_with_a_perfect_process_verifier_finds_the_solution(monkeypatch):
    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "op": "+", "b": b, "digits": 3}
            for a, b in ((123, 456), (789, 211), (505, 495), (999, 1))]
    truth = {f"What is {r['a']} + {r['b']}? Think step by step.": ar.worked(r["a"], "+", r["b"]) for r in rows}

    def perfect(rm, tok, prompts, answers, batch_size=32):  # the number of right leading steps
        out = []
        for p, a in zip(prompts, answers):
            steps = truth[p[-1]["content"]].split("\n")
            got = a.split("\n")
            wrong = V.first_wrong_step(a, steps)
            out.append(float(len(got) if wrong is None else wrong) - (0 if wrong is None else 0.5))
        return out

    import lmstack.align.reward as R
    monkeypatch.setattr(R, "score_answers", perfect)
    lm = StepLM(rows, p=0.4)
    res = B.beam_search(lm, (None, None), rows, beam=2, expand=6, seed=0)
    assert res["acc"] == 1.0 and res["tokens"] > 0
    assert all(r["text"] == truth[f"{r['problem']['question']} Think step by step."] for r in res["results"])
    one = B.beam_search(lm, (None, None), rows, beam=1, expand=1, seed=0)  # a single sample: rarely all right
    assert one["acc"] < 1.0 and one["tokens"] < res["tokens"]


class EmptyFirstLM(StepLM):
    """StepLM that, a third of the time, ends its turn at once (an empty reply)."""

    def generate(self, prompts, max_tokens, until=(), stop_ids=(), temperature=0.0, seed=0):
        out, rng = super().generate(prompts, max_tokens, until, stop_ids, temperature, seed), random.Random(seed + 1)
        for ids, c in zip(prompts, out):
            if "\n" not in "".join(chr(i) for i in ids).partition("\x00")[2] and rng.random() < 0.3:
                c.text, c.stop = "", 1
        return out


def test_empty_replies_are_scored_lowest_without_being_read(monkeypatch, model_dir):
    """The chat format refuses an empty assistant message, which a verifier would be asked to read
    when the model ends its turn at once: the curve's scoring and the beam search crashed on it."""
    from lmstack.model import RewardModel
    from lmstack.modelio import load_model_and_tokenizer

    gpt, tok = load_model_and_tokenizer(model_dir)
    recs = [{"problem": {"question": "What is 1 + 2?", "answer": "3"},
             "samples": [{"text": ""}, {"text": " \n"}, {"text": "Answer: 1 + 2 = 3"}]}]
    C.score_with_verifier(recs, (RewardModel.from_gpt(gpt), tok))  # a real reward model and chat format
    assert [s["score"] for s in recs[0]["samples"]][:2] == [float("-inf")] * 2
    assert math.isfinite(recs[0]["samples"][2]["score"])

    rows = [{"question": f"What is {a} + {b}?", "answer": str(a + b), "a": a, "op": "+", "b": b, "digits": 2}
            for a, b in ((12, 45), (78, 21), (55, 49))]
    truth = {f"What is {r['a']} + {r['b']}? Think step by step.": ar.worked(r["a"], "+", r["b"]) for r in rows}

    def strict(rm, tok, prompts, answers, batch_size=32):  # as the real one: no empty answer
        assert all(a.strip() for a in answers), "asked to score an empty reply"
        return [float(V.first_wrong_step(a, truth[p[-1]["content"]].split("\n")) is None) for p, a in zip(prompts, answers)]

    import lmstack.align.reward as R
    monkeypatch.setattr(R, "score_answers", strict)
    res = B.beam_search(EmptyFirstLM(rows, p=0.7), (None, None), rows, beam=2, expand=4, seed=0)
    assert res["problems"] == 3 and res["tokens"] > 0


def test_think_ask_votes(model_dir):
    r = run_cli("think", "ask", "What is 23 + 58? Think step by step.", "--model", str(model_dir), "--k", "3",
                "--max-tokens", "6")
    assert r.returncode == 0 and r.stdout.startswith("majority of 3: "), r.stderr
    bad = run_cli("think", "ask", "x", "--model", str(model_dir), "--k", "0")
    assert bad.returncode == 2 and "--k must be at least 1" in bad.stderr
