"""FSDP2, activation checkpointing and multi-node on CPU (gloo), through the real CLI under
torchrun: 2 sharded ranks give the losses of one process at the same global batch, step by step;
a sharded checkpoint written by 2 ranks resumes on 1 process and one written by 1 process
resumes on 2; two "nodes" of one rank each meet through the c10d rendezvous on loopback.

The reference is one process of 4 windows per micro-batch with 2 micro-batches per step; 2
ranks of 2 windows see the same windows (TokenBatches gives rank r rows r*2..r*2+1 of each
micro-step's global draw), and accumulate 2 micro-batches too, so FSDP's gradient sync on the
last micro-step only (set_requires_gradient_sync) is exercised."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack import distributed
from lmstack.model import GPT
from lmstack.config import ModelConfig
from lmstack.train.pretrain import pretrain
from test_train import make_data, read_metrics

pytestmark = pytest.mark.usefixtures("two_threads")

ROOT = Path(__file__).parents[1]
# Constant lr after warmup (min_lr_ratio=1): a 4-step run is exactly the first half of an
# 8-step run, so "4 steps, then resume to 8" has the 8-step run as its reference.
COMMON = ["train.batch_tokens=512", "train.seq_len=64", "train.eval_every=4", "train.eval_batches=2",
          "train.save_every=4", "optim.min_lr_ratio=1.0", "optim.warmup_steps=2"]
ONE = ["train.micro_batch_size=4"]  # one process: 2 micro-batches of 4 windows per step
TWO = ["train.micro_batch_size=2", "train.parallel=fsdp"]  # each of 2 ranks: 2 micro-batches of 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("fsdp") / "corpus")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """8 steps in one process, plain (no FSDP, no checkpointing of activations)."""
    out = tmp_path_factory.mktemp("fsdp") / "single"
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + ["train.max_steps=8"])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lmstack_cmd(launcher: list[str], data, out, sets, resume=False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher,
           "-m", "lmstack", "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}


def torchrun(data, out, sets, resume=False, nproc=2):
    cmd = lmstack_cmd([f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=fsdp-test"], data, out, sets, resume)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def assert_same_losses(ref, run, steps, rel=1e-5):
    a, b = read_metrics(ref), read_metrics(run)
    assert [x["step"] for x in b] == list(steps)
    for x, y in zip(a[steps[0] - 1:], b):
        assert y["loss"] == pytest.approx(x["loss"], rel=rel), y["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4), y["step"]


def assert_same_weights(ref, run):
    wa, wb = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert sorted(wa) == sorted(wb)  # the whole, unsharded model, under the model's own names
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_and_resume_on_one(data, reference, tmp_path):
    out = tmp_path / "fsdp"
    # FSDP with activation checkpointing: the composition, not FSDP alone.
    r = torchrun(data, out, COMMON + TWO + ["train.max_steps=4", "train.activation_checkpointing=true"])
    assert r.stdout.count("train: ") == 1  # rank 0 alone logs
    ckpt = out / "state/step_00000004"
    assert json.loads((ckpt / "trainer.json").read_text())["world_size"] == 2
    # Sharded: each rank's shards and DCP's metadata, no optimizer.pt; the weights file is whole.
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "optimizer.pt").exists() and not list((out / "state").glob(".*"))
    assert_same_losses(reference, out, range(1, 5))
    assert read_metrics(out)[3]["val_loss"] == pytest.approx(read_metrics(reference)[3]["val_loss"], rel=1e-5)
    torch.testing.assert_close(load_file(out / "model.safetensors"), load_file(ckpt / "model.safetensors"))

    # The 2 ranks' sharded checkpoint resumes in one process, and goes on as the straight run.
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + ["train.max_steps=8", "train.parallel=fsdp"],
             resume=True)
    assert_same_losses(reference, out, range(1, 9))
    assert_same_weights(reference, out)


@pytest.mark.slow
def test_one_process_sharded_checkpoint_resumes_on_two(data, reference, tmp_path):
    out = tmp_path / "grow"
    # One process with train.parallel=fsdp writes the sharded format (one shard)...
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + ["train.max_steps=4", "train.parallel=fsdp"])
    assert (out / "state/step_00000004/sharded/.metadata").is_file()
    # ...which 2 ranks load, each taking its half.
    torchrun(data, out, COMMON + TWO + ["train.max_steps=8"], resume=True)
    assert_same_losses(reference, out, range(1, 9))
    assert_same_weights(reference, out)
    assert json.loads((out / "state/step_00000008/trainer.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_a_setting_given_on_resume_wins_over_a_sharded_checkpoint(data, tmp_path, monkeypatch):
    """As for a whole-model checkpoint (tests/test_train.py): the moments load, this run's weight decay stays."""
    import lmstack.train.checkpoint as checkpoint

    out, seen, load = tmp_path / "wd", {}, checkpoint.load_checkpoint
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + ["train.max_steps=4", "train.parallel=fsdp"])

    def spy(path, model, optimizer=None):
        state = load(path, model, optimizer)
        seen["weight_decay"] = [g["weight_decay"] for g in optimizer.param_groups]
        return state

    monkeypatch.setattr(checkpoint, "load_checkpoint", spy)
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + ["train.max_steps=6", "train.parallel=fsdp",
                                                                   "optim.weight_decay=0.05"], resume=True)
    assert seen["weight_decay"] == [0.05, 0.0]


@pytest.mark.slow
def test_a_ddp_checkpoint_is_not_resumed_sharded(data, reference, tmp_path):
    """A checkpoint of the whole model (one process or DDP) resumed by 2 FSDP ranks: one line from
    each rank, nothing changed in the run's folder."""
    out = tmp_path / "plain"
    shutil.copytree(reference, out)
    before = (out / "metrics.jsonl").read_text()
    cmd = lmstack_cmd(["--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                       "--rdzv-id=refuse-test"], data, out, COMMON + TWO + ["train.max_steps=10"], resume=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0
    assert r.stderr.count("is not sharded (written with train.parallel=ddp): resume it with train.parallel=ddp") == 2
    assert str(ROOT / "lmstack") not in r.stderr  # no traceback from lmstack (torchrun prints its own report)
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_two_nodes_on_loopback_through_c10d_rendezvous(data, reference, tmp_path):
    """2 "nodes" x 1 rank: two torchrun agents that find each other through the c10d rendezvous,
    as on a cluster (README: "Across nodes")."""
    out, port = tmp_path / "nodes", free_port()
    procs = []
    for node in range(2):
        cmd = lmstack_cmd(["--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback-test"],
                          data, out, COMMON + ["train.micro_batch_size=2", "train.parallel=fsdp", "train.max_steps=4"])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (o, e) in zip(procs, outputs):
        assert p.returncode == 0, o[-2000:] + e[-3000:]
    # One rank 0 between the two nodes logs, and says it trains on 2 ranks.
    assert sum(o.count("train: ") for o, _ in outputs) == 1
    assert "2 x cpu" in "".join(o for o, _ in outputs)
    assert_same_losses(reference, out, range(1, 5))


@pytest.mark.slow
def test_sigterm_under_fsdp_saves_on_every_rank_and_resumes(data, reference, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption) reaches every rank at a different moment; they
    stop together at the end of a step, write one sharded checkpoint, and the run resumes from it."""
    out = tmp_path / "preempted"
    cmd = lmstack_cmd(["--nproc_per_node=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                       "--rdzv-id=sigterm-test"], data, out,
                      COMMON + TWO + ["train.max_steps=400", "train.save_every=0", "train.eval_every=0"])
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=90)
    assert p.returncode != 0
    saved = sorted((out / "state").glob("step_*"))
    assert len(saved) == 1, err[-3000:]
    step = int(saved[0].name[5:])
    assert 3 <= step < 400 and (saved[0] / "sharded/.metadata").is_file()
    assert (saved[0] / "sharded/__1_0.distcp").is_file()  # both ranks wrote their shards
    assert f"interrupted at step {step}" in err
    pretrain("tiny", str(data), str(out), resume=True,
             overrides=COMMON + ONE + [f"train.max_steps={step + 2}", "train.save_every=0", "train.eval_every=0"])
    m, ref = read_metrics(out), read_metrics(reference)
    assert [x["step"] for x in m] == list(range(1, step + 3))
    # The steps both runs took are the same steps (the same data, the same constant lr after warmup).
    for x, y in zip(ref, m):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), y["step"]


@pytest.mark.slow
def test_fsdp_bf16_mixed_precision_follows_fp32(data, reference, tmp_path):
    """train.dtype=bf16 under FSDP: bf16 compute copies of the parameters (MixedPrecisionPolicy),
    gradients reduced in fp32, fp32 master shards. Close to the fp32 run, and not equal to it (so
    the bf16 path did run); gloo on CPU, where the machine has no GPU."""
    out = tmp_path / "bf16"
    torchrun(data, out, COMMON + TWO + ["train.max_steps=4", "train.dtype=bf16"])
    a, b = read_metrics(reference)[:4], read_metrics(out)
    assert [x["step"] for x in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3)
    assert any(x["loss"] != y["loss"] for x, y in zip(a, b))
    assert all(v.dtype == torch.float32 for v in load_file(out / "model.safetensors").values())


def test_activation_checkpointing_changes_no_number(data, reference, tmp_path):
    """Recomputing each block's activations in backward gives the same gradients."""
    out = tmp_path / "ac"
    pretrain("tiny", str(data), str(out),
             overrides=COMMON + ONE + ["train.max_steps=4", "train.activation_checkpointing=true"])
    assert_same_losses(reference, out, range(1, 5), rel=1e-6)
    # The weights file keeps the model's own names (no wrapper prefix).
    assert sorted(load_file(out / "model.safetensors")) == sorted(load_file(reference / "model.safetensors"))


def test_parallelize_in_one_process():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16))
    names = sorted(model.state_dict())
    # FSDP needs a process group: in one process "fsdp" shards nothing.
    fwd, train = distributed.parallelize(model, "fsdp")
    assert fwd is model and train is model and not distributed.is_sharded(model)
    fwd, train = distributed.parallelize(model, "fsdp", activation_checkpointing=True)
    assert fwd is model and sorted(model.state_dict()) == names
    assert type(model.layers[0]).__name__ == "CheckpointWrapper"
    x = torch.randint(0, 50, (2, 8))
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = distributed.clip_grad_norm_(model.parameters(), 0.5)
    assert float(norm) == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()), rel=1e-5)
    after = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(after) == pytest.approx(0.5, rel=1e-4)


def test_slurm_script_parses():
    script = ROOT / "scripts/slurm/pretrain.sbatch"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "--rdzv-backend=c10d" in text and "-m lmstack pretrain --preset gpt2" in text


SRUN = """#!/bin/bash
# srun's stand-in: its own options skipped, the command started once per node, all waited for.
while [[ $1 == --* ]]; do shift; done
pids=()
for _ in $(seq 1 "$SLURM_JOB_NUM_NODES"); do "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""
SCONTROL = """#!/bin/bash
# `scontrol show hostnames LIST`: the allocation's nodes, one a line (the first is loopback here).
printf '127.0.0.1\nnode-2\n'
"""


@pytest.mark.slow
def test_slurm_script_trains_on_two_nodes(data, tmp_path):
    """The sbatch script itself, run as Slurm would on 2 nodes, with srun and scontrol stood in for:
    two torchrun agents meet at the first node's rendezvous and train (the gpt2 preset shrunk by
    --set to a CPU-sized model)."""
    bin_dir, out = tmp_path / "bin", tmp_path / "slurm_run"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node-[1-2]", "SLURM_JOB_ID": f"test{os.getpid()}", "GPUS_PER_NODE": "1",
           "RDZV_PORT": str(free_port()), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    small = ["model.n_layer=2", "model.n_head=4", "model.d_model=64", "model.max_seq_len=64", "train.seq_len=64",
             "train.micro_batch_size=2", "train.batch_tokens=256", "train.max_steps=2", "train.compile=false",
             "train.dtype=fp32", "train.device=cpu", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1"]
    args = [str(data), str(out)] + [x for s in small for x in ("--set", s)]
    r = subprocess.run(["bash", str(ROOT / "scripts/slurm/pretrain.sbatch"), *args], capture_output=True, text=True,
                       env=env, timeout=150)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "2 x cpu" in r.stdout and r.stdout.count("train: ") == 1
    assert [x["step"] for x in read_metrics(out)] == [1, 2]
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["parallel"] == "fsdp" and run["model"]["n_layer"] == 2
    assert (out / "state/step_00000002/sharded/.metadata").is_file() and (out / "model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_activation_checkpointing_and_compile(data, tmp_path):
    """One GPU: bf16 autocast, activation checkpointing and per-block compile together train."""
    out = tmp_path / "gpu"
    pretrain("tiny", str(data), str(out), overrides=COMMON + ONE + [
        "train.max_steps=8", "train.device=cuda", "train.dtype=bf16", "train.activation_checkpointing=true",
        "train.compile=true"])
    m = read_metrics(out)
    assert m[-1]["loss"] < m[0]["loss"] and all(torch.isfinite(torch.tensor(x["loss"])) for x in m)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_fsdp_bf16_mixed_precision_two_ranks(data, reference, tmp_path):
    """NCCL, 2 GPUs: FSDP with bf16 parameters and fp32 reductions follows the fp32 run closely."""
    out = tmp_path / "fsdp_gpu"
    torchrun(data, out, COMMON + TWO + ["train.max_steps=8", "train.device=cuda", "train.dtype=bf16"])
    a, b = read_metrics(reference), read_metrics(out)
    assert len(b) == 8
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2)
