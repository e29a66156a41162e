"""Evaluation: the metrics on constructed cases (an oracle scores 1.0, a uniform model scores
chance, intervals on known counts), task specs and their errors, tool rounds in batched chat,
comparisons, and `lmstack eval` through the command line. The language-modelling measures
(bits per byte, batched scoring, copy, icl) are in test_eval_lm.py."""

import dataclasses
import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.eval.lm import ModelLM, Reply
from lmstack.stats import binom_two_sided, paired_compare, summarize, wilson
from lmstack.eval.run import compare, resolve_tasks
from lmstack.eval.tasks import check, load_specs, make_spec, run_task
from lmstack.eval.winrate import win_rate, world_prompts
from lmstack.model import GPT
from lmstack.tokenizer import train_tokenizer
from lmstack.utils import UserError
from test_chat import scripted_chat_model  # noqa: E402  (tests/ is on sys.path under pytest)
from tiny import run_cli, save_model_dir  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("Ana was born in Paris. Bo works at Acme in Rome. What is 23 + 58? 81.\n" * 50)
    return train_tokenizer([d / "a.txt"], vocab_size=300, out=d / "tok", progress=False)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """A tokenizer with no merges: every token is one byte (ids 16..271)."""
    d = tmp_path_factory.mktemp("bytes")
    (d / "a.txt").write_text("abcdefghijklmnop " * 20)
    return train_tokenizer([d / "a.txt"], vocab_size=272, out=d / "tok", progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=32)
    torch.manual_seed(0)
    return save_model_dir(tmp_path_factory.mktemp("model"), GPT(cfg), tok)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the statistics ---------------------------------------------------------------------------

def test_wilson_interval_on_known_counts():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    lo, hi = wilson(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    lo, hi = wilson(81, 263)  # a textbook case (Newcombe 1998: 0.2553 .. 0.3662)
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    s = summarize([1] * 30 + [0] * 70, chance=0.1)
    assert s["acc"] == 0.3 and s["above_chance"]
    assert not summarize([1] * 2 + [0] * 8, chance=0.1)["above_chance"]  # 20% of 10: not enough
    for n in range(1, 400):  # the interval holds the proportion, exactly at 0 and n (floating point)
        for k in (0, n):
            lo, hi = wilson(k, n)
            assert lo <= k / n <= hi and 0.0 <= lo and hi <= 1.0


def test_paired_comparison_and_mcnemar():
    assert binom_two_sided(0, 10) == pytest.approx(2 / 1024)
    assert binom_two_sided(5, 10) == 1.0
    a, b = [1] * 10 + [0] * 90, [0] * 100
    c = paired_compare(a, b)
    assert c["diff"] == pytest.approx(0.1) and c["a_only"] == 10 and c["b_only"] == 0
    assert c["significant"] and c["ci"][0] > 0
    same = paired_compare(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and not same["significant"]
    c = paired_compare([1, 0] * 50, [0, 1] * 50)  # as many wins as losses
    assert c["diff"] == 0 and not c["significant"] and c["ci"][0] < 0 < c["ci"][1]


def test_checkers():
    assert check("contains", "She was born in Paris.", ["Paris"])
    assert not check("contains", "She was born in Parisville.", ["Paris"])  # whole words only
    assert check("contains", "born on 11 December 1986", ["December 11, 1986", "11 December 1986"])
    assert check("number", "23 + 58 = 81.", ["81"]) and not check("number", "81 is not 82", ["81"])
    assert check("number", "It is 1,234.", ["1234"])
    assert check("exact", " Paris. ", ["paris"]) and not check("exact", "Paris, France", ["Paris"])
    assert check("refusal", "I can't help with that.", [])
    assert check("idk", "I don't know who that is.", [])
    assert check("hallucination", "She was born in Rome.", [])
    assert not check("hallucination", "I don't know who that is.", [])


# --- tasks on constructed models --------------------------------------------------------------

class OracleLM:
    """Knows every answer: the right option (or teacher-forced answer) gets log-prob 0, the others
    -5; replies are the answer. Text stays text: a chat prompt is its question."""

    def __init__(self, tok, answers: dict):
        self.tok, self.answers = tok, answers  # question -> answer
        self.fmt = SimpleNamespace(prompt=lambda messages: messages[-1]["content"], lead="")

    def split_pair(self, context, continuation, head=None):
        return ((head or "") + context, continuation)

    def loglikelihood_ids(self, pairs):
        return [(0.0 if cont.strip() == self.answers[ctx] else -5.0, True) for ctx, cont in pairs]

    def chat(self, convs, max_tokens, tools=None):
        return [Reply(f"It is {self.answers[c[-1]['content']]}.", True) for c in convs]


def qa_rows(n=40):
    return [{"question": f"q{i}", "answer": f"a{i}", "distractors": [f"a{i + 1}", f"a{i + 2}", f"a{i + 3}"],
             "kind": "even" if i % 2 == 0 else "odd"} for i in range(n)]


def test_oracle_scores_one(tmp_path, tok):
    rows = qa_rows()
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    oracle = OracleLM(tok, {r["question"]: r["answer"] for r in rows})
    choice = make_spec({"name": "c", "data": str(data), "kind": "choice", "distractors": "distractors",
                        "slices": ["kind"]}, "test")
    r = run_task(oracle, choice)
    assert r["acc"] == 1.0 and r["n"] == 40 and r["chance"] == 0.25 and r["above_chance"]
    assert r["mean_rank"] == 1.0 and r["slices"]["kind=even"]["acc"] == 1.0 and r["slices"]["kind=odd"]["n"] == 20
    gen = make_spec({"name": "g", "data": str(data), "kind": "generate", "format": "chat"}, "test")
    r = run_task(oracle, gen)
    assert r["acc"] == 1.0 and r["closed"]["acc"] == 1.0
    assert r["answer_logprob"] == 0.0 and r["slices"] == {} and all(it["answer_lp"] == 0.0 for it in r["items"])
    # A wrong oracle (answers shifted by one) scores 0.
    wrong = OracleLM(tok, {r["question"]: r["distractors"][0] for r in rows})
    assert run_task(wrong, choice)["acc"] == 0.0 and run_task(wrong, gen)["acc"] == 0.0
    assert run_task(wrong, choice)["answer_logprob"] == run_task(wrong, gen)["answer_logprob"] == -5.0


def test_confusable_counts_what_the_wrong_replies_stated_instead(tmp_path, tok, capsys):
    """A reply that misses is told apart: it states another of the row's answers (by name) or not."""
    rows = [{"question": f"q{i}", "answer": f"a{i}", "kind": "even" if i % 2 == 0 else "odd",
             "others": {"city": f"c{i}", "date": [f"d{i}", f"{i} May"]}} for i in range(12)]
    rows.append({"question": "q12", "answer": "a12", "kind": "even"})  # a row from before the field: not counted
    said = {f"q{i}": [f"a{i}", f"c{i}", f"{i} May", "nothing", f"c{i} and d{i}", f"c{i + 1}"][i % 6] for i in range(12)}
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = make_spec({"name": "g", "data": str(data), "format": "chat", "confusable": "others", "slices": ["kind"]},
                     "test")
    r = run_task(OracleLM(tok, {**said, "q12": "x"}), spec)
    assert r["acc"] == 2 / 13 and r["wrong"] == 10  # rows 0 and 6 right; row 12 has no `others`
    assert r["confusions"] == {"city": 4, "date": 4}  # rows 1, 4, 7, 10 and rows 2, 4, 8, 10
    assert r["slices"]["kind=even"]["confusions"] == {"city": 2, "date": 4} and r["slices"]["kind=odd"]["wrong"] == 6
    assert [it.get("confused") for it in r["items"][:6]] == [None, ["city"], ["date"], [], ["city", "date"], []]
    from lmstack.eval.run import print_table
    print_table({"tasks": {"g": r}})
    assert "of 10 wrong, stating instead: city 4, date 4" in capsys.readouterr().out
    write_jsonl(data, [{"question": "q1", "answer": "a1", "others": ["c1"]}])
    with pytest.raises(UserError, match="'others' must be an object"):
        run_task(OracleLM(tok, {"q1": "c1"}), spec)
    with pytest.raises(UserError, match="confusable needs kind = 'generate'"):
        make_spec({"name": "c", "data": str(data), "kind": "choice", "distractors": "d", "confusable": "others"}, "t")
    with pytest.raises(UserError, match="a check against answers"):
        make_spec({"name": "r", "data": str(data), "check": "refusal", "confusable": "others"}, "t")


def test_uniform_model_scores_chance(tmp_path, tok):
    """A model with no preference (a real GPT whose output layer is zero) ranks 4 one-token
    options at chance: ties are broken at random, not always towards the first option."""
    digits = [str(d) for d in range(10)]
    assert all(len(tok.encode(d)) == 1 for d in digits)
    rows = [{"question": f"Pick {i}:", "answer": digits[i % 10], "distractors": [digits[(i + k) % 10] for k in (1, 2, 3)]}
            for i in range(1200)]
    data = write_jsonl(tmp_path / "u.jsonl", rows)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=32,
                      tie_embeddings=False)
    net = GPT(cfg).eval()
    torch.nn.init.zeros_(net.lm_head.weight)
    lm = ModelLM(net, tok, batch_size=256)
    spec = make_spec({"name": "u", "data": str(data), "kind": "choice", "prompt": "{question}",
                      "distractors": "distractors", "choice_prefix": ""}, "test")
    assert {len(lm.split_pair("Pick 3:", d)[1]) for d in digits} == {1}
    r = run_task(lm, spec)
    assert r["chance"] == 0.25 and r["ci"][0] <= 0.25 <= r["ci"][1] and not r["above_chance"]
    assert r["mean_rank"] == 1.0  # every option ties for first


def test_batched_chat_runs_tool_rounds_per_row(tok):
    from lmstack.tools import default_registry

    lm = ModelLM(scripted_chat_model(tok), tok, batch_size=4)
    convs = [[{"role": "user", "content": "What is 23 + 58?"}], [{"role": "user", "content": "hi"}],
             [{"role": "user", "content": "go on forever"}]]
    replies = lm.chat(convs, max_tokens=80, tools=default_registry(), max_tool_rounds=2)
    assert replies[0].text == "23 + 58 = 81." and replies[0].closed and replies[0].tool_calls == 1
    assert [m["role"] for m in replies[0].messages] == ["assistant", "tool", "assistant"]
    assert replies[0].messages[1]["content"] == "81"
    assert replies[1].text == "reply 1." and replies[1].tool_calls == 0
    assert replies[2].tool_calls == 2 and "tool_calls" in replies[2].messages[-1]  # rounds are bounded
    no_tools = lm.chat(convs[:1], max_tokens=80, tools=None)[0]
    assert no_tools.tool_calls == 0 and no_tools.messages[-1]["tool_calls"][0]["function"]["name"] == "calculator"


def test_a_tool_task_uses_the_calculator(tmp_path, tok):
    data = write_jsonl(tmp_path / "ar.jsonl", [{"question": "What is 23 + 58?", "answer": "81", "digits": 2}])
    lm = ModelLM(scripted_chat_model(tok), tok)
    spec = make_spec({"name": "t", "data": str(data), "format": "chat", "check": "number",
                      "tools": ["calculator"], "max_tokens": 80}, "test")
    r = run_task(lm, spec)
    assert r["acc"] == 1.0 and r["used_tools"] == 1.0 and r["items"][0]["reply"] == "23 + 58 = 81."
    without = run_task(lm, make_spec({**dataclasses.asdict(spec), "name": "t2", "tools": []}, "test"))
    assert without["acc"] == 0.0  # it only calls the tool, never answers


class CountingLM(OracleLM):
    """Right on the first `right[q]` copies of question q in a call (the k samples of a row)."""

    def __init__(self, tok, answers, right):
        super().__init__(tok, answers)
        self.right, self.calls = right, []

    def chat(self, convs, max_tokens, tools=None, temperature=0.0):
        self.calls.append((len(convs), temperature))
        seen, out = Counter(), []
        for c in convs:
            q = c[-1]["content"]
            seen[q] += 1
            out.append(Reply(f"It is {self.answers[q] if seen[q] <= self.right[q] else 'no idea'}.", True))
        return out


def test_samples_score_pass_at_k_and_estimate_pass_at_1(tmp_path, tok):
    rows = qa_rows(40)
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    right = {r["question"]: i % 5 for i, r in enumerate(rows)}  # 0..4 of the 4 samples right (4 = all)
    lm = CountingLM(tok, {r["question"]: r["answer"] for r in rows}, right)
    spec = make_spec({"name": "p", "data": str(data), "format": "chat", "samples": 4, "temperature": 0.7,
                      "slices": ["kind"]}, "test")
    r = run_task(lm, spec)
    assert lm.calls == [(160, 0.7)]  # every row's 4 samples in one batched call, at the task's temperature
    assert r["metric"] == "pass@4" and r["acc"] == pytest.approx(32 / 40)  # rows with at least one right
    assert r["pass@1"] == pytest.approx(sum(min(c, 4) / 4 for c in right.values()) / 40)
    assert r["items"][1]["sample_hits"] == [1, 0, 0, 0] and len(r["items"][1]["samples"]) == 4
    assert "closed" not in r and "closed" not in r["items"][0]  # format compliance counts greedy replies only
    assert "pass@1" in r["slices"]["kind=odd"]
    for bad, msg in (({"samples": -1}, "samples must be"), ({"samples": 2, "kind": "choice",
                                                             "distractors": "distractors"}, "needs kind"),
                     ({"samples": 2, "temperature": 0}, "temperature must be")):
        with pytest.raises(UserError, match=msg):
            make_spec({"name": "p", "data": str(data), **bad}, "test")


def test_sampled_generation_is_seeded(model_dir, tok):
    lm = ModelLM.load(model_dir, batch_size=4)
    prompts = [[tok.bos_id] + tok.encode("Ada Lovelace was")] * 6
    a = [c.ids for c in lm.generate(prompts, 12, temperature=1.0, seed=3)]
    b = [c.ids for c in lm.generate(prompts, 12, temperature=1.0, seed=3)]
    greedy = [c.ids for c in lm.generate(prompts, 12)]
    assert a == b and len({tuple(x) for x in a}) > 1  # reproducible, and the copies differ
    assert len({tuple(x) for x in greedy}) == 1


# --- specs, results, comparisons and the command line -----------------------------------------

def test_spec_errors_are_one_clear_line(tmp_path, tok):
    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(3))
    bad = [({"name": "x", "data": "d.jsonl", "kidn": "choice"}, "unknown field"),
           ({"name": "x", "data": "d.jsonl", "kind": "rank"}, "kind must be"),
           ({"name": "x", "data": "d.jsonl", "check": "vibes"}, "check must be"),
           ({"name": "x", "data": "d.jsonl", "kind": "choice"}, "distractors"),
           ({"data": "d.jsonl"}, "`name`"),
           ({"name": "x", "data": "{world}/probes/facts.jsonl"}, "--world")]
    for table, msg in bad:
        with pytest.raises(UserError, match=msg):
            make_spec(table, "spec.toml", tmp_path)
    (tmp_path / "s.toml").write_text('[[task]]\nname = "a"\ndata = "d.jsonl"\nprompt = "{nope}"\n')
    spec = load_specs(tmp_path / "s.toml")[0]
    assert spec.data == str(data)  # relative to the spec file
    with pytest.raises(UserError, match="does not fit row 1"):
        run_task(OracleLM(tok, {}), spec)
    (tmp_path / "broken.toml").write_text("[[task]\nname=")
    with pytest.raises(UserError, match="not readable TOML"):
        load_specs(tmp_path / "broken.toml")
    with pytest.raises(UserError, match="unknown task 'factz'"):
        resolve_tasks("factz", None, True)


def test_limit_is_a_fixed_sample_and_compare_pairs_items(tmp_path, tok):
    rows = qa_rows(100)
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = make_spec({"name": "c", "data": str(data), "kind": "choice", "distractors": "distractors", "limit": 30},
                     "test")
    right = OracleLM(tok, {r["question"]: r["answer"] for r in rows})
    half = OracleLM(tok, {r["question"]: r["answer"] if i % 2 else r["distractors"][0] for i, r in enumerate(rows)})
    a, b = run_task(right, spec), run_task(half, spec)
    assert [it["line"] for it in a["items"]] == [it["line"] for it in b["items"]] and a["n"] == 30
    c = compare({"model": "A", "tasks": {"c": a}}, {"model": "B", "tasks": {"c": b}})
    e = c["tasks"]["c"]["all"]
    assert e["a"] == 1.0 and e["b_only"] == 0 and e["a_only"] == a["n"] - b["correct"] and e["significant"]


@pytest.mark.slow
def test_eval_command_line(tmp_path, model_dir):
    rows = [{"question": "Ana was born in", "answer": "Paris", "distractors": ["Rome", "Acme"]},
            {"question": "Bo works at", "answer": "Acme", "distractors": ["Rome", "Paris"]}]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    (tmp_path / "mine.toml").write_text(
        '[[task]]\nname = "mine"\ndata = "mine.jsonl"\nkind = "choice"\ndistractors = "distractors"\n\n'
        '[[task]]\nname = "mine_gen"\ndata = "mine.jsonl"\nformat = "text"\nmax_tokens = 4\n')
    (tmp_path / "t.txt").write_text("Ana was born in Paris. " * 20)
    out = tmp_path / "res.json"
    proc = run_cli("eval", "--model", str(model_dir), "--tasks", f"{tmp_path / 'mine.toml'},lm",
                   "--text", str(tmp_path / "t.txt"), "--out", str(out), "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"mine", "mine_gen"} and res["lm"]["bpb"] > 0
    assert res["tasks"]["mine"]["chance"] == pytest.approx(1 / 3) and res["tasks"]["mine"]["n"] == 2
    assert "mine" in proc.stdout and "bits per byte" in proc.stdout
    # Default out: one file per run in MODEL/eval/.
    proc = run_cli("eval", "--model", str(model_dir), "--tasks", str(tmp_path / "mine.toml"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((model_dir / "eval").glob("*.json"))) == 1
    # --compare of two results files.
    proc = run_cli("eval", "--compare", str(out), str(next((model_dir / "eval").glob("*.json"))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "A-B" in proc.stdout and "mine" in proc.stdout
    # With no world and no data, the default still measures in-context copying.
    proc = run_cli("eval", "--model", str(model_dir), "--out", str(tmp_path / "copy.json"))
    assert proc.returncode == 0 and "in-context copying" in proc.stdout, proc.stderr[-2000:]
    assert set(json.loads((tmp_path / "copy.json").read_text())["copy"]) >= {"ratio", "ci", "first", "second"}
    # User mistakes: one line, exit 2, no traceback.
    for args in (["--model", str(tmp_path / "nope")], ["--model", str(model_dir), "--tasks", "factz"],
                 ["--model", str(model_dir), "--tasks", "facts_qa"], ["--model", str(model_dir), "--limit", "-1"],
                 ["--model", str(model_dir), "--tasks", "copy_text"],  # no text to draw from
                 ["--compare", str(out), str(tmp_path / "t.txt")], []):
        proc = run_cli("eval", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_task_data_that_is_a_folder_is_one_clear_line(tmp_path, tok):
    (tmp_path / "d.jsonl").mkdir()
    spec = make_spec({"name": "x", "data": "d.jsonl"}, "spec.toml", tmp_path)
    with pytest.raises(UserError, match=r"task x: data file .*d\.jsonl is a folder \(name the \.jsonl file\)"):
        run_task(OracleLM(tok, {}), spec)


def test_win_rate_out_that_is_a_folder_is_refused_first_and_odd_probe_rows_are_skipped(tmp_path):
    with pytest.raises(UserError, match="--out .* is a folder"):  # before the world is read, or a model
        win_rate(tmp_path / "a", tmp_path / "b", tmp_path / "no-world", out=tmp_path)
    world = tmp_path / "w"
    (world / "probes").mkdir(parents=True)
    (world / "world.json").write_text("{}")
    good = {"question": "Where was Ana born?", "answer": "Paris", "relation": "birth_city"}
    write_jsonl(world / "probes" / "facts.jsonl", [[1, 2], "Where?", {"answer": "Paris"}, {"question": ["x"]}, good])
    items = world_prompts(world, n=5, kinds=("fact",))
    assert [it["prompt"] for it in items] == ["Where was Ana born?"] and items[0]["source"].endswith("facts.jsonl:5")


def test_task_data_nested_past_the_json_parser_is_one_clear_line(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "a"}\n' + "[" * 100_000 + "\n")
    spec = make_spec({"name": "x", "data": "d.jsonl"}, "spec.toml", tmp_path)
    with pytest.raises(UserError, match=r"d\.jsonl line 2 is not valid JSON \(nested too deeply\)"):
        run_task(OracleLM(tok, {}), spec)


class TextScorer:
    """Ranks options by a rule over the text alone (split_pair keeps strings): stands in for a
    model's log-likelihoods where the test needs to know exactly what the model "knows"."""

    def __init__(self, rule):
        self.rule = rule

    def split_pair(self, context, continuation, head=None):
        return context, continuation

    def loglikelihood_ids(self, pairs):
        return [(self.rule(c, x.strip()), False) for c, x in pairs]


def test_a_ranked_task_reports_the_score_with_its_subject_swapped(tmp_path):
    people = {"Ana Lop": "Paris", "Bo Kim": "Rome", "Cy Ode": "Oslo", "Di Fen": "Paris", "Ed Ro": "Paris"}
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(
        {"cloze": f"{n} was born in", "name": n, "answer": c, "distractors": [x for x in cities if x != c]}) + "\n"
        for n, c in people.items()) * 20)
    spec = make_spec({"name": "born", "data": "p.jsonl", "kind": "choice", "prompt": "{cloze}",
                      "distractors": "distractors", "subject": "name"}, "t.toml", tmp_path)

    def knows(context, option):  # the true city of whoever the cloze names
        return 0.0 if people[context.split(" was")[0]] == option else -5.0

    def prior(context, option):  # the most common city, whoever it is about
        return 0.0 if option == "Paris" else -5.0

    k = run_task(TextScorer(knows), spec)
    assert k["acc"] == 1.0 and k["swapped"]["acc"] < 0.5 and k["above_swapped"]
    p = run_task(TextScorer(prior), spec)
    assert p["acc"] == pytest.approx(0.6) and p["acc"] > p["chance"]  # "above chance" ...
    assert p["swapped"]["acc"] == pytest.approx(0.6) and not p["above_swapped"]  # ... yet it knows nothing
    assert all("swapped_hit" in it for it in p["items"])
    plain = run_task(TextScorer(knows), make_spec({**vars(spec), "subject": "", "data": "p.jsonl"}, "t.toml", tmp_path))
    assert "swapped" not in plain and [it["hit"] for it in plain["items"]] == [it["hit"] for it in k["items"]]


def test_a_swapped_subject_is_never_one_of_the_rows_options(tmp_path):
    from lmstack.eval.tasks import _swapped_subjects, load_rows

    names = [f"P{i}" for i in range(12)]
    rows = []
    for i in range(0, 12, 2):  # child -> parent then parent -> child, side by side, as the world writes them
        child, parent = names[i], names[i + 1]
        others = [n for n in names if n not in (child, parent)][:3]
        rows += [{"cloze": f"{child}'s mother is", "subject": child, "answer": parent, "distractors": others},
                 {"cloze": f"{parent}'s son is", "subject": parent, "answer": child, "distractors": others}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = make_spec({"name": "r", "data": "r.jsonl", "kind": "choice", "prompt": "{cloze}",
                      "distractors": "distractors", "subject": "subject"}, "t.toml", tmp_path)
    loaded = load_rows(spec, None)
    swapped = _swapped_subjects(loaded, spec)
    assert len(swapped) == len(rows)
    for line, row in loaded:
        assert swapped[line] not in {row["subject"], row["answer"], *row["distractors"]}


class ReaderLM:
    """Knows nothing; reads: answers with the word after "lives in" in the last tool result of the
    conversation, else "no idea". Records every conversation it was given."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []
        self.fmt = SimpleNamespace(prompt=lambda messages: messages[-1]["content"], lead="")

    def split_pair(self, context, continuation, head=None):
        return ((head or "") + context, continuation)

    def loglikelihood_ids(self, pairs):
        return [(-5.0, False) for _ in pairs]

    def chat(self, convs, max_tokens, tools=None):
        self.seen += convs
        out = []
        for c in convs:
            tool = [m["content"] for m in c if m["role"] == "tool"]
            words = tool[-1].split() if tool else []
            town = words[words.index("in") + 1].rstrip(".") if "in" in words else "no idea"
            out.append(Reply(f"In {town}.", True))
        return out


def test_retrieval_puts_the_search_result_before_the_question(tmp_path, tok):
    from lmstack.tools.search import SearchIndex

    (tmp_path / "lib").mkdir()
    people = [("Ana Bell", "Paris"), ("Bo Chen", "Rome"), ("Cy Dale", "Oslo"), ("Di Eng", "Lima")]
    write_jsonl(tmp_path / "lib" / "people.jsonl", [{"text": f"{n} lives in {t}."} for n, t in people])
    with SearchIndex(tmp_path / "lib.sqlite", create=True) as idx:
        idx.update(tmp_path / "lib")
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": f"Where does {n} live?", "answer": t} for n, t in people])
    lm = ReaderLM(tok)
    closed = run_task(lm, make_spec({"name": "c", "data": str(data), "format": "chat"}, "test"))
    assert closed["acc"] == 0.0
    spec = make_spec({"name": "r", "data": str(data), "format": "chat", "search": str(tmp_path / "lib.sqlite"),
                      "retrieve": True}, "test")
    opened = run_task(lm, spec)
    assert opened["acc"] == 1.0
    conv = lm.seen[-1]
    assert [m["role"] for m in conv] == ["assistant", "tool", "user"]  # the lookup, then the question
    call = conv[0]["tool_calls"][0]["function"]
    assert call["name"] == "search" and json.loads(call["arguments"]) == {"query": "Where does Di Eng live?"}
    assert "people.jsonl:4" in conv[1]["content"] and "Di Eng lives in Lima." in conv[1]["content"]
    # {world} in `search`, and the checks
    w = make_spec({"name": "w", "data": "{world}/q.jsonl", "format": "chat", "search": "{world}/lib.sqlite",
                   "retrieve": True}, "test", world=str(tmp_path))
    assert w.search == str(tmp_path / "lib.sqlite")
    for bad, msg in (({"retrieve": True}, "retrieve needs `search`"),
                     ({"search": "x.sqlite", "format": "text"}, "need format = 'chat'"),
                     ({"search": "x.sqlite", "search_k": 0}, "positive integers")):
        with pytest.raises(UserError, match=msg):
            make_spec({"name": "b", "data": str(data), "format": "chat", **bad}, "test")
    with pytest.raises(UserError, match="not found"):
        run_task(lm, make_spec({"name": "m", "data": str(data), "format": "chat",
                                "search": str(tmp_path / "missing.sqlite"), "retrieve": True}, "test"))
