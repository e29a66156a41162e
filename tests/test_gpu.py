"""The GPU paths: bf16 autocast with fused AdamW and torch.compile in THE training loop, the
training attention on SDPA's flash kernel, and the engine's decode on CUDA agreeing with the CPU.
Every test here is marked `gpu` (tests/conftest.py skips them without CUDA); CI has no GPU, so
they run where one is (`pytest -m gpu`)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmstack import engine
from lmstack.config import ModelConfig
from lmstack.model import GPT
from lmstack.train.pretrain import pretrain
from test_train import make_data, read_metrics  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("compile", [False, True])
def test_pretrain_bf16_on_gpu(data_dir, tmp_path, compile):
    out = tmp_path / "run"
    pretrain("tiny", str(data_dir), str(out), overrides=[
        "train.device=cuda", "train.dtype=bf16", f"train.compile={str(compile).lower()}",
        "train.max_steps=30", "train.eval_every=30"])
    m = read_metrics(out)
    assert all(math.isfinite(r["loss"]) for r in m)
    assert m[-1]["loss"] < 0.6 * m[0]["loss"]
    assert 0 < m[-1]["mfu"] < 1  # the GPU's datasheet peak is known (lmstack.device.GPU_PEAK_FLOPS)


def test_training_attention_runs_on_the_flash_kernel():
    """The training path calls SDPA with is_causal and no mask, which flash attention takes:
    restricted to that one backend, a forward and backward in bf16 must run (a mask would
    make SDPA refuse)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=128)).cuda()
    x = torch.randint(0, 256, (2, 128), device="cuda")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item()) and model.embed_tokens.weight.grad is not None


def test_engine_decodes_on_gpu_as_on_cpu():
    torch.manual_seed(0)
    cpu = GPT(ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=128))
    gpu = GPT(ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=128))
    gpu.load_state_dict(cpu.state_dict())
    cpu, gpu = engine.for_inference(cpu, "fp32"), engine.for_inference(gpu.cuda(), "fp32")
    prompt = [1, 5, 9, 17, 33]
    a = engine.generate(cpu, prompt, max_tokens=12, temperature=0)
    b = engine.generate(gpu, prompt, max_tokens=12, temperature=0)
    assert a == b
    bf16 = engine.generate(engine.for_inference(gpu, "bf16"), prompt, max_tokens=12, temperature=0)
    assert len(bf16) == 12
