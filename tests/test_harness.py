"""lm-evaluation-harness adapter: LmstackLM's three methods against ModelLM, a hand-written
forward pass, lm_eval's own rolling windows and the engine; the chat-template marker; and
end to end through lm_eval.simple_evaluate and `main` (the CLI) on two tiny local tasks.

Offline: the tasks are local jsonl files (`dataset_path: json`), HF_HUB_OFFLINE and
HF_DATASETS_OFFLINE are set, and exact_match is lm_eval's own implementation (0.4.13 ports
Hugging Face evaluate's code into lm_eval.api.metrics: only a metric with `hf_evaluate: true`
goes through `evaluate.load`, which would download it)."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from lmstack.engine import generate_batch  # noqa: E402
from lmstack.eval import harness  # noqa: E402
from lmstack.eval.harness import CHAT_MARKER, LmstackLM  # noqa: E402
from lmstack.chatformat import render_chat  # noqa: E402
from lmstack.utils import UserError  # noqa: E402
from tiny import fit_windows, random_gpt, save_model_dir, tokenizer_on  # noqa: E402  (tests/ is on sys.path)

CTX = 64
TEXT = "The calculator says 23 + 58 = 81. What is 2 + 3? It is 5. Paris is in France. hello world.\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder (as in test_chat: tokenizer + config + weights, context CTX), trained for
    a second on TEXT: a random model only repeats one token, which makes weak tests of stop
    strings, greedy continuations and accuracy."""
    d = tmp_path_factory.mktemp("model")
    tok = tokenizer_on(d, TEXT * 40)
    model = random_gpt(tok, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=CTX)
    fit_windows(model, torch.tensor([tok.bos_id] + tok.encode(TEXT * 20)), steps=200)
    return save_model_dir(d, model, tok)


@pytest.fixture(scope="module")
def hlm(model_dir):
    # batch_size 3: several batches (and a ragged last one) even for a handful of requests.
    return LmstackLM(model=str(model_dir), dtype="fp32", device="cpu", batch_size=3)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def token_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[i] | ids[:i]) for i >= 1 from one plain forward pass, and whether ids[i] was
    the most likely token."""
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
    target = torch.tensor(ids[1:])
    return lp.gather(-1, target[:, None])[:, 0], lp.argmax(-1) == target


# --- the three methods ------------------------------------------------------------------------

def test_loglikelihood_matches_modellm_and_a_forward_pass(hlm):
    pairs = [("The calculator says", " 23 + 58"), ("", "hello world"), ("Paris is in", " France"),
             ("Paris is in", " 58 + 23"), ("What is 2 + 3? It is ", "5."), ("hello", " world")]
    got = hlm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    want = hlm.lm.loglikelihood(pairs)
    assert len(got) == len(pairs)
    for (lp, greedy), (wlp, wgreedy) in zip(got, want):
        assert isinstance(lp, float) and isinstance(greedy, bool)
        assert lp == pytest.approx(wlp, abs=1e-4) and greedy == wgreedy
    # By hand: one forward pass over BOS + context + continuation (empty context: BOS alone).
    tok = hlm.lm.tok
    for (c, x), (lp, greedy) in zip(pairs[:4], got):
        ids = [tok.bos_id] + tok.encode(c + x)
        n = len(tok.encode(x))  # these pairs split cleanly at the boundary
        assert ids[:len(ids) - n] == [tok.bos_id] + tok.encode(c)
        lps, top = token_logprobs(hlm.lm.model, ids)
        assert lp == pytest.approx(float(lps[-n:].sum()), abs=1e-4) and greedy == bool(top[-n:].all())
    assert got[0][1] and got[2][1] and not got[3][1]  # the trained model knows TEXT


def test_is_greedy_for_the_models_own_continuation(hlm):
    tok = hlm.lm.tok
    checked = 0
    for prompt in ["The calculator says", "Paris is", "What is", "hello", "It is"]:
        c = hlm.lm.generate([[tok.bos_id] + tok.encode(prompt)], 6, stop_ids=hlm.stop_ids)[0]
        # The check needs text that tokenizes back to the same ids after the prompt.
        if not c.text or tok.encode(prompt + c.text) != tok.encode(prompt) + c.ids:
            continue
        (lp, greedy), = hlm.loglikelihood([req("loglikelihood", prompt, c.text)])
        assert greedy and math.isfinite(lp)
        checked += 1
    assert checked >= 3


def test_rolling_short_text_is_one_forward_pass(hlm):
    text = "The calculator says 23 + 58 = 81."
    ids = [hlm.lm.tok.bos_id] + hlm.lm.tok.encode(text)
    assert len(ids) <= CTX
    got, = hlm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert isinstance(got, float)
    assert got == pytest.approx(float(token_logprobs(hlm.lm.model, ids)[0].sum()), abs=1e-4)


def test_rolling_long_text_uses_lm_evals_windows(hlm):
    text = TEXT * 6
    tokens = hlm.lm.tok.encode(text)
    assert len(tokens) > 3 * CTX
    # The reference: lm_eval's own windowing (what its HF model does), each window by hand.
    want = 0.0
    for context, pred in map(make_disjoint_window,
                             get_rolling_token_windows(tokens, hlm.lm.tok.bos_id, CTX, context_len=1)):
        window = (context + pred)[-(CTX + 1):]
        want += float(token_logprobs(hlm.lm.model, window)[0][-len(pred):].sum())
    got = hlm.loglikelihood_rolling([req("loglikelihood_rolling", t) for t in [text, "hello", text]])
    assert math.isfinite(got[0]) and got[0] == pytest.approx(want, rel=1e-5)
    assert got[2] == pytest.approx(got[0], rel=1e-6)  # order kept across batches
    hello = [hlm.lm.tok.bos_id] + hlm.lm.tok.encode("hello")
    assert got[1] == pytest.approx(float(token_logprobs(hlm.lm.model, hello)[0].sum()), abs=1e-4)


def test_generate_until_matches_the_engine_and_stops(hlm):
    tok = hlm.lm.tok
    prompts = ["The calculator says", "Paris is in", "What is 2 + 3?", "hello"]

    def engine(prompt, n, until=()):
        return generate_batch(hlm.lm.model, [[tok.bos_id] + tok.encode(prompt)], n, temperature=0.0,
                              stop_strings=until, stop_ids=hlm.stop_ids, tokenizer=tok)[0].text

    free = hlm.generate_until([req("generate_until", p, {"max_gen_toks": 12}) for p in prompts])
    assert free == [engine(p, 12) for p in prompts]
    # Stop strings: a piece of each free reply; the reply is cut before it.
    stops = [t[len(t) // 2:len(t) // 2 + 2] or "zz" for t in free]
    reqs = [req("generate_until", p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
    reqs.append(req("generate_until", prompts[0], {"until": "never", "max_gen_toks": 3}))
    got = hlm.generate_until(reqs)
    for text, s, p in zip(got, stops, prompts):
        assert s not in text and text == engine(p, 12, (s,))
    assert all(len(t) < len(f) for t, f in zip(got, free)) and any(got[:-1])
    assert got[-1] == engine(prompts[0], 3)
    # Sampling as Hugging Face reads it: only with do_sample and a temperature > 0; torch's RNG.
    ids = [tok.bos_id] + tok.encode(prompts[0])
    torch.manual_seed(7)
    sampled, greedy = hlm.generate_until([req("generate_until", prompts[0], k) for k in (
        {"do_sample": True, "temperature": 20.0, "max_gen_toks": 10}, {"temperature": 0.7, "max_gen_toks": 10})])
    torch.manual_seed(7)
    assert sampled == generate_batch(hlm.lm.model, [ids], 10, temperature=20.0, stop_ids=hlm.stop_ids,
                                     tokenizer=tok)[0].text
    assert greedy == engine(prompts[0], 10) and sampled != greedy
    # A prompt longer than the context loses its oldest tokens rather than failing.
    long, = hlm.generate_until([req("generate_until", TEXT * 10, {"until": ["\n"], "max_gen_toks": 5})])
    assert isinstance(long, str)


# --- chat templates ---------------------------------------------------------------------------

def test_chat_template_round_trip(hlm):
    tok = hlm.lm.tok
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]
    s = hlm.apply_chat_template(msgs)
    assert s.startswith(CHAT_MARKER) and isinstance(hlm.tokenizer_name, str)
    ids = render_chat(tok, msgs, add_generation_prompt=True)[0]
    assert hlm._prompt(s) == (ids, "")
    assert hlm._prompt("plain <|user|> text") == ([tok.bos_id], "plain <|user|> text")
    # lm_eval's gen_prefix: an open assistant message continues as text (no <|end|>).
    open_ = hlm.apply_chat_template(msgs + [{"role": "assistant", "content": "It is"}], add_generation_prompt=False)
    assert hlm._prompt(open_) == (ids, "It is")
    # Scoring and generating see exactly the rendered ids.
    (lp, _), = hlm.loglikelihood([req("loglikelihood", s, "5")])
    assert lp == pytest.approx(hlm.lm.loglikelihood_ids([(ids, tok.encode("5"))])[0][0], abs=1e-5)
    (lp2, _), = hlm.loglikelihood([req("loglikelihood", open_, " 5")])
    assert lp2 == pytest.approx(hlm.lm.loglikelihood_ids([hlm.lm.split_pair("It is", " 5", head=ids)])[0][0], abs=1e-5)
    out, = hlm.generate_until([req("generate_until", s, {"max_gen_toks": 6})])
    assert out == generate_batch(hlm.lm.model, [ids], 6, temperature=0.0, stop_ids=hlm.stop_ids, tokenizer=tok)[0].text


# --- construction -----------------------------------------------------------------------------

def test_model_args_and_cli_settings(model_dir):
    # model_args win over lm_eval's --batch_size; "auto" is our default; cuda without a GPU -> cpu.
    lm = LmstackLM.create_from_arg_string(f"model={model_dir},batch_size=5,dtype=fp32",
                                          {"batch_size": 1, "device": "cpu", "max_batch_size": None})
    assert lm.lm.batch_size == 5
    lm = LmstackLM.create_from_arg_obj({"model": str(model_dir), "dtype": "fp32"}, {"batch_size": "auto"})
    assert lm.lm.batch_size == 32 and lm.max_length == CTX
    if not torch.cuda.is_available():
        lm = LmstackLM.create_from_arg_obj({"model": str(model_dir), "dtype": "fp32"}, {"device": "cuda:0"})
        assert lm.lm.device.type == "cpu"
    with pytest.raises(ValueError, match="already loaded"):
        harness.evaluate(lm, "tiny_mc", dtype="bf16")  # model settings go with a folder, not a loaded model
    with pytest.raises(UserError, match="unknown model_args"):
        LmstackLM.create_from_arg_obj({"model": str(model_dir), "pretrained": "gpt2"})
    with pytest.raises(UserError, match="model=MODEL_DIR"):
        LmstackLM.create_from_arg_obj({})


def test_main_usage_and_missing_extra(capsys, monkeypatch):
    assert harness.main(["--help"]) == 0
    assert "lmstack harness run --model lmstack" in capsys.readouterr().out
    assert harness.main([]) == 0
    # lm_eval's own checks of the command line come back as a one-line UserError.
    with pytest.raises(UserError, match="output_path"):
        harness.main(["run", "--model", "lmstack", "--tasks", "x", "--log_samples"])
    monkeypatch.setattr(harness, "HAVE_LM_EVAL", False)
    with pytest.raises(UserError, match=r"pip install 'lmstack\[eval\]'"):
        harness.main(["run", "--tasks", "x"])


# --- end to end -------------------------------------------------------------------------------

MC_DOCS = [{"question": f"Q{i}: {q}", "choices": ["France", "81", "5", "hello world"], "answer": a}
           for i, (q, a) in enumerate([("Paris is in", 0), ("23 + 58 =", 1), ("2 + 3 =", 2), ("Say", 3),
                                       ("The calculator says", 1), ("It is", 2), ("Where is Paris?", 0),
                                       ("hello", 3), ("What is 2 + 3?", 2), ("81 is", 1)])]
GEN_PROMPTS = ["The calculator says", "Paris is in", "What is 2 + 3?", "hello", "It is"]
GEN_KWARGS = {"until": ["\n", "."], "max_gen_toks": 8}


def write_tasks(d, gen_answers):
    """Two lm_eval tasks over local jsonl files: multiple choice (acc) and generate (exact_match)."""
    d.mkdir(exist_ok=True)
    (d / "mc.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                         for q, a in zip(GEN_PROMPTS, gen_answers)))
    common = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / name}\n"  # noqa: E731
                           f"  cache_dir: {d / 'hf_cache'}\ntest_split: test\n")
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common("mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common("gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        f"generation_kwargs: {json.dumps(GEN_KWARGS)}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return d


@pytest.mark.slow
def test_simple_evaluate_end_to_end(hlm, tmp_path):
    # The generative answers: the model's own reply for even docs (exact match), a miss for odd.
    own = hlm.generate_until([req("generate_until", q, dict(GEN_KWARGS)) for q in GEN_PROMPTS])
    answers = [t if i % 2 == 0 else t + " never" for i, t in enumerate(own)]
    tasks = write_tasks(tmp_path / "tasks", answers)
    out = harness.evaluate(hlm, ["tiny_mc", "tiny_gen"], include_path=tasks, include_defaults=False)
    res = out["results"]
    acc, em = res["tiny_mc"]["acc,none"], res["tiny_gen"]["exact_match,none"]
    assert 0 <= acc <= 1 and 0 <= em <= 1
    assert em == pytest.approx(3 / 5)
    # acc by hand: the choice with the highest log-likelihood (after " ", lm_eval's target delimiter).
    correct = 0
    for doc in MC_DOCS:
        lls = [lp for lp, _ in hlm.loglikelihood([req("loglikelihood", doc["question"], " " + c)
                                                 for c in doc["choices"]])]
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    assert acc == pytest.approx(correct / len(MC_DOCS)) and 0 < acc
    # --apply_chat_template: lm_eval's prompts are our marker, answered from render_chat's ids.
    out = harness.evaluate(hlm, "tiny_gen", limit=2, include_path=tasks, include_defaults=False,
                           apply_chat_template=True, log_samples=True)
    samples = out["samples"]["tiny_gen"]
    assert len(samples) == 2 and 0 <= out["results"]["tiny_gen"]["exact_match,none"] <= 1
    for sample in samples:
        context, kwargs = sample["arguments"][0]
        assert context.startswith(CHAT_MARKER)
        assert sample["resps"][0][0] == hlm.generate_until([req("generate_until", context, kwargs)])[0]


@pytest.mark.slow
def test_cli_main_end_to_end(model_dir, tmp_path, capsys):
    tasks = write_tasks(tmp_path / "tasks", ["x"] * len(GEN_PROMPTS))
    rc = harness.main(["run", "--model", "lmstack", "--model_args", f"model={model_dir},dtype=fp32",
                       "--tasks", "tiny_mc,tiny_gen", "--include_path", str(tasks), "--limit", "5",
                       "--batch_size", "4", "--output_path", str(tmp_path / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "tiny_gen" in printed and "acc" in printed
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results) == 1
    res = json.loads(results[0].read_text())["results"]
    assert 0 <= res["tiny_mc"]["acc,none"] <= 1 and res["tiny_gen"]["exact_match,none"] == 0
