"""What a model and a run cost, told honestly: the parameter count of a model packed for CPU
inference (its Linear weights are no Parameters then) and the training time estimate the loop
prints after its first steps."""

import builtins

import pytest
import torch

from lmstack.chat import chat
from lmstack.config import ModelConfig, RunConfig, TrainConfig
from lmstack.engine import PackedLinear, for_inference
from lmstack.model import GPT, RewardModel
from lmstack.train import loop
from lmstack.train.objectives import next_token_loss
from tiny import random_gpt, save_model_dir, tokenizer_on  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_thread")

needs_packing = pytest.mark.skipif(not PackedLinear.supported("cpu", torch.float32),
                                   reason="this CPU's torch has no oneDNN packed linear")


def packed_count(model):
    return sum(isinstance(m, PackedLinear) for m in model.modules())


@needs_packing
@pytest.mark.parametrize("cls", [GPT, RewardModel])
@pytest.mark.parametrize("tie", [True, False])
def test_a_packed_model_counts_the_parameters_it_had(cls, tie):
    model = cls(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64,
                            tie_embeddings=tie))
    before = model.num_params(), model.num_params(include_embeddings=False)
    assert before[0] == sum(p.numel() for p in model.parameters())
    packed = for_inference(model, "fp32", pack=True)
    # every Linear is packed: 4 per layer once fused (qkv, o, gate_up, down), the head (and the
    # reward model's score head)
    assert packed_count(packed) == 2 * 4 + 1 + (cls is RewardModel)
    assert sum(p.numel() for p in packed.parameters()) < before[1]  # what the count used to be
    assert (packed.num_params(), packed.num_params(include_embeddings=False)) == before


@needs_packing
def test_chat_banner_counts_a_packed_model(tmp_path, monkeypatch, capsys):
    """`lmstack chat` packs the model on a CPU; its banner still says how big the model is."""
    tok = tokenizer_on(tmp_path, "hello there, how are you? fine, thanks.\n" * 40)
    model = random_gpt(tok, n_layer=2, n_head=4, d_model=256, ffn_hidden=512, max_seq_len=64)
    want = model.num_params()  # 1.4M, of which 77k (embeddings, norms) are Parameters once packed
    save_model_dir(tmp_path, model, tok)

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    monkeypatch.setattr(PackedLinear, "supported", staticmethod(lambda device, dtype=None: True))  # pack, whatever the dtype
    assert chat(str(tmp_path), dtype="fp32", tools=False) == 0
    assert f"({want / 1e6:.1f}M parameters" in capsys.readouterr().out


def test_duration_and_estimate_arithmetic():
    assert [loop.duration(s) for s in (40, 719, 3600, 18_720, 2 * 86_400)] == \
        ["40 s", "12 min", "1 h", "5 h 12 min", "48 h"]
    # the default SFT preset's shape: 150 steps of 8,192 tokens, 3 done, 12.5 s a step
    tok_s, left, line = loop.estimate(12.5, 147, 8192)
    assert tok_s == 8192 / 12.5 and left == 147 * 12.5
    assert line == "train: ~655 tok/s -> about 31 min for the remaining 147 steps (1,204,224 tokens)"


class RandomTokens:
    """A batch source of random tokens whose state is a step counter."""

    def __init__(self, vocab, batch, seq):
        self.vocab, self.batch, self.seq, self.step = vocab, batch, seq, 0

    def next(self):
        g = torch.Generator().manual_seed(self.step)
        self.step += 1
        x = torch.randint(self.vocab, (self.batch, self.seq + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def tiny_run(tmp_path, steps):
    cfg = RunConfig(model=ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=16, ffn_hidden=32, max_seq_len=16),
                    train=TrainConfig(max_steps=steps, batch_tokens=32, micro_batch_size=2, seq_len=16,
                                      dtype="fp32", device="cpu", save_every=0))
    cfg.validate()
    torch.manual_seed(0)
    loop.train(cfg, GPT(cfg.model), RandomTokens(64, 2, 16), next_token_loss, tmp_path / "out")


class StepClock:
    """The loop's clock (its only use of `time`), every reading `tick` seconds after the last: a
    step "takes" about 2 x tick, whatever the machine's speed, so what is printed does not depend on it."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def test_the_loop_prints_its_estimate_once_when_the_run_is_long(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "time", StepClock(tick=1000.0))  # 4 steps left of ~1,000 s: "long"
    tiny_run(tmp_path, steps=8)
    lines = [s for s in capsys.readouterr().out.splitlines() if "tok/s ->" in s]
    # after step 4 (steps 2-4 timed; the first is warm-up): 4 steps of 32 tokens left
    assert len(lines) == 1 and lines[0].startswith("train: ~")
    assert lines[0].endswith("for the remaining 4 steps (128 tokens)")


def test_a_short_run_prints_no_estimate(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "time", StepClock(tick=1.0))  # 4 steps left of ~1 s: well under the bar
    tiny_run(tmp_path, steps=8)
    assert "tok/s ->" not in capsys.readouterr().out
