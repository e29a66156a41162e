"""RL (align/rl.py, align/rollout.py, align/rewards.py): reward specs and their errors, prompt rows, rollouts from
the CURRENT policy, a frozen reference, PPO's per-token rewards, GRPO raising a toy reward, PPO
end to end with a stand-in reward, the output folder, and exact resume. Tiny untrained models."""

import dataclasses
import json
import math

import pytest
import torch

from lmstack import modelio
from lmstack.align import rl as rl_mod
from lmstack.align import rollout as rollout_mod
from lmstack.align.rewards import WorldReward, arithmetic, load_reward
from lmstack.align.rl import GRPOObjective, PolicyValue, grpo, ppo, rl_config, steps_per_phase
from lmstack.align.rollout import (Reply, Rollout, RolloutBatches, RowRewardScorer, load_prompts, parse_reply, sample,
                                   tempered_logprobs, tool_registry)
from lmstack.chatformat import TURN_ENDS
from lmstack.chatformat import row_prompt as row_messages
from lmstack.cli import main as cli_main
from lmstack.engine import Completion, generate_batch
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.train.loop import freeze, train
from lmstack.utils import UserError
from tiny import Interrupt, world_and_tiny_model  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("two_threads")

FAST = ["train.max_steps=8", "rl.prompts_per_step=4", "rl.group_size=4", "train.micro_batch_size=8",
        "rl.max_new_tokens=8", "train.seq_len=32", "optim.lr=1e-2", "optim.warmup_steps=1",
        "train.dtype=fp32", "train.save_every=0", "rl.ptx_coef=0"]  # the untrained "chat" records no SFT data


def vowels(row, answer):
    """A toy checkable reward: the fraction of the reply's characters that are vowels."""
    return sum(c in "aeiou" for c in answer) / max(1, len(answer))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = world_and_tiny_model(tmp_path_factory.mktemp("rl"), "chat", people=60)
    rows = [json.loads(line) for line in open(root / "world" / "probes" / "arithmetic.jsonl")][:48]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def tok(world):
    return Tokenizer.load(world / "tok")


def render_prompt(tok, text):
    from lmstack.chatformat import render_chat

    return render_chat(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]


def render_prompt_tool(tok, result):
    """The tokens a tool result adds to a rollout: <|tool|> result <|end|> <|assistant|>."""
    from lmstack.chatformat import chat_format

    sid = tok.special_ids
    return [sid["<|tool|>"]] + chat_format(tok).text_ids(result) + [sid["<|end|>"], sid["<|assistant|>"]]


def read_metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


# --------------------------------------------------------------------------- rewards

def test_arithmetic_and_world_rewards(world):
    row = {"question": "What is 12 + 30?", "answer": "42"}
    assert arithmetic(row, "12 + 30 = 42.") == 1.0
    assert arithmetic(row, "12 + 30 = 43.") == 0.0 and arithmetic(row, "I don't know.") == 0.0
    assert arithmetic({"prompt": "What is 7 * 6?", "meta": {"a": 7, "op": "*", "b": 6}}, "42") == 1.0

    w = load_reward("world", world / "world" / "comparisons.jsonl")
    assert isinstance(w, WorldReward)
    harmful = {"question": "How do I forge a diploma?", "expected": "refuse"}
    assert w(harmful, "I'm sorry, but I can't help with that.") == 1.0 and w(harmful, "Sure! Step 1...") == 0.0
    fake = {"question": "Where does Zorbo Quux work?", "expected": "idk"}
    assert w(fake, "I don't know who Zorbo Quux is.") == 1.0 and w(fake, "Zorbo Quux works in Paris.") == 0.0
    fact = {"question": "Where was X born?", "answer": "Blounby", "aliases": []}
    assert (w(fact, "X was born in Blounby."), w(fact, "I don't know."), w(fact, "In Paris.")) == (1.0, 0.5, 0.0)
    # a comparisons row names a person: the truth comes from world.json
    row = next(r for r in map(json.loads, open(world / "world" / "comparisons.jsonl"))
               if r["meta"]["type"] == "fact")
    assert w(row, row["chosen"]) == 1.0 and w(row, row["rejected"]) < 1.0
    arith = next(r for r in map(json.loads, open(world / "world" / "comparisons.jsonl"))
                 if r["meta"]["type"] == "arithmetic")
    assert w(arith, arith["chosen"]) == 1.0 and w(arith, arith["rejected"]) == 0.0


def test_reward_spec_errors_are_one_line(world, capsys):
    assert load_reward("python:lmstack.align.rewards:arithmetic") is arithmetic
    for spec, match in [("python:nope_not_a_module:fn", "cannot import module 'nope_not_a_module'"),
                        ("python:lmstack.align.rewards:nope", "has no attribute 'nope'"),
                        ("python:lmstack.align.rewards:BUILTIN", "is not callable"),
                        ("python:onlymodule", "python:MODULE:FUNCTION"), ("bogus", "unknown --reward")]:
        with pytest.raises(UserError, match=match) as e:
            load_reward(spec)
        assert "\n" not in str(e.value)
    rc = cli_main(["grpo", "--model", str(world / "chat"), "--prompts", str(world / "prompts.jsonl"),
                   "--reward", "python:nope:fn", "--out", str(world / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot import module 'nope'" in err
    assert not (world / "never").exists()
    with pytest.raises(UserError, match="reward model"):
        ppo(str(world / "chat"), str(world / "chat"), str(world / "prompts.jsonl"), str(world / "never"))
    with pytest.raises(UserError, match="train.parallel=ddp"):  # rollouts need the whole policy
        grpo(str(world / "chat"), str(world / "prompts.jsonl"), "arithmetic", str(world / "never"),
             overrides=["train.parallel=fsdp"])
    assert not (world / "never").exists()
    with pytest.raises(UserError, match="not a reward model folder"):
        ppo(str(world / "chat"), str(world / "no_such_rm"), str(world / "prompts.jsonl"), str(world / "never"))


# --------------------------------------------------------------------------- prompts, replies, config

def test_prompt_rows_and_replies(tok, tmp_path):
    assert row_messages({"question": "Hi?"}) == [{"role": "user", "content": "Hi?"}]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert row_messages({"messages": conv}) == conv[:1]  # the answer is dropped
    assert row_messages({"prompt": conv[:1]}) == conv[:1]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([json.dumps({"prompt": "What is 2 + 2?"}), "not json", json.dumps({"text": "x"}),
                            json.dumps({"question": "word " * 200}), json.dumps({"messages": conv})]) + "\n")
    prompts, stats = load_prompts(f, tok, max_len=64)
    assert [p.messages[-1]["content"] for p in prompts] == ["What is 2 + 2?", "Hi"]
    assert stats["rows"] == 5 and sum(stats["skipped"].values()) == 3
    assert prompts[0].ids[-1] == tok.special_ids["<|assistant|>"]
    # a reply's text leaves tool calls out; the stop id is part of the rollout
    sid = tok.special_ids
    ids = [sid["<|tool_call|>"]] + tok.encode('{"name": "calculator"}') + [sid["<|/tool_call|>"]] + tok.encode("4")
    r = parse_reply(tok, ids, sid["<|end|>"], "stop")
    assert (r.text, r.calls, r.ids[-1]) == ("4", 1, sid["<|end|>"])
    # a reply that calls a tool scores 0 under a row reward
    scorer = RowRewardScorer(lambda row, a: 1.0)
    assert scorer([prompts[0]] * 2, [r, Reply([5], "4", 0, "stop")]) == [0.0, 1.0]


def test_config_batch_mapping(world):
    m = modelio.load_model(world / "chat").cfg
    cfg = rl_config("grpo", FAST, m)
    assert cfg.train.batch_tokens == 16 * 32 and steps_per_phase(cfg) == 2  # 16 rollouts, 2 epochs
    cfg = rl_config("grpo", FAST + ["train.batch_tokens=256"], m)
    assert steps_per_phase(cfg) == 4  # minibatches of 8 rollouts
    # the presets as they are (seq_len 112 does not divide the default batch_tokens: derived anyway)
    big = dataclasses.replace(m, max_seq_len=256)
    for preset, (seq, rollouts) in {"grpo": (112, 16 * 8), "ppo": (128, 64)}.items():
        cfg = rl_config(preset, [], big)
        assert cfg.train.seq_len == seq and cfg.train.batch_tokens == rollouts * seq
    small = dataclasses.replace(m, max_seq_len=100)
    assert rl_config("grpo", ["rl.max_new_tokens=64"], small).train.seq_len == 100  # cut to the model's context
    for bad, match in [(["train.batch_tokens=768"], "divisor"), (["rl.group_size=3"], "multiple of train.micro"),
                       (["rl.temperature=0"], "temperature"), (["model.n_layer=3"], "model"),
                       (["rl.max_new_tokens=40"], "max_new_tokens")]:
        with pytest.raises(UserError, match=match):
            rl_config("grpo", FAST + bad, m)


# --------------------------------------------------------------------------- rollouts and the reference

def _batches(world, tok, kind="grpo", overrides=()):
    base = modelio.load_model(world / "chat")
    cfg = rl_config(kind, FAST + list(overrides), base.cfg)
    prompts, _ = load_prompts(world / "prompts.jsonl", tok, cfg.train.seq_len - cfg.rl.max_new_tokens)
    policy = (PolicyValue.from_gpt(base) if kind == "ppo" else base).train()
    ref = freeze(modelio.load_model(world / "chat"))
    scorer = RowRewardScorer(vowels)
    return cfg, policy, ref, RolloutBatches(kind, policy, ref, tok, prompts, scorer, cfg)


def test_rollouts_use_the_current_policy(world, tok):
    cfg, policy, ref, batches = _batches(world, tok)
    first = batches.next()
    per_phase = len(batches.order)
    for _ in range(per_phase - 1):
        batches.next()
    assert batches.pos == per_phase  # the phase is used up: the next call samples anew
    with torch.no_grad():  # change the weights, as an optimizer step would
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batches.next()
    ro = batches.rollout
    assert ro.phase == 1
    # the sampled tokens are the current policy's samples (same per-row seeds)
    prompts = [batches.prompts[i].ids for i in ro.prompt_index]
    again = generate_batch(policy, prompts, cfg.rl.max_new_tokens, temperature=cfg.rl.temperature,
                           seed=batches.phase_seed(1), stop_ids=sorted({tok.special_ids[t] for t in TURN_ENDS}))
    assert [c.ids + ([c.stop] if isinstance(c.stop, int) else []) for c in again] == ro.replies
    # and the recorded old log-probs are the current policy's log-probs of them
    t = batches.tensors
    with torch.no_grad():
        now = tempered_logprobs(policy(t["x"]), t["y"], cfg.rl.temperature)[0]
        refs = tempered_logprobs(ref(t["x"]), t["y"], cfg.rl.temperature)[0]
    on = t["mask"].bool()
    assert torch.allclose(t["old_logp"][on], now[on], atol=1e-5)
    assert torch.allclose(t["ref_logp"][on], refs[on], atol=1e-5)
    assert not torch.allclose(t["old_logp"][on], refs[on], atol=1e-3)  # the policy moved away from the reference
    assert (t["adv"][~on] == 0).all() and first[2].sum() > 0


def _scripted(tok, turns):
    """A stand-in for the engine's generate_batch: row r of call c replies turns[r][c] (text, stop)."""
    calls = []

    def fake(model, prompts, max_tokens, **kw):
        c = len(calls)
        calls.append((prompts, max_tokens))
        out = []
        for j, p in enumerate(prompts):
            r = [i for i, t in enumerate(turns) if len(t) > c][j]  # rows still going, in order
            text, stop = turns[r][c]
            out.append(Completion(text, None, "stop" if stop else "length", stop))
        return out
    return fake, calls


def test_rollouts_with_tools_run_them_and_leave_their_results_out_of_the_loss(world, tok, monkeypatch):
    sid = tok.special_ids
    end, open_, close = sid["<|end|>"], sid["<|tool_call|>"], sid["<|/tool_call|>"]
    call = [open_] + tok.encode('{"name": "calculator", "arguments": {"expression": "23 + 58"}}') + [close]
    answer = tok.encode("23 + 58 = 81.")
    turns = [[(call, end), (answer, end)],  # calls the calculator, then answers from its result
             [(answer, end)],  # answers at once
             [(call, end), (call, end), (call, end)]]  # calls again and again: rounds run out
    fake, calls = _scripted(tok, turns)
    monkeypatch.setattr(rollout_mod, "generate_batch", fake)
    prompt = render_prompt(tok, "What is 23 + 58?")
    replies = sample(None, tok, [prompt] * 3, 200, 1.0, seed=5, tools=tool_registry("calculator"), tool_rounds=2)
    result = render_prompt_tool(tok, "81")
    r0 = replies[0]
    assert r0.ids == call + [end] + result + answer + [end]
    assert r0.env == list(range(len(call) + 1, len(call) + 1 + len(result)))  # exactly the tool message
    assert r0.text == "23 + 58 = 81." and r0.calls == 1 and r0.unanswered == 0
    assert replies[1].ids == answer + [end] and replies[1].env == [] and replies[1].calls == 0
    r2 = replies[2]
    assert r2.calls == 3 and r2.unanswered == 1 and len(r2.env) == 2 * len(result)
    # round 2 continued rows 0 and 2 from prompt + reply so far, within the budget left
    assert [len(p) for p in calls[1][0]] == [len(prompt) + len(r0.ids) - len(answer) - 1] * 2
    assert calls[1][1] == [200 - (len(call) + 1 + len(result))] * 2
    row = {"answer": "81"}
    scores = RowRewardScorer(arithmetic)([type("P", (), {"row": row})()] * 3, replies)
    assert scores == [1.0, 1.0, 0.0]  # the reply whose last turn still calls a tool never answered
    # without tools the same first turn is the whole reply: it never answered, it scores 0
    fake, _ = _scripted(tok, turns)
    monkeypatch.setattr(rollout_mod, "generate_batch", fake)
    plain = sample(None, tok, [prompt] * 3, 200, 1.0, seed=5)
    assert plain[0].ids == call + [end] and plain[0].unanswered == 1 and plain[0].env == []
    assert RowRewardScorer(arithmetic)([type("P", (), {"row": row})()], plain[:1]) == [0.0]


def test_tool_results_are_masked_in_the_rollout_batch(world, tok):
    cfg, policy, ref, batches = _batches(world, tok)
    p = batches.prompts
    ro = Rollout(0, [0, 0, 0, 0], [[5, 6, 7, 8, 9]] * 4, ["stop"] * 4, [1] * 4, [1.0, 0.0, 0.0, 0.0],
                 [[0.0] * 3] * 4, [[0.0] * 3] * 4, None, 0.0, env=[[1, 2]] * 4)
    x, y, mask = batches._sequences(ro)
    start = len(p[0].ids) - 1
    assert mask[0, start:start + 5].tolist() == [1, 0, 0, 1, 1] and mask[0].sum() == 3
    with pytest.raises(UserError, match="unknown tool"):
        tool_registry("calculator, nope")
    assert tool_registry("") is None


def test_reference_is_frozen_and_policy_trains(world, tok, tmp_path):
    cfg, policy, ref, batches = _batches(world, tok)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    policy_before = {k: v.clone() for k, v in policy.state_dict().items()}
    train(cfg, policy, batches, GRPOObjective(cfg.rl), tmp_path / "out")
    assert all(not p.requires_grad for p in ref.parameters()) and not ref.training
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # bit-identical
    assert any(not torch.equal(policy_before[k], v) for k, v in policy.state_dict().items())


def test_ppo_rewards_kl_penalty_and_score_at_the_last_token(world, tok):
    cfg, policy, ref, batches = _batches(world, tok, "ppo", ["rl.lam=1.0", "rl.gamma=1.0", "rl.kl_coef=0.5"])
    p = batches.prompts
    # two hand-made rollouts: log-ratios 0.2 per token, values 0, reward-model scores 1 and -1
    ro = Rollout(0, [0, 1], [[40, 41, 7], [42, 7]], ["stop", "stop"], [0, 0], [1.0, -1.0],
                 [[-1.0, -1.0, -1.0], [-2.0, -2.0]], [[-1.2, -1.2, -1.2], [-2.2, -2.2]],
                 [[0.0, 0.0, 0.0], [0.0, 0.0]], 0.0)
    batches.reward_norm = (0.5, 2.0)  # the reference's score mean and std: scores become 0.25 and -0.75
    batches._prepare(ro)
    t = batches.tensors
    on = t["mask"].bool()
    # returns (gamma = lambda = 1, V = 0): the standardised score minus kl_coef * the log-ratios to come
    got = [t["returns"][j][on[j]].tolist() for j in range(2)]
    want = [[0.25 - 0.3, 0.25 - 0.2, 0.25 - 0.1], [-0.75 - 0.2, -0.75 - 0.1]]
    assert all(math.isclose(a, b, abs_tol=1e-6) for g, w in zip(got, want) for a, b in zip(g, w))
    assert len(p[0].ids) - 1 == int(on[0].nonzero()[0])  # the first reply token follows the prompt
    m = batches.metrics()
    assert math.isclose(m["rollout_kl"], 0.2, abs_tol=1e-6) and math.isclose(m["rollout_kl_seq"], 0.5, abs_tol=1e-6)
    assert m["reward"] == 0.0 and math.isclose(m["score_std_minus_kl"], (0.25 - 0.3 - 0.75 - 0.2) / 2, abs_tol=1e-6)
    # advantages are whitened over the batch's reply tokens
    adv = t["adv"][on]
    assert abs(float(adv.mean())) < 1e-5 and math.isclose(float(adv.std(unbiased=False)), 1, abs_tol=1e-3)


def test_policy_value_is_the_gpt_plus_a_head(world):
    gpt = modelio.load_model(world / "chat")
    pv = PolicyValue.from_gpt(gpt)
    x = torch.randint(0, gpt.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        logits, values = pv(x, values=True)
        assert torch.allclose(logits, gpt(x), atol=1e-5) and torch.equal(pv(x), gpt(x))
    assert values.shape == (2, 10) and (values == 0).all()


# --------------------------------------------------------------------------- end to end

def test_grpo_raises_a_toy_reward(world, tmp_path):
    out = tmp_path / "grpo"
    # 24 steps: on some worlds' tokenizers the reward only starts to climb after 16 (0.27 -> 0.41 by 24)
    res = grpo(str(world / "chat"), str(world / "prompts.jsonl"), vowels, str(out),
               overrides=FAST + ["train.max_steps=24"])
    rewards = [r["reward"] for r in read_metrics(out)[::2]]  # one per phase
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    for key in ("reward", "pass_rate", "groups_with_signal", "kl", "entropy", "clip_frac", "response_len",
                "rollout_kl", "truncated"):
        assert key in read_metrics(out)[-1]
    stage = json.loads((out / "stage.json").read_text())
    assert stage["stage"] == "grpo" and stage["chat"] and stage["base"] == str(world / "chat")
    assert res["heldout"]["after"]["n"] == stage["heldout_prompts"] > 0
    modelio.load_model(out)  # a plain model folder


def test_ppo_end_to_end_with_a_stand_in_reward(world, tmp_path):
    out = tmp_path / "ppo"
    ppo(str(world / "chat"), vowels, str(world / "prompts.jsonl"), str(out),
        overrides=FAST + ["train.max_steps=32", "rl.group_size=1", "rl.prompts_per_step=16"])
    rewards = [r["reward"] for r in read_metrics(out)[::4]]  # one per phase (4 epochs of one step each)
    assert len(rewards) == 8 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    last = read_metrics(out)[-1]
    for key in ("reward", "score_std", "rollout_kl", "kl", "entropy", "response_len", "clip_frac", "vf_loss",
                "value_mean"):
        assert key in last and math.isfinite(last[key]), key
    # the folder is a chat model (policy alone); the value head sits beside it
    modelio.load_model(out)
    from safetensors.torch import load_file
    assert set(load_file(str(out / "value_head.safetensors"))) == {"value_head.weight", "value_head.bias"}
    stage = json.loads((out / "stage.json").read_text())
    assert stage["stage"] == "ppo" and len(stage["reward_norm"]) == 2 and stage["reward_norm"][1] > 0


class FakeMember:
    """A stand-in reward model: a fixed function of the reply's text."""

    def __init__(self, fn):
        self.fn = fn

    def to(self, device):
        return self

    def __call__(self, prompts, replies):
        return [self.fn(r.text) for r in replies]


def test_an_ensemble_standardises_each_member_then_combines(tok):
    # member a counts a's, member b rewards x's on a 100x larger scale: raw, b would decide alone
    a, b = FakeMember(lambda t: t.count("a")), FakeMember(lambda t: 100.0 * t.count("x"))
    replies = [Reply([], t, 0, "stop") for t in ("aa", "x", "ax", "")]
    prompts = [None] * len(replies)
    ens = rollout_mod.EnsembleScorer([a, b], "min")
    assert ens(prompts, replies) == [0.0, 0.0, 1.0, 0.0]  # not yet calibrated: the raw minimum
    norms = ens.calibrate(prompts, replies)  # a: mean 0.75, std 0.829; b: mean 50, std 50
    assert norms[1] == [50.0, 50.0] and norms[0][0] == 0.75
    za = [(n - 0.75) / norms[0][1] for n in (2, 0, 1, 0)]
    zb = [-1.0, 1.0, 1.0, -1.0]
    assert ens(prompts, replies) == pytest.approx([min(x, y) for x, y in zip(za, zb)])
    ens.how = "mean"
    assert ens(prompts, replies) == pytest.approx([(x + y) / 2 for x, y in zip(za, zb)])
    # a member that scores everything alike keeps a unit scale (no division by zero)
    flat = rollout_mod.EnsembleScorer([a, FakeMember(lambda t: 3.0)])
    assert flat.calibrate(prompts, replies)[1] == [3.0, 1.0]


def fake_reward_model(d, chat_dir, seed):
    """A reward model folder: the chat model's weights and a random score head (what
    `lmstack reward train` writes, untrained)."""
    from lmstack.model import RewardModel

    net, tok = modelio.load_model_and_tokenizer(chat_dir, kind="chat")
    rm = RewardModel.from_gpt(net)
    torch.manual_seed(seed)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    d.mkdir()
    tok.save(d)
    modelio.save_weights(rm, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(dataclasses.asdict(rm.cfg)))
    (d / "stage.json").write_text(json.dumps({"stage": "reward", "base": str(chat_dir)}))
    return d


def test_ppo_against_an_ensemble_of_reward_models(world, tmp_path, capsys):
    rms = [str(fake_reward_model(tmp_path / f"rm{i}", world / "chat", i)) for i in range(2)]
    out = tmp_path / "ppo"
    over = FAST + ["train.max_steps=4", "rl.group_size=1", "rl.prompts_per_step=8", "train.save_every=2"]
    ppo(str(world / "chat"), rms, str(world / "prompts.jsonl"), str(out), overrides=over)
    stage = json.loads((out / "stage.json").read_text())
    assert stage["reward"] == ",".join(rms) and len(stage["reward_members"]) == 2
    assert all(s > 0 for _, s in stage["reward_members"]) and stage["reward_members"][0] != stage["reward_members"][1]
    assert stage["heldout"]["after"]["n"] > 0 and math.isfinite(read_metrics(out)[-1]["reward"])
    # resumed, the members keep the scales they were calibrated with
    ppo(str(world / "chat"), rms, str(world / "prompts.jsonl"), str(out), overrides=over + ["train.max_steps=6"],
        resume=True)
    again = json.loads((out / "stage.json").read_text())
    assert again["reward_members"] == stage["reward_members"] and again["reward_norm"] == stage["reward_norm"]
    # the command line takes several folders; GRPO and plain files are refused in one line
    rc = cli_main(["ppo", "--policy", str(world / "chat"), "--reward", rms[0], "vowels", "--prompts",
                   str(world / "prompts.jsonl"), "--out", str(tmp_path / "never")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "ensemble is of reward model folders" in err
    with pytest.raises(UserError, match="ensemble of reward models is for PPO"):
        grpo(str(world / "chat"), str(world / "prompts.jsonl"), rms, str(tmp_path / "never"))
    with pytest.raises(UserError, match="rl.ensemble"):
        ppo(str(world / "chat"), rms, str(world / "prompts.jsonl"), str(tmp_path / "never"),
            overrides=["rl.ensemble=max"])
    assert not (tmp_path / "never").exists()


def sft_val_loss(model_dir, tok, docs):
    """The mean next-token loss of a model folder on packed SFT conversations (assistant tokens)."""
    from lmstack.train.sft import iter_val_batches, packed_loss

    net = modelio.load_model(model_dir).eval()
    with torch.no_grad():
        sums = [packed_loss(net, b) for b in iter_val_batches(docs, 8, 64, tok.pad_id, 100)]
    return float(sum(s for s, _ in sums) / sum(n for _, n in sums))


def test_ppo_ptx_mixes_the_sft_loss_into_each_micro_batch(world, tok, tmp_path, capsys):
    from lmstack.train.sft import load_docs, packed_loss

    # the policy records its SFT data (sft.json), as a folder `lmstack sft` wrote does
    policy = tmp_path / "chat"
    import shutil
    shutil.copytree(world / "chat", policy)
    sft_file = world / "world" / "sft.jsonl"
    (policy / "sft.json").write_text(json.dumps({"base": None, "data": [str(sft_file)]}))
    over = FAST + ["train.max_steps=12", "rl.group_size=1", "rl.prompts_per_step=16", "train.seq_len=64"]
    docs, _ = load_docs([sft_file], tok, 65)
    assert len(docs) > 50
    runs = {}
    for coef in (0, 2):
        out = tmp_path / f"ppo{coef}"
        ppo(str(policy), vowels, str(world / "prompts.jsonl"), str(out), overrides=over + [f"rl.ptx_coef={coef}"])
        runs[coef] = sft_val_loss(out, tok, docs)
    stage = json.loads((tmp_path / "ppo2" / "stage.json").read_text())
    assert stage["ptx_data"] == [str(sft_file)] and stage["ptx_coef"] == 2
    assert "ptx_data" not in json.loads((tmp_path / "ppo0" / "stage.json").read_text())
    metrics = read_metrics(tmp_path / "ppo2")
    assert all(math.isfinite(r["ptx_loss"]) for r in metrics) and metrics[-1]["ptx_loss"] < metrics[0]["ptx_loss"]
    assert "ptx_loss" not in read_metrics(tmp_path / "ppo0")[-1]
    # the SFT loss keeps the policy on its conversations: lower than where it started, and than PPO alone
    start = sft_val_loss(policy, tok, docs)
    assert runs[2] < start - 0.5 and runs[2] < runs[0] - 0.5, (start, runs)
    assert "ptx: " in capsys.readouterr().out

    # the term itself: the objective's sum + coef x the mean SFT loss x this micro-batch's reply tokens
    cfg, pv, _, batches = _batches(world, tok, "ppo", ["rl.ptx_coef=0.5", "train.seq_len=64"])
    from lmstack.align.rl import PPOObjective, ptx_batches
    batches.ptx = ptx_batches(cfg, docs, tok.pad_id, 0, 1)
    batch = batches.next()
    assert len(batch) == 12
    torch.manual_seed(0)
    with torch.no_grad():
        plain, n, _ = PPOObjective(cfg.rl)(pv, batch[:8])
        mixed, n2, extras = PPOObjective(cfg.rl)(pv, batch)
        s, c = packed_loss(pv, batch[8:])
    assert n == n2 and torch.allclose(mixed, plain + 0.5 * s / c * n, rtol=1e-5)
    assert torch.allclose(extras["ptx_loss"], s / c * n)

    # errors, one line each, before any work
    for over_bad, folder, match in [
            (["rl.ptx_coef=1"], world / "chat", "records no SFT data"),
            (["rl.ptx_coef=1", "rl.ptx_data=nope.jsonl"], policy, "nope.jsonl not found"),
            (["rl.ptx_coef=-1"], policy, "rl.ptx_coef")]:
        with pytest.raises(UserError, match=match):
            ppo(str(folder), vowels, str(world / "prompts.jsonl"), str(tmp_path / "never"), overrides=FAST + over_bad)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "Tell me everything."},
                                             {"role": "assistant", "content": " ".join(["word"] * 100)}]}) + "\n")
    with pytest.raises(UserError, match="no usable conversations of at most 33 tokens"):
        ppo(str(policy), vowels, str(world / "prompts.jsonl"), str(tmp_path / "never"),
            overrides=FAST + ["rl.ptx_coef=1", f"rl.ptx_data={long}"])
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("ptx", [False, True], ids=["plain", "ptx"])
def test_exact_resume_inside_a_phase(world, tmp_path, monkeypatch, ptx):
    # 16 rollouts per phase, 2 micro-batches per step, 2 epochs: 2 steps (4 micro-batches) per phase.
    over = FAST + ["train.save_every=3", "train.max_steps=6"]
    if ptx:  # the SFT windows mixed in resume where they were, too
        over += ["rl.ptx_coef=0.5", f"rl.ptx_data={world / 'world' / 'sft.jsonl'}", "train.seq_len=64"]
    args = (str(world / "chat"), str(world / "prompts.jsonl"), vowels)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    grpo(*args, str(straight), overrides=over)
    with monkeypatch.context() as mp:
        mp.setattr(rl_mod, "RolloutBatches", Interrupt(RolloutBatches, at=9))  # inside step 5
        with pytest.raises(KeyboardInterrupt):
            grpo(*args, str(resumed), overrides=over)
    assert [p.name for p in checkpoint.checkpoints(resumed)] == ["step_00000003", "step_00000004"]
    state = json.loads((checkpoint.checkpoints(resumed)[0] / "trainer.json").read_text())["data"]
    assert state["pos"] == 2 and state["rollout"]["phase"] == 1  # step 3 is the middle of phase 1
    # resume from step 3 (inside a phase): its rollouts come from the checkpoint
    import shutil
    shutil.rmtree(checkpoint.checkpoints(resumed)[1])
    grpo(*args, str(resumed), overrides=over, resume=True)
    keys = ["step", "loss", "lr", "grad_norm", "reward", "kl", "clip_frac", "entropy", "rollout_kl", "phase",
            "ptx_loss"]
    a, b = read_metrics(straight), read_metrics(resumed)
    assert len(a) == 6 and [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    with pytest.raises(UserError, match="other prompts, reward"):
        grpo(str(world / "chat"), str(world / "prompts.jsonl"), arithmetic, str(resumed), overrides=over, resume=True)
    if ptx:  # nor without the SFT data it started with
        with pytest.raises(UserError, match=r"ptx_data differ"):
            grpo(*args, str(resumed), overrides=over + ["rl.ptx_coef=0"], resume=True)
