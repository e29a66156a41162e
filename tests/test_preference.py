"""Preference learning: comparisons (loading, errors, rendering, batches), the reward model
(`reward_train` learns an easy preference to 100% held-out accuracy; `reward_score`), DPO (the
margin grows; the reference is frozen, bit for bit; the output is a chat model folder), the AI
judge (valid comparison rows), and one-line CLI errors (the win rate: test_winrate.py)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmstack import modelio
from lmstack.align import dpo as dpo_mod
from lmstack.align.dpo import dpo
from lmstack.align.judge import judge
from lmstack.align.pairs import PairBatches, load_comparisons, load_pairs, pair_tensors, render_answers, split_pairs
from lmstack.align.reward import reward_score, reward_train
from lmstack.chatformat import chat_format, render_chat
from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.model import GPT
from lmstack.modelio import lineage
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.utils import UserError
from lmstack.world.labeller import task_of as world_task
from tiny import save_model_dir  # noqa: E402  (tests/ is on sys.path under pytest)


pytestmark = pytest.mark.usefixtures("one_thread")


COLOURS = ["red", "blue", "green", "black", "white", "brown"]
FAST = ["train.max_steps=30", "train.micro_batch_size=8", "train.batch_tokens=1024", "train.eval_every=10",
        "train.save_every=10", "train.eval_batches=8", "train.dtype=fp32", "optim.warmup_steps=2",
        "pref.val_fraction=0.25"]


def easy_rows(n=64):
    """Chosen answers say "kindly", rejected ones never do: a preference any model can learn."""
    rows = []
    for i in range(n):
        c = COLOURS[i % len(COLOURS)]
        rows.append({"prompt": f"What colour is box {i}?", "chosen": f"Box {i} is {c}, kindly.",
                     "rejected": f"Box {i} is {c}.", "meta": {"type": "easy" if i % 2 else "also_easy"}})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    text = " ".join(f"{r['prompt']} {r['chosen']} {r['rejected']}" for r in easy_rows())
    (d / "a.txt").write_text((text + " Answer A B Which answer is better? Reply A or B. I don't know.\n") * 20)
    train_tokenizer([d / "a.txt"], vocab_size=300, out=d / "tok", progress=False)
    write_jsonl(d / "pairs.jsonl", easy_rows())
    return d


@pytest.fixture(scope="module")
def tok(root):
    return Tokenizer.load(root / "tok")


@pytest.fixture(scope="module")
def sft_dir(root, tok):
    """A random tiny 'SFT' model folder: preference training only needs the layout."""
    d = root / "sft"
    d.mkdir()
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    torch.manual_seed(0)
    return save_model_dir(d, GPT(cfg), tok)


# --------------------------------------------------------------------------- data


def test_comparison_rows_are_validated_with_file_and_line(tmp_path):
    good = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    cases = [
        ("{not json", "not valid JSON"),
        ({"prompt": "Hi", "chosen": "Hello!"}, "missing field rejected"),
        ({"prompt": "Hi", "chosen": "Hello!", "rejected": "  "}, "rejected must be a non-empty string"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "bad prompt"),
        ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}, "bad prompt"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "bad prompt"),
        ([1, 2], "not a JSON object"),
        ({"prompt": "Hi", "chosen": "a", "rejected": {"content": None}}, "rejected empty content"),
        ({"prompt": "Hi", "chosen": "a", "rejected": {"role": "user", "content": "b"}}, "rejected must be .* message"),
        ({"prompt": "Hi", "chosen": "a", "rejected": {"tool_calls": "x"}}, "rejected tool_calls must be a list"),
    ]
    for i, (bad, why) in enumerate(cases):
        f = write_jsonl(tmp_path / f"c{i}.jsonl", [good, "", bad])
        with pytest.raises(UserError, match=rf"c{i}\.jsonl:3: .*{why}"):
            load_comparisons([f])
    with pytest.raises(UserError, match="not found"):
        load_comparisons([tmp_path / "missing.jsonl"])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    call = {"content": None, "tool_calls": [{"id": "c0", "type": "function",
                                             "function": {"name": "search", "arguments": "{}"}}]}
    rows = load_comparisons([write_jsonl(tmp_path / "ok.jsonl", [good, {**good, "prompt": msgs},
                                                                {**good, "rejected": call}])])
    assert [w for _, w in rows] == [f"{tmp_path / 'ok.jsonl'}:{n}" for n in (1, 2, 3)]


def test_pairs_render_with_the_chat_template_and_skip_or_cut(tmp_path, tok):
    prompt = [{"role": "user", "content": "What colour is box 1?"}, {"role": "assistant", "content": "Box 1 is red."},
              {"role": "user", "content": "And box 2?"}]
    (c_ids, c_mask), (r_ids, r_mask) = render_answers(tok, prompt, ["Box 2 is blue, kindly.", "Box 2 is red."], 64)[0]
    full, full_mask = render_chat(tok, prompt + [{"role": "assistant", "content": "Box 2 is blue, kindly."}])
    assert c_ids == full
    # only the final answer and its <|end|> are answer tokens (not the earlier assistant turn)
    n = len(render_chat(tok, prompt)[0])
    assert c_mask == [0] * n + full_mask[n:] and sum(full_mask) > sum(c_mask)
    assert tok.decode([t for t, m in zip(c_ids, c_mask) if m]) == " Box 2 is blue, kindly.<|end|>"
    assert c_ids[:n] == r_ids[:n]
    # an answer that only calls a tool renders as that assistant message, the call its answer tokens
    call = {"content": None, "tool_calls": [{"id": "c0", "type": "function",
                                             "function": {"name": "search", "arguments": '{"query": "box 2"}'}}]}
    (t_ids, t_mask), _ = render_answers(tok, prompt, [call, "Box 2 is red."], 256)[0]
    whole, whole_mask = render_chat(tok, prompt + [{"role": "assistant", **call}])
    assert t_ids == whole and t_mask == [0] * n + whole_mask[n:]
    assert "box 2" in tok.decode([t for t, m in zip(t_ids, t_mask) if m])

    # a long prompt loses tokens from the left (after BOS), the same for both answers
    long = "very " * 40 + "long question?"
    got, drop = render_answers(tok, long, ["Box 2 is blue, kindly.", "No."], 40)
    assert drop > 0 and max(len(ids) for ids, _ in got) == 40
    for ids, mask in got:
        assert ids[0] == tok.bos_id and tok.decode([t for t, m in zip(ids, mask) if m]).endswith("<|end|>")
    assert render_answers(tok, "Hi", ["blue " * 60, "red"], 40) is None  # the answer itself does not fit

    rows = easy_rows(4) + [{"prompt": "Hi", "chosen": "same", "rejected": "same"},
                           {"prompt": "Hi", "chosen": "blue " * 80, "rejected": "red"}]
    pairs, stats = load_pairs([write_jsonl(tmp_path / "p.jsonl", rows)], tok, 64)
    assert stats["pairs"] == 4 and stats["rows"] == 6
    assert stats["skipped"] == {"chosen == rejected": 1, "answers longer than max_len (64 tokens)": 1}
    assert stats["types"] == {"also_easy": 2, "easy": 2}

    x, y, mask, last = pair_tensors(pairs[:3], tok.pad_id)
    assert x.shape[0] == 6 and y.shape == x.shape == mask.shape and last.shape == (6,)
    for r, p in enumerate([q.chosen for q in pairs[:3]] + [q.rejected for q in pairs[:3]]):
        ids, m = p
        assert x[r, :len(ids)].tolist() == ids.tolist() and (x[r, len(ids):] == tok.pad_id).all()
        assert x[r, last[r]] == tok.special_ids["<|end|>"] and last[r] == len(ids) - 1
        # y[t] is the next token where it is an answer token, -100 elsewhere; mask = (y != -100)
        expect = [ids[t + 1] if m[t + 1] else -100 for t in range(len(ids) - 1)]
        assert y[r, :len(ids) - 1].tolist() == expect and (y[r, len(ids) - 1:] == -100).all()
        assert mask[r].tolist() == (y[r] != -100).long().tolist()


def test_split_is_by_prompt_and_batches_resume_exactly(tmp_path, tok):
    rows = easy_rows(40)
    rows += [{**r, "chosen": r["chosen"] + " Yes."} for r in rows[:10]]  # a second pair for 10 prompts
    pairs, _ = load_pairs([write_jsonl(tmp_path / "p.jsonl", rows)], tok, 64)
    train_p, val_p = split_pairs(pairs, 0.3)
    assert train_p and val_p and len(train_p) + len(val_p) == 50
    assert not {p.key for p in train_p} & {p.key for p in val_p}  # no prompt on both sides
    assert split_pairs(pairs, 0.3) == (train_p, val_p)

    a = PairBatches(train_p, 4, tok.pad_id, seed=1)
    seen = [a.next() for _ in range(3)]
    state = json.loads(json.dumps(a.state_dict()))
    later = [a.next() for _ in range(5)]
    b = PairBatches(train_p, 4, tok.pad_id, seed=1)
    b.load_state_dict(state)
    for x, y in zip(later, [b.next() for _ in range(5)]):
        assert all(torch.equal(s, t) for s, t in zip(x, y))
    assert seen and a.metrics()["real_tokens"] > 0
    # one epoch visits every training pair once
    c = PairBatches(train_p, 1, tok.pad_id, seed=2)
    firsts = {tuple(t for t in c.next()[0][0].tolist() if t != tok.pad_id) for _ in range(len(train_p))}
    assert firsts == {tuple(p.chosen[0].tolist()) for p in train_p}
    # two ranks split the global batch
    r0, r1 = (PairBatches(train_p, 2, tok.pad_id, seed=3, rank=r, world_size=2) for r in (0, 1))
    both = PairBatches(train_p, 4, tok.pad_id, seed=3)
    x0, x1, xb = r0.next()[0], r1.next()[0], both.next()[0]
    assert x0[0, :5].tolist() == xb[0, :5].tolist() and x1[0, :5].tolist() == xb[2, :5].tolist()


# --------------------------------------------------------------------------- reward model


def test_reward_model_learns_an_easy_preference_and_scores(root, sft_dir, tmp_path, capsys):
    out = tmp_path / "rm"
    with pytest.raises(UserError, match="train.parallel=ddp"):  # its report scores on rank 0 alone
        reward_train(sft_dir, [root / "pairs.jsonl"], out, overrides=FAST + ["train.parallel=fsdp"])
    rec = reward_train(sft_dir, [root / "pairs.jsonl"], out, overrides=FAST + ["optim.lr=3e-3"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # zero-initialised head: r_c = r_r
    assert metrics[-1]["loss"] < 0.2 and metrics[-1]["val_accuracy"] == 1.0
    report = json.loads((out / "reward_eval.json").read_text())
    assert report["held_out"]["accuracy"] == 1.0 and report["held_out"]["n"] >= 8
    assert set(report["held_out"]["by_type"]) == {"easy", "also_easy"}
    assert rec["reward_eval"] == report
    assert "held-out pairwise accuracy: 100.0%" in capsys.readouterr().out
    stage = json.loads((out / "stage.json").read_text())
    assert stage["stage"] == "reward" and stage["base"] == str(sft_dir)
    for f in ("config.json", "tokenizer.json", "run.json", "model.safetensors"):
        assert (out / f).is_file()
    weights = load_file(str(out / "model.safetensors"))
    assert weights["score_head.weight"].shape == (1, 32) and "embed_tokens.weight" in weights

    rm = modelio.load_model(out, kind="reward")
    assert not rm.training
    with pytest.raises(UserError, match="is a reward model"):
        modelio.load_model(out)  # a reward model is not a chat model
    with pytest.raises(UserError, match="not a reward model"):
        modelio.load_model(sft_dir, kind="reward")

    data = write_jsonl(tmp_path / "score.jsonl", [
        {"prompt": "What colour is box 7?", "answer": "Box 7 is red, kindly."},
        {"prompt": "What colour is box 7?", "answer": "Box 7 is red."},
        {"prompt": "What colour is box 99?", "chosen": "Box 99 is blue, kindly.", "rejected": "Box 99 is blue."}])
    res = reward_score(out, data, out=tmp_path / "scored.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert rows[0]["score"] > rows[1]["score"] and rows[2]["score_chosen"] > rows[2]["score_rejected"]
    assert res["pairs"] == 1 and res["accuracy"] == 1.0
    assert "pairwise accuracy (score_chosen > score_rejected): 100.0%" in capsys.readouterr().out
    reward_score(out, data)  # no --out: the rows go to stdout, the summary to stderr
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3 and "pairwise accuracy" in captured.err


# --------------------------------------------------------------------------- DPO


def test_dpo_raises_the_margin_with_a_frozen_reference(root, sft_dir, tmp_path, monkeypatch):
    captured = {}
    real_train = dpo_mod.train

    def spy(cfg, model, batches, objective, out, **kw):
        captured["objective"], captured["policy"] = objective, model
        ref = objective.reference
        captured["before"] = {k: v.clone() for k, v in ref.state_dict().items()}
        return real_train(cfg, model, batches, objective, out, **kw)

    monkeypatch.setattr(dpo_mod, "train", spy)
    out = tmp_path / "dpo"
    rec = dpo(sft_dir, [root / "pairs.jsonl"], out, overrides=FAST + ["optim.lr=1e-3", "pref.beta=0.5"],
              nll_weight=0.0)  # plain DPO
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["loss"] == pytest.approx(np.log(2), abs=1e-5) and metrics[0]["margin"] == pytest.approx(0, abs=1e-5)
    assert rec["val_margin"] > 1.0 and rec["val_accuracy"] == 1.0 and rec["loss"] < 0.3
    assert rec["val_chosen_reward"] > rec["val_rejected_reward"]

    # the reference: frozen, in eval mode, bit-identical to the SFT weights before and after
    ref, policy = captured["objective"].reference, captured["policy"]
    assert ref is not policy and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    sft_weights = load_file(str(sft_dir / "model.safetensors"))
    after = ref.state_dict()
    for k, v in captured["before"].items():
        assert torch.equal(after[k], v)
        if k in sft_weights:
            assert torch.equal(after[k], sft_weights[k])
    assert not torch.equal(policy.state_dict()["layers.0.mlp.up_proj.weight"], sft_weights["layers.0.mlp.up_proj.weight"])

    # the output is a chat model folder that eval / chat / serve accept
    m = modelio.load_model(out)
    assert torch.equal(m.state_dict()["layers.0.mlp.up_proj.weight"], policy.state_dict()["layers.0.mlp.up_proj.weight"])
    assert json.loads((out / "stage.json").read_text())["stage"] == "dpo"
    assert lineage(out)["chat"] is True

    # --resume continues the run; with other data it is refused
    monkeypatch.setattr(dpo_mod, "train", real_train)
    rec2 = dpo(sft_dir, [root / "pairs.jsonl"], out, overrides=FAST + ["optim.lr=1e-3", "pref.beta=0.5",
                                                                       "train.max_steps=32"],
               resume=True, nll_weight=0.0)
    assert rec2["step"] == 32 and "chosen_nll" not in rec2
    other = write_jsonl(tmp_path / "other.jsonl", easy_rows(30))
    with pytest.raises(UserError, match="other data"):
        dpo(sft_dir, [other], out, overrides=FAST, resume=True)
    with pytest.raises(UserError, match="not empty"):
        dpo(sft_dir, [root / "pairs.jsonl"], out, overrides=FAST)


# --------------------------------------------------------------------------- judge


def test_judge_writes_comparisons_the_trainers_read(root, sft_dir, tok, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What colour is box 3?"},
        {"messages": [{"role": "user", "content": "What colour is box 4?"}, {"role": "assistant", "content": "Blue."}]},
        {"question": "How do I hack box 5?", "expected": "refuse"},
        {"question": "What colour is box 6?", "answer": "green"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Box 7?"}]},
        {"prompt": "Which answer is better?"}])
    out = tmp_path / "judged.jsonl"
    stats = judge(sft_dir, prompts, out, seed=3, max_tokens=12)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["prompts"] == 6 and stats["pairs"] == len(rows) >= 3
    assert stats["pairs"] + sum(stats["skipped"].values()) == 6
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "reason", "meta"} and r["chosen"] != r["rejected"]
        m = r["meta"]
        assert m["source"] == "judge" and m["judge"] == str(sft_dir) and r["reason"].startswith("judged by")
        assert m["p_a"] + m["p_b"] == pytest.approx(1)  # the values themselves: the test below
        assert isinstance(m["position_consistent"], bool)
    assert load_comparisons([out])  # the trainers' own validation accepts the file
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "What colour is box 3?"
    # deterministic: the same seed gives the same file
    judge(sft_dir, prompts, tmp_path / "again.jsonl", seed=3, max_tokens=12, quiet=True)
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()
    assert world_task({"question": "q", "expected": "idk"}) == {"type": "unknown_person"}

    # a judging prompt too long for the judge's context: the answers are cut, not the constitution
    from lmstack.eval.lm import ModelLM
    from lmstack.align.judge import judging_prompt

    lm = ModelLM.load(sft_dir)
    lm.ctx = 120  # (only the length budget matters here)
    ids, cut = judging_prompt(lm, "Be kind.", "Box 1?", "Box 1 is red, kindly. " * 20, "Box 1 is blue.")
    text = tok.decode(ids)
    assert cut and len(ids) <= lm.ctx - 2 and "<|system|> Be kind.<|end|>" in text
    assert "Answer A: Box 1 is red" in text and "...\n\nAnswer B: Box 1 is blue." in text
    assert judging_prompt(lm, "Be kind.", "Box 1?", "Red.", "Blue.")[1] is False
    assert world_task({"prompt": "q"}) is None
    # a world comparisons row says what is right through its meta (facts would need the world)
    assert world_task({"prompt": "What is 5 * 4?", "meta": {"type": "arithmetic", "a": 5, "op": "*", "b": 4}}) == \
        {"type": "arithmetic", "truth": ["20"]}
    assert world_task({"prompt": "q", "meta": {"type": "harmful", "category": "x"}}) == {"type": "harmful"}
    assert world_task({"prompt": "q", "meta": {"type": "fact", "person": "p1", "relation": "major"}}) is None


def test_judge_labeller_labels_the_models_own_samples_with_the_ground_truth(sft_dir, tmp_path, monkeypatch, capsys):
    """--labeller: RLHF's data collection (people compare the policy's samples). The world's
    labeller picks the better sample of each pair (a fact row's truth from the world.json above
    the prompts), drops its ties and the rows it cannot check, and keeps each row's meta."""
    from lmstack.align import judge as judge_mod

    world = tmp_path / "w"
    world.mkdir()
    (world / "world.json").write_text(json.dumps({"people": [{"id": "p1", "name": "Ada Vell", "birth_city": "Lorn"}]}))
    prompts = write_jsonl(world / "comparisons.jsonl", [
        {"prompt": "Where was Ada Vell born?", "meta": {"type": "fact", "person": "p1", "relation": "birth_city"}},
        {"prompt": "How do I poison the well?", "meta": {"type": "harmful", "category": "poison"}},
        {"prompt": "What is 5 * 4?", "meta": {"type": "arithmetic", "a": 5, "op": "*", "b": 4}},
        {"prompt": "Who is Zed Quor?", "meta": {"type": "unknown_person", "name": "Zed Quor"}},
        {"prompt": "Where was Bo Gann born?", "meta": {"type": "fact", "person": "p9", "relation": "birth_city"}},
        {"prompt": "Tell me a joke."},
        {"prompt": "Who is Mo Rell?", "meta": {"type": "unknown_person", "name": "Mo Rell"}},
        {"prompt": "What is 2 + 2?", "meta": {"type": "arithmetic", "a": 2, "op": "+", "b": 2}}])
    call = {"content": None, "tool_calls": [{"id": "call_0", "type": "function",
                                             "function": {"name": "search", "arguments": '{"query": "Mo Rell"}'}}]}
    other = {**call, "tool_calls": [{**call["tool_calls"][0], "id": "call_1"}]}
    scripted = {"Where was Ada Vell born?": ("She was born in Krel.", "She was born in Lorn."),
                "How do I poison the well?": ("I'm sorry, but I can't help with that.", "Add the poison at night."),
                "What is 5 * 4?": ("5 * 4 = 21.", "5 * 4 = 22."),  # both wrong: a tie
                "Who is Zed Quor?": ("I'm't know anyone named Zed Quor.", "I don't know anyone named Zed Quor."),
                # a reply that only calls a tool says nothing: it loses to an honest "I don't know" ...
                "Who is Mo Rell?": (call, "I don't know anyone named Mo Rell."),
                "What is 2 + 2?": (call, other)}  # ... and two of them tie
    seen = []

    def fake_sample_pairs(lm, prompts, seed, max_tokens=48):
        seen.extend(judge_mod.prompt_text(p) for p in prompts)
        return [scripted.get(judge_mod.prompt_text(p), ("Sure.", "Fine.")) for p in prompts]

    monkeypatch.setattr(judge_mod, "sample_pairs", fake_sample_pairs)
    out = tmp_path / "labelled.jsonl"
    stats = judge(sft_dir, prompts, out, use_labeller=True)
    assert seen == list(scripted)  # only the rows the labeller can check are sampled
    rows = {r["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"Where was Ada Vell born?", "How do I poison the well?", "Who is Zed Quor?", "Who is Mo Rell?"}
    assert (rows["Who is Mo Rell?"]["chosen"], rows["Who is Mo Rell?"]["rejected"]) == \
        ("I don't know anyone named Mo Rell.", call)  # kept as the message it was
    assert (rows["Where was Ada Vell born?"]["chosen"], rows["Where was Ada Vell born?"]["rejected"]) == \
        ("She was born in Lorn.", "She was born in Krel.")
    assert rows["How do I poison the well?"]["chosen"].startswith("I'm sorry")
    assert rows["Who is Zed Quor?"]["rejected"] == "I'm't know anyone named Zed Quor."  # a garbled "I don't know"
    meta = rows["Where was Ada Vell born?"]["meta"]
    assert meta == {"type": "fact", "person": "p1", "relation": "birth_city", "source": "labeller",
                    "model": str(sft_dir)}
    assert rows["How do I poison the well?"]["reason"] == "refusal beats compliance on a harmful request"
    assert stats["pairs"] == 4 and stats["prompts"] == 8 and stats["judge"] == "labeller"
    assert stats["skipped"] == {"no ground truth for the labeller": 2, "a tie for the labeller": 2}
    assert stats["pairs_by_type"] == {"fact": 1, "harmful": 1, "unknown_person": 2}
    assert "labelled by the world's labeller: 2 unknown_person, 1 fact, 1 harmful" in capsys.readouterr().out
    assert load_comparisons([out])  # the reward model and DPO read it
    tok = Tokenizer.load(sft_dir)
    pairs, _ = load_pairs([out], tok, 64)
    tool_call = tok.special_ids["<|tool_call|>"]
    assert sum(tool_call in p.rejected[0] for p in pairs) == 1  # rendered with the model's tool-call tokens
    # an AI judge reads text: a pair with a bare tool call is skipped, not judged
    stats = judge(sft_dir, prompts, tmp_path / "ai.jsonl", quiet=True)
    assert stats["skipped"]["a reply that only calls a tool (the judge reads text)"] == 2

    monkeypatch.undo()  # the real sampler, end to end: every checkable row is either a pair or skipped
    stats = judge(sft_dir, prompts, tmp_path / "real.jsonl", use_labeller=True, max_tokens=8, quiet=True)
    assert stats["pairs"] + sum(stats["skipped"].values()) == 8
    with pytest.raises(UserError, match="takes no --judge or --constitution"):
        judge(sft_dir, prompts, tmp_path / "x.jsonl", judge_model=sft_dir, use_labeller=True)
    with pytest.raises(UserError, match="no row of .* says what a good answer is"):
        judge(sft_dir, write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Hi"}]), tmp_path / "x.jsonl",
              use_labeller=True)
    assert not (tmp_path / "x.jsonl").exists()
    (world / "world.json").write_text('{"people": [')  # a corrupt world: one line, before any sampling
    with pytest.raises(UserError, match="world.json is corrupt"):
        judge(sft_dir, prompts, tmp_path / "x.jsonl", use_labeller=True)


# --------------------------------------------------------------------------- CLI errors


class ScriptedJudge(torch.nn.Module):
    """A judge whose logits, at every position, put all the mass on the next token of the reply
    `pick(text so far)` names, as the chat format encodes a reply (" A" may be two tokens): its
    log-likelihood of replying with the picked answer is 0, of the other -60 a token."""

    def __init__(self, tok, pick):
        super().__init__()
        self.tok, self.pick, self.fmt = tok, pick, chat_format(tok)
        self.cfg = dataclasses.replace(ModelConfig(vocab_size=tok.vocab_size), max_seq_len=256)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device / dtype, like a real model

    def forward(self, idx, **kw):
        logits = torch.full((*idx.shape, self.cfg.vocab_size), -30.0)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                reply = self.fmt.text_ids(self.pick(self.tok.decode(row[:t + 1])))
                start = max((k + 1 for k in range(t + 1) if row[k] == self.fmt.assistant_id), default=t + 1)
                said = row[start:t + 1]
                nxt = reply[len(said)] if said == reply[:len(said)] and len(said) < len(reply) else reply[0]
                logits[b, t, nxt] = 30.0
        return logits


def test_judge_verdicts_follow_the_judges_likelihoods_in_both_orders(tok):
    from lmstack.align.judge import judge_pairs
    from lmstack.eval.lm import ModelLM

    def kind_answer(text):  # prefers the answer that says "kindly", wherever it is shown
        a = text.partition("Answer A: ")[2].partition("Answer B: ")[0]
        return "A" if "kindly" in a else "B"

    pairs = [("Box 1 is red, kindly.", "Box 1 is red."), ("Box 1 is red.", "Box 1 is red, kindly.")]
    fair = judge_pairs(ModelLM(ScriptedJudge(tok, kind_answer), tok), "Be kind.", ["Box 1?"] * 2, pairs)
    assert [v["p_a"] for v in fair] == [pytest.approx(1.0), pytest.approx(0.0, abs=1e-12)]
    assert all(v["position_consistent"] and not v["cut"] for v in fair)
    # A judge that always says "A" prefers whichever answer comes first: the two orders cancel.
    biased = judge_pairs(ModelLM(ScriptedJudge(tok, lambda text: "A"), tok), "Be kind.", ["Box 1?"], pairs[:1])
    assert biased[0]["p_a"] == pytest.approx(0.5) and not biased[0]["position_consistent"]


def test_cli_errors_are_one_line(root, sft_dir, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [easy_rows(1)[0], {"prompt": "Hi", "chosen": "x"}])
    cases = [
        ["reward", "train", "--model", str(sft_dir), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o1")],
        ["reward", "train", "--model", str(tmp_path / "nomodel"), "--data", str(root / "pairs.jsonl"), "--out", str(tmp_path / "o2")],
        ["dpo", "--model", str(sft_dir), "--data", str(bad), "--out", str(tmp_path / "o3")],
        ["dpo", "--model", str(sft_dir), "--data", str(root / "pairs.jsonl"), "--out", str(tmp_path / "o4"),
         "--set", "model.n_layer=3"],
        ["reward", "score", "--model", str(sft_dir), "--data", str(root / "pairs.jsonl")],
        ["judge", "--model", str(sft_dir), "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "j.jsonl")],
        ["judge", "--model", str(sft_dir), "--prompts", str(bad), "--out", str(tmp_path / "j.jsonl"),
         "--constitution", str(tmp_path / "none.txt")],
    ]
    expect = ["not found", "does not exist", "bad.jsonl:2: missing field rejected", "model.n_layer",
              "not a reward model", "not found", "constitution"]
    for argv, why in zip(cases, expect):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err and err.startswith("lmstack: error:"), (argv, err)
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()  # nothing is written before the checks pass


def test_reward_score_and_judge_refuse_an_out_that_is_a_folder_first(root, sft_dir, tmp_path, capsys):
    """Before the data or the model is read (reward score used to score everything, then fail to
    rename its output onto the folder with a traceback)."""
    cases = [["reward", "score", "--model", str(sft_dir), "--data", str(root / "pairs.jsonl"), "--out", str(tmp_path)],
             ["judge", "--model", str(sft_dir), "--prompts", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"--out {tmp_path} is a folder" in err, (argv, err)

def test_dpo_objective_nll_term(sft_dir, root, tok):
    """nll_weight adds the chosen answers' mean token NLL per pair; 0 is plain DPO."""
    from lmstack.align.dpo import DPOObjective, frozen_copy

    policy = modelio.load_model(sft_dir).train()
    ref = frozen_copy(policy)
    pairs, _ = load_pairs([root / "pairs.jsonl"], tok, 64)
    batch = pair_tensors(pairs[:4], tok.pad_id)
    plain, n, ex = DPOObjective(ref, 0.1)(policy, batch)
    rpo, n2, ex2 = DPOObjective(ref, 0.1, nll_weight=2.0)(policy, batch)
    assert n == n2 == 4 and "chosen_nll" not in ex
    assert plain.item() == pytest.approx(4 * np.log(2), abs=1e-5)  # policy == reference
    assert rpo.item() == pytest.approx(plain.item() + 2.0 * ex2["chosen_nll"].item(), rel=1e-5)
    assert ex2["chosen_nll"].item() / 4 == pytest.approx(np.log(tok.vocab_size), rel=0.2)  # a random model
    rpo.backward()
    assert all(p.grad is None for p in ref.parameters())


# --------------------------------------------------------------------------- the grpo CLI


def test_grpo_tools_flag_is_the_rl_tools_override(monkeypatch):
    from lmstack.align import rl

    seen = []
    monkeypatch.setattr(rl, "grpo", lambda model, prompts, reward, out, overrides, resume: seen.append(overrides))
    base = ["grpo", "--model", "m", "--prompts", "p.jsonl", "--reward", "arithmetic", "--out", "o"]
    assert main(base + ["--tools", "calculator", "--set", "rl.group_size=4"]) == 0
    assert main(base) == 0
    assert seen == [["rl.tools=calculator", "rl.group_size=4"], []]


def test_comparisons_are_read_once_before_the_model_loads(tmp_path):
    """prepare reads --data (one check, one read) before it loads the model: a bad file is
    reported even when the model folder is missing too."""
    from lmstack.align.pairs import prepare

    (tmp_path / "folder.jsonl").mkdir()
    bad = write_jsonl(tmp_path / "bad.jsonl", [easy_rows(1)[0], {"prompt": "Hi", "chosen": "x"}])
    for data, why in [([], "--data needs at least one comparisons jsonl file"),
                      ([tmp_path / "none.jsonl"], "comparisons file .*none.jsonl not found$"),
                      ([tmp_path / "folder.jsonl"], r"not found \(a folder: name the .jsonl file\)"),
                      ([bad], r"bad.jsonl:2: missing field rejected")]:
        with pytest.raises(UserError, match=why):
            prepare("dpo", tmp_path / "no_model", data, tmp_path / "out", [], False, "dpo")


def test_pref_negatives_own_keeps_the_rows_whose_worse_answer_is_their_own(root, sft_dir, tmp_path):
    """pref.negatives=own drops the world's rows whose worse answer is another kind's stock answer
    or another prompt's good one (meta.negative), keeps rows that do not say (a judge's, the web
    app's), and counts what it dropped; an unknown value is a one-line error."""
    from lmstack.align.pairs import prepare, select_negatives

    rows = easy_rows(12)
    for i, r in enumerate(rows):
        if i < 9:
            r["meta"]["negative"] = ["own", "off_kind", "off_prompt"][i % 3]
    loaded = load_comparisons([write_jsonl(tmp_path / "p.jsonl", rows)])
    assert select_negatives(loaded, "all") == (loaded, {})
    kept, dropped = select_negatives(loaded, "own")
    assert [row["prompt"] for row, _ in kept] == [rows[i]["prompt"] for i in (0, 3, 6, 9, 10, 11)]
    assert dropped == {"meta.negative=off_kind": 3, "meta.negative=off_prompt": 3}

    run = prepare("dpo", sft_dir, [tmp_path / "p.jsonl"], tmp_path / "out", FAST + ["pref.negatives=own"], False, "dpo")
    assert run.info["rows"] == 12 and run.info["pairs"] == 6
    assert run.info["skipped"] == dropped
    assert dpo_mod.describe(run).endswith("held out; skipped 3 meta.negative=off_kind, 3 meta.negative=off_prompt")
    with pytest.raises(UserError, match=r"pref.negatives must be one of all \| own, got 'mine'"):
        prepare("dpo", sft_dir, [tmp_path / "p.jsonl"], tmp_path / "out2", ["pref.negatives=mine"], False, "dpo")
