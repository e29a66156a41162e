"""DDP on CPU (gloo) through the real CLI under torchrun: 2 ranks give the same losses as one
process at the same global batch, and a run saved by 2 ranks resumes on 1 process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack import distributed
from lmstack.train.pretrain import pretrain
from test_train import make_data, read_metrics

pytestmark = pytest.mark.usefixtures("two_threads")

# Constant lr after warmup (min_lr_ratio=1): a 4-step run is then exactly the first half of
# an 8-step run, so "2 ranks for 4 steps + resume on 1 process to 8" has a reference.
COMMON = ["train.batch_tokens=512", "train.seq_len=64", "train.eval_every=4", "train.eval_batches=2",
          "train.save_every=4", "optim.min_lr_ratio=1.0", "optim.warmup_steps=2"]


@pytest.mark.slow
def test_ddp_matches_single_process_and_resumes_on_one(tmp_path):
    data = make_data(tmp_path / "corpus")
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # One process: 8 windows per micro-batch, no accumulation.
    pretrain("tiny", str(data), str(single), overrides=COMMON + ["train.max_steps=8", "train.micro_batch_size=8"])

    # Two ranks of 4 windows: the same global batch (TokenBatches gives rank r rows r*4..r*4+3).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "lmstack", "pretrain", "--data", str(data), "--out", str(ddp)]
    for s in COMMON + ["train.max_steps=4", "train.micro_batch_size=4"]:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train: ") == 1  # rank 0 alone logs
    assert json.loads((ddp / "state/step_00000004/trainer.json").read_text())["world_size"] == 2

    a, b = read_metrics(single), read_metrics(ddp)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a[:4], b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    assert b[3]["val_loss"] == pytest.approx(a[3]["val_loss"], rel=1e-4)

    # Resume the 2-rank run on one process (8 windows per micro-batch again) to step 8.
    pretrain("tiny", str(data), str(ddp), overrides=COMMON + ["train.max_steps=8", "train.micro_batch_size=8"],
             resume=True)
    b = read_metrics(ddp)
    assert [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    wa, wb = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)


def test_single_process_helpers_are_noops():
    info = distributed.info()
    assert info.world_size == 1 and distributed.is_main() and not distributed.is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_sum(t), torch.tensor([1.0, 2.0]))
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    with distributed.no_sync(model, skip=True):
        pass
    distributed.barrier()
