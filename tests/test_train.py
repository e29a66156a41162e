"""Training: the loss falls, resume is bit-identical, accumulation does not change the update,
checkpoints are atomic, and bad input through the real CLI is one clear line."""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lmstack.config import OptimConfig, load_config
from lmstack.data import TokenBatches, prepare
from lmstack.device import pick_device
from lmstack.model import GPT, RewardModel
from lmstack.tokenizer import train_tokenizer
from lmstack import modelio
from lmstack.train import checkpoint
from lmstack.train.loop import lr_at, train
from lmstack.chat import sample
from lmstack.data import target_bytes
from lmstack.train.objectives import next_token_loss
from lmstack.train.pretrain import pretrain
from lmstack.utils import UserError
from tiny import Interrupt, run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("two_threads")

# Small, fast runs of the tiny preset (the preset itself is for smoke runs).
FAST = ["train.max_steps=12", "train.batch_tokens=1024", "train.micro_batch_size=8",
        "train.seq_len=64", "train.eval_every=6", "train.eval_batches=2", "train.save_every=4",
        "train.keep_last=2"]


def make_data(root, n_docs=1500, seed=0):
    """A small templated corpus -> the real tokenizer -> the real data folder."""
    rng = random.Random(seed)
    first = ["Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
    last = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Evans", "Thomas", "Roberts"]
    cities = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon"]
    jobs = ["a baker", "a teacher", "an engineer", "a doctor", "a painter", "a pilot"]
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as f:
        for _ in range(n_docs):
            p, c, y = f"{rng.choice(first)} {rng.choice(last)}", rng.choice(cities), rng.randint(1900, 2000)
            sents = [f"{p} was born in {c} in {y}.", f"{p} works as {rng.choice(jobs)}.",
                     f"{p} lives in {rng.choice(cities)}.", f"In {y + 20}, {p} moved to {rng.choice(cities)}."]
            rng.shuffle(sents)
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")
    train_tokenizer([str(corpus)], vocab_size=400, out=root / "tok", progress=False)
    prepare([str(corpus)], tokenizer=root / "tok", out=root / "data", val_fraction=0.05, workers=1,
            progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("corpus"))


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_model_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    last = pretrain("tiny", str(data_dir), str(out), overrides=["train.max_steps=30"])
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, 31))
    assert m[0]["loss"] > 5.0  # ~ln(400) at init
    assert m[-1]["loss"] < 0.6 * m[0]["loss"]
    assert last["val_loss"] < 0.6 * m[0]["loss"] and 0 < last["val_bpb"] < 2
    # in-context copying is measured with each validation (the measure of lmstack eval's copy task)
    assert [r["step"] for r in m if "copy" in r] == [r["step"] for r in m if "val_loss" in r]
    assert 0 < last["copy"] < 3
    # and so is Olsson et al.'s in-context learning score (lmstack eval's icl task)
    assert [r["step"] for r in m if "icl" in r] == [r["step"] for r in m if "val_loss" in r]
    assert -5 < last["icl"] < 5
    for k in ["lr", "grad_norm", "tokens", "tok_per_s", "mfu"]:
        assert k in m[-1]
    for f in ["model.safetensors", "config.json", "tokenizer.json", "run.json", "metrics.jsonl"]:
        assert (out / f).is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["vocab_size"] == 400 and run["train"]["max_steps"] == 30
    assert load_config("tiny", ["train.max_steps=30"], vocab_size=400).to_dict()["model"] == run["model"]
    # the model folder samples
    capsys.readouterr()
    texts = sample(str(out), prompt="Alice Smith was born in", max_tokens=12, temperature=0)
    assert texts[0].startswith("Alice Smith was born in") and capsys.readouterr().out.strip()


def test_exact_resume_after_interrupt(data_dir, tmp_path, monkeypatch, capsys):
    import lmstack.train.pretrain as pt

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain("tiny", str(data_dir), str(straight), overrides=FAST)
    # 2 micro-batches per step: micro-batch 15 is the middle of step 8, so Ctrl-C lands
    # after 7 completed steps, with half a step of gradients accumulated (to be discarded).
    with monkeypatch.context() as mp:
        mp.setattr(pt, "TokenBatches", Interrupt(pt.TokenBatches, at=15))
        with pytest.raises(KeyboardInterrupt):
            pretrain("tiny", str(data_dir), str(resumed), overrides=FAST)
    assert "interrupted at step 7; step_00000007 is saved" in capsys.readouterr().err
    assert [p.name for p in checkpoint.checkpoints(resumed)] == ["step_00000004", "step_00000007"]
    assert len(read_metrics(resumed)) == 7
    pretrain("tiny", str(data_dir), str(resumed), overrides=FAST, resume=True)

    a, b = read_metrics(straight), read_metrics(resumed)
    keys = ["step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_bpb"]
    assert [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = torch.load(straight / "state/step_00000012/optimizer.pt", weights_only=True)
    ob = torch.load(resumed / "state/step_00000012/optimizer.pt", weights_only=True)
    for i, s in oa["state"].items():
        assert all(torch.equal(s[k], ob["state"][i][k]) for k in s)
    # keep_last=2: only the two newest checkpoints remain
    assert [p.name for p in checkpoint.checkpoints(straight)] == ["step_00000008", "step_00000012"]
    # a finished run resumed again has nothing to do
    pretrain("tiny", str(data_dir), str(resumed), overrides=FAST, resume=True)
    assert len(read_metrics(resumed)) == 12


def test_muon_takes_the_blocks_matrices_learns_and_resumes_exactly(data_dir, tmp_path, monkeypatch, capsys):
    import lmstack.train.pretrain as pt
    from lmstack.train.loop import build_optimizer

    for tie, kind in ((True, GPT), (False, GPT), (True, RewardModel)):
        cfg = load_config("tiny", ["optim.optimizer=muon", f"model.tie_embeddings={str(tie).lower()}"], vocab_size=400)
        model = kind(cfg.model)
        opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
        muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
        adamw = [id(p) for g in opt.adamw.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        # every parameter in exactly one optimizer; Muon has the blocks' matrices and nothing else
        assert len(muon) + len(adamw) == len(names) and muon | set(adamw) == set(names)
        assert {names[i] for i in muon} == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
        # the schedule's learning rate reaches both, Muon's times optim.muon_lr_scale
        assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)
        assert [g["ns_steps"] for g in opt.muon.param_groups] == [5]
    # optim.muon_ns_steps: fewer Newton-Schulz iterations, a different (less orthogonal) update
    cfg3 = load_config("tiny", ["optim.optimizer=muon", "optim.muon_ns_steps=3"], vocab_size=400)
    assert [g["ns_steps"] for g in build_optimizer(GPT(cfg3.model), cfg3.optim, torch.device("cpu")).muon.param_groups] == [3]
    cfg = load_config("tiny", ["optim.optimizer=muon", "optim.muon_lr_scale=4", "train.max_steps=2",
                               "train.batch_tokens=1024", "train.eval_every=0", "optim.warmup_steps=0"], vocab_size=400)
    model = GPT(cfg.model)
    train(cfg, model, Chunks(data_dir, 16), next_token_loss, tmp_path / "scaled")
    opt = torch.load(tmp_path / "scaled/state/step_00000002/optimizer.pt", weights_only=True)
    assert [g["lr"] for g in opt["muon"]["param_groups"]] == pytest.approx([4 * lr_at(1, cfg.optim, 2)])
    assert [g["lr"] for g in opt["adamw"]["param_groups"]] == pytest.approx([lr_at(1, cfg.optim, 2)] * 2)

    fast = FAST + ["optim.optimizer=muon"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain("tiny", str(data_dir), str(straight), overrides=fast)
    m = read_metrics(straight)
    assert m[-1]["loss"] < 0.8 * m[0]["loss"]
    with monkeypatch.context() as mp:
        mp.setattr(pt, "TokenBatches", Interrupt(pt.TokenBatches, at=15))
        with pytest.raises(KeyboardInterrupt):
            pretrain("tiny", str(data_dir), str(resumed), overrides=fast)
    pretrain("tiny", str(data_dir), str(resumed), overrides=fast, resume=True)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Muon changes the run: the same steps with AdamW end elsewhere
    pretrain("tiny", str(data_dir), str(tmp_path / "adamw"), overrides=FAST)
    assert not torch.equal(load_file(tmp_path / "adamw" / "model.safetensors")["layers.0.mlp.up_proj.weight"],
                           wa["layers.0.mlp.up_proj.weight"])
    # a setting given on resume wins over the one saved with the moments (here Muon's ns_steps)
    pretrain("tiny", str(data_dir), str(resumed), overrides=fast + ["train.max_steps=16", "optim.muon_ns_steps=3"],
             resume=True)
    saved = torch.load(resumed / "state/step_00000016/optimizer.pt", weights_only=True)
    assert [g["ns_steps"] for g in saved["muon"]["param_groups"]] == [3]
    # resuming with the other optimizer, either way, is one clear error
    with pytest.raises(UserError, match="written with optim.optimizer=muon"):
        pretrain("tiny", str(data_dir), str(resumed), overrides=FAST + ["train.max_steps=14"], resume=True)
    with pytest.raises(UserError, match="written with optim.optimizer=adamw"):
        pretrain("tiny", str(data_dir), str(tmp_path / "adamw"), overrides=fast + ["train.max_steps=14"], resume=True)
    # Muon needs whole matrices: FSDP's shards are refused before any step
    with pytest.raises(UserError, match="optim.optimizer=muon needs whole matrices"):
        pretrain("tiny", str(data_dir), str(tmp_path / "fsdp"), overrides=fast + ["train.parallel=fsdp"])


class Chunks:
    """The same global batch of 16 windows per step, served in micro-batches of `micro`."""

    def __init__(self, data_dir, micro):
        self.inner, self.micro, self.buf = TokenBatches(data_dir, batch_size=16, seq_len=64), micro, []

    def next(self):
        if not self.buf:
            x, y = self.inner.next()
            self.buf = list(zip(x.split(self.micro), y.split(self.micro)))
        return self.buf.pop(0)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def test_accumulation_does_not_change_the_update(data_dir, tmp_path):
    # The loop itself, with a custom batch source: the seam later stages plug into.
    losses = []
    for micro in (16, 4):
        cfg = load_config("tiny", ["train.max_steps=3", "train.batch_tokens=1024", "train.eval_every=0",
                                   f"train.micro_batch_size={micro}"], vocab_size=400)
        torch.manual_seed(0)
        model = GPT(cfg.model)
        train(cfg, model, Chunks(data_dir, micro), next_token_loss, tmp_path / str(micro))
        losses.append([r["loss"] for r in read_metrics(tmp_path / str(micro))])
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_objective_extras_and_batch_metrics_are_logged(data_dir, tmp_path):
    """An objective's third item {name: sum} is logged as sum / count (summed over
    micro-batches, like the loss), and a batch source's metrics() join each record."""
    class Measured(Chunks):
        def metrics(self):
            return {"rollout_reward": 0.5}

    def objective(model, batch):
        loss, n = next_token_loss(model, batch)
        return loss, n, {"twice_n": 2.0 * n, "loss_copy": loss.detach()}

    cfg = load_config("tiny", ["train.max_steps=2", "train.batch_tokens=1024", "train.eval_every=0",
                               "train.micro_batch_size=4"], vocab_size=400)
    torch.manual_seed(0)
    train(cfg, GPT(cfg.model), Measured(data_dir, 4), objective, tmp_path / "x")
    for r in read_metrics(tmp_path / "x"):
        assert r["twice_n"] == pytest.approx(2.0) and r["loss_copy"] == pytest.approx(r["loss"])
        assert r["rollout_reward"] == 0.5


def test_bf16_autocast_on_cpu(data_dir, tmp_path):
    out = tmp_path / "bf16"
    pretrain("tiny", str(data_dir), str(out), overrides=["train.max_steps=3", "train.dtype=bf16"])
    m = read_metrics(out)
    assert len(m) == 3 and all(math.isfinite(r["loss"]) for r in m) and math.isfinite(m[-1]["val_loss"])
    assert load_file(out / "model.safetensors")["norm.weight"].dtype == torch.float32  # fp32 master weights


def test_checkpoint_is_atomic(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain("tiny", str(data_dir), str(out), overrides=FAST[:1] + ["train.max_steps=4"] + FAST[1:])
    before = load_file(out / "model.safetensors")
    model = modelio.load_model(out)
    opt = torch.optim.AdamW(model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a different model, so a half-written save would show

    def crash(obj, path):
        raise OSError("disk full (simulated crash mid-save)")
    monkeypatch.setattr(checkpoint, "_save_torch", crash)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(out, 5, model, opt, {"tokens": 0, "data": {}}, keep_last=2)
    assert [p.name for p in checkpoint.checkpoints(out)][-1] == "step_00000004"
    assert not list((out / "state").glob(".*"))  # the temporary folder is gone
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    reloaded = modelio.load_model(out)
    assert torch.equal(reloaded.embed_tokens.weight, before["embed_tokens.weight"])
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(out), reloaded)
    assert state["step"] == 4 and state["data"] == {"step": 4 * 2}


def test_load_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        modelio.load_model(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        modelio.load_model(tmp_path / "m")
    cfg = load_config("tiny", [], vocab_size=50).to_dict()["model"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        modelio.load_model(tmp_path / "m")


def test_a_preset_that_is_not_utf8_is_one_line(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[train]\n# caf\xe9\nmax_steps = 5\n'.encode("latin-1"))
    with pytest.raises(UserError, match="latin1.toml: invalid TOML"):
        load_config(str(bad))


def test_a_gpu_past_the_last_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="cuda:2 asked for but this machine has 2 CUDA GPU"):
        pick_device("cuda:2")


def test_lr_schedules():
    oc = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, oc, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[54] == pytest.approx(0.55, abs=0.02)  # cosine midpoint
    oc = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, oc, 100) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70 and lrs[89] == pytest.approx(0.5) and lrs[-1] == 0.0


def test_objective_sums_and_masks():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)

    class M:
        def __call__(self, x):
            return logits
    x = torch.zeros(2, 5, dtype=torch.long)
    y = torch.randint(0, 7, (2, 5))
    s, n = next_token_loss(M(), (x, y))
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 7), y.view(-1), reduction="sum")
    assert n == 10 and torch.allclose(s, ref)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    s2, n2 = next_token_loss(M(), (x, y, mask))
    keep = mask.view(-1).bool()
    ref2 = torch.nn.functional.cross_entropy(logits.view(-1, 7)[keep], y.view(-1)[keep], reduction="sum")
    assert n2 == 7 and torch.allclose(s2, ref2)
    tb = torch.arange(7)
    assert target_bytes((x, y, mask), tb) == y.view(-1)[keep].sum()
    assert math.isfinite(float(s2))


# --- bad input through the real CLI -----------------------------------------------------

@pytest.mark.parametrize("extra, needle", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "train.max_step=5"], "unknown config key 'train.max_step'"),
    (["--set", "train.max_steps=five"], "train.max_steps must be int"),
    (["--set", "optim.schedule=linear"], "optim.schedule must be one of"),
    (["--set", "optim.optimizer=sgd"], "optim.optimizer must be one of adamw | muon"),
    (["--set", "optim.muon_ns_steps=0"], "optim.muon_ns_steps must be in [1, 99]"),
    (["--resume"], "nothing to resume"),
])
@pytest.mark.slow
def test_cli_bad_input(data_dir, tmp_path, extra, needle):
    r = run_cli("pretrain", "--data", str(data_dir), "--out", str(tmp_path / "out"), *extra, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


@pytest.mark.slow
def test_cli_missing_data_and_nonempty_out(tmp_path, data_dir):
    r = run_cli("pretrain", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nodata" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = run_cli("pretrain", "--data", str(data_dir), "--out", str(tmp_path / "full"), timeout=120)
    assert r.returncode != 0 and "not empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("sample", "--model", str(tmp_path / "full"), timeout=120)
    assert r.returncode != 0 and "no config.json" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigterm_saves_and_resume_continues(data_dir, tmp_path):
    """`kill` (SIGTERM: a scheduler's preemption) saves like Ctrl-C; --resume continues."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmstack", "pretrain", "--preset", "tiny", "--data", str(data_dir),
           "--out", str(out)] + [f"--set={o}" for o in FAST[1:]] + ["--set=train.max_steps=100000",
                                                                    "--set=train.save_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if len(lines) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err and "--resume" in err, err[-2000:]
    saved = checkpoint.latest_checkpoint(out)
    assert saved is not None, err[-2000:]
    step = int(saved.name[5:])
    assert step >= 3
    resumed = subprocess.run([c for c in cmd if "max_steps" not in c] + [f"--set=train.max_steps={step + 2}", "--resume"],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-1000:]
    assert read_metrics(out)[-1]["step"] == step + 2
