"""THE training loop, one for every stage.

    train(cfg, model, batches, objective, out, eval_batches=..., token_bytes=..., resume=...)

A stage is a batch source plus an objective:
- `batches`: `.next()` -> a batch (a tuple of tensors), `.state_dict()` / `.load_state_dict()`
  (JSON-serialisable, saved in checkpoints so a resumed run sees the same data);
- `objective(model, batch) -> (loss_sum, n_tokens[, extras])`: a SUM and a count
  (train/objectives.py); `extras`, {name: sum}, are logged as name = sum / count;
- optionally `batches.metrics()` -> a dict logged with each step (e.g. rollout rewards).
Pretraining is (TokenBatches, next_token_loss); SFT is the same loss with a mask; DPO and the
reward model are other objectives on paired batches.

One optimizer step = `grad_accum` micro-batches on every rank, sized so the global batch is
`train.batch_tokens` tokens. Gradients of the loss SUMS are accumulated, then divided by the
global token count (all micro-batches, all ranks), so accumulation and world size never
change the update. Rank 0 alone logs and saves.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lmstack import distributed
from lmstack.config import OptimConfig, RunConfig
from lmstack.data import target_bytes
from lmstack.device import autocast_dtype, peak_flops
from lmstack.modelio import write_run_files
from lmstack.train import checkpoint
from lmstack.utils import UserError, atomic_write_text


def seed_everything(seed: int) -> None:
    """Seed every RNG a run draws from (the init, data order, dropout-free sampling in RL)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A model that cannot change (a reference, a reward model): eval mode, no gradients, never
    given to an optimizer."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that cannot change: eval mode, no gradients, out of every optimizer
    (a reference taken from the policy before training, instead of loading it from disk again)."""
    return freeze(copy.deepcopy(model))


def lr_at(step: int, oc: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then cosine
    decay to min_lr, or warmup-stable-decay (flat, then linear to min_lr over the last
    decay_fraction of the run). The last step runs at min_lr. The step is the whole scheduler
    state, so resuming needs nothing else."""
    if step < oc.warmup_steps:
        return oc.lr * (step + 1) / oc.warmup_steps
    min_lr = oc.lr * oc.min_lr_ratio
    if oc.schedule == "cosine":
        progress = min(1.0, (step + 1 - oc.warmup_steps) / max(1, max_steps - oc.warmup_steps))
        return min_lr + (oc.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(oc.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return oc.lr
    return oc.lr + (min_lr - oc.lr) * min(1.0, (step + 1 - decay_start) / decay_steps)


def build_optimizer(model: torch.nn.Module, oc: OptimConfig, device: torch.device):
    """AdamW with two groups: weight decay on matmul weights only. Norm gains (1-D) and
    embedding tables are exempt: decaying a norm gain fights the normalisation, and decaying
    embeddings shrinks the vectors of rare tokens that get few gradient updates.
    (A tied output head is the embedding, so it is exempt too.)
    With `optim.optimizer = "muon"` the blocks' matrices go to Muon instead (MuonAdamW)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embeddings:
            no_decay.append(p)
        elif oc.optimizer == "muon" and name.startswith("layers."):
            # Muon orthogonalises a hidden layer's update; the output head (a classifier over the
            # vocabulary, or a reward model's score) stays with AdamW, as in Keller Jordan's and
            # Moonlight's recipes.
            muon.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": oc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # One kernel for all params instead of a loop over tensors (faster on CPU; bench/README.md).
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    adamw = torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, **fused)
    if not muon:  # optim.optimizer=adamw, or nothing in the blocks trains
        return adamw
    # The loop sets each group's lr to the schedule's x its lr_scale.
    return MuonAdamW(torch.optim.Muon([{"params": muon, "lr_scale": oc.muon_lr_scale}], lr=oc.lr * oc.muon_lr_scale,
                                      weight_decay=oc.weight_decay, adjust_lr_fn="match_rms_adamw",
                                      ns_steps=oc.muon_ns_steps), adamw)


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the rest, stepped as one optimizer. The loop sets
    the learning rate on `param_groups` (both optimizers' groups, the same dicts), and a checkpoint
    holds both states. Muon's update is scaled to AdamW's RMS (0.2 x sqrt(max(rows, cols)),
    Moonlight's rule), so the schedule's learning rate means the same for both; Muon's group
    carries `lr_scale` (optim.muon_lr_scale), by which the loop multiplies it."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


# The cost estimate: measured over the steps after the first (which warms up: allocations,
# oneDNN's kernel choices, torch.compile), printed when the rest of the run is this long or longer.
ESTIMATE_STEPS = 3
ESTIMATE_ABOVE_S = 600.0


def duration(seconds: float) -> str:
    """'5 h 12 min', '12 min', '40 s'."""
    if seconds < 90:
        return f"{round(seconds)} s"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min" if h and m else f"{h} h" if h else f"{m} min"


def estimate(seconds_per_step: float, steps_left: int, batch_tokens: int) -> tuple[float, float, str]:
    """(tokens/s, seconds left, the line that says so) from the measured time of one step."""
    tok_s, left = batch_tokens / seconds_per_step, seconds_per_step * steps_left
    return tok_s, left, (f"train: ~{tok_s:,.0f} tok/s -> about {duration(left)} for the remaining "
                         f"{steps_left:,} steps ({steps_left * batch_tokens:,} tokens)")


def _to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate(model, eval_batches, objective, device, amp, token_bytes=None) -> dict:
    """Mean loss (nats/token), bits-per-byte and the objective's extras (as val_NAME) over
    `eval_batches()`, summed over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, tokens, bytes
    extra: dict[str, torch.Tensor] = {}
    for batch in eval_batches():
        batch = _to_device(batch, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss_sum, n, *more = objective(model, batch)
        sums[0] += loss_sum.double()
        sums[1] += n
        if token_bytes is not None:
            sums[2] += target_bytes(batch, token_bytes)
        for k, v in (more[0] if more else {}).items():
            extra[k] = extra.get(k, 0) + torch.as_tensor(v, device=device).double()
    names = sorted(extra)
    totals = torch.cat([sums, torch.stack([extra[k] for k in names])]) if names else sums
    distributed.all_reduce_sum(totals)
    model.train(was_training)
    nats, n, nbytes, *extras = totals.tolist()
    out = {"val_loss": nats / n} if n else {}
    if nbytes:
        out["val_bpb"] = nats / (math.log(2) * nbytes)
    out.update({f"val_{k}": v / n for k, v in zip(names, extras)} if n else {})
    return out


def run_probes(model, probes: dict, device, amp) -> dict:
    """Each probe's number on the model in eval mode (no gradients), the model's mode restored."""
    if not probes:
        return {}
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        out = {name: round(float(fn(model)), 5) for name, fn in probes.items()}
    model.train(was_training)
    return out


def train(cfg: RunConfig, model: torch.nn.Module, batches, objective, out, *, eval_batches=None,
          token_bytes: list[int] | None = None, tokenizer_file=None, resume: bool = False, probes=None) -> dict:
    """Run the loop to cfg.train.max_steps; returns the last metrics record.

    eval_batches: a callable returning a fresh iterable of validation batches, or None.
    probes: {name: fn(model) -> float}, measured beside the validation loss and logged under its
    name (pretraining logs in-context copying, so its onset shows over training).
    token_bytes: UTF-8 bytes per token id, for val_bpb. tokenizer_file: copied into `out`.
    Call distributed.init() first when running under torchrun.
    """
    tc, oc = cfg.train, cfg.optim
    info = distributed.info()
    device, world, main = info.device, info.world_size, distributed.is_main()
    out = Path(out)
    micro_tokens = tc.micro_batch_size * tc.seq_len
    if tc.batch_tokens % (micro_tokens * world):
        raise UserError(f"train.batch_tokens ({tc.batch_tokens}) must be a multiple of micro_batch_size "
                        f"* seq_len * world_size ({micro_tokens} * {world})")
    grad_accum = tc.batch_tokens // (micro_tokens * world)
    ckpt = checkpoint.latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        raise UserError(f"nothing to resume: {out / checkpoint.STATE} has no checkpoint")

    if device.type == "cuda":  # TF32 matmuls for whatever runs in fp32 (~free speed on Ampere+)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not (tc.parallel == "fsdp" and world > 1):
        # (FSDP moves each block to the device as it shards it, so the device never holds the
        # whole model: one that fits only sharded trains.)
        model.to(device)
    amp = autocast_dtype(tc.dtype, device)
    # Compile, activation checkpointing, DDP or FSDP: composed in distributed.parallelize. FSDP
    # replaces the parameters with shards, so the optimizer is built after it.
    fwd_model, train_model = distributed.parallelize(model, tc.parallel, tc.activation_checkpointing,
                                                     tc.compile, bf16=amp == torch.bfloat16)
    # FSDP runs save sharded checkpoints (every rank writes its shards; a collective).
    sharded = tc.parallel == "fsdp"
    optimizer = build_optimizer(model, oc, device)
    step, tokens_seen = 0, 0
    if ckpt is not None:
        state = checkpoint.load_checkpoint(ckpt, model, optimizer)
        step, tokens_seen = state["step"], state["tokens"]
        batches.load_state_dict(state["data"])
    tb = torch.tensor(token_bytes, dtype=torch.int64, device=device) if token_bytes is not None else None
    metrics_path = out / "metrics.jsonl"
    if main:
        write_run_files(out, cfg.to_dict(), tokenizer_file)
        _truncate_metrics(metrics_path, step)
    distributed.barrier()

    flops_per_token = model.flops_per_token(tc.seq_len)
    peak = peak_flops(device, tc.peak_flops, bf16=amp is not None)
    if main:
        print(f"train: {model.num_params():,} params ({model.num_params(False):,} non-embedding), "
              f"{flops_per_token / 1e6:.1f} MFLOP/token | {world} x {device.type}, "
              f"{'bf16' if amp else 'fp32'}, batch {tc.batch_tokens:,} tokens = {world} rank(s) x "
              f"{grad_accum} micro x {tc.micro_batch_size} x {tc.seq_len} | steps {step}->{tc.max_steps} | {out}",
              flush=True)
    bar = tqdm(total=tc.max_steps, initial=step, desc="train", dynamic_ncols=True,
               disable=None if main else True)  # None: off when stderr is not a terminal
    quiet_every = max(1, tc.max_steps // 10)  # without a bar, print a line this often
    metrics_file = open(metrics_path, "a", encoding="utf-8") if main else None
    data_state = batches.state_dict()  # the data position after the last completed step
    consistent, saved_step, logged_step = True, step if ckpt is not None else -1, step
    record: dict = {}
    t_start = time.perf_counter()
    first_step, timed_s, timed_n = step, 0.0, 0  # step time summed over the steps after this process's first

    def save():
        nonlocal saved_step
        checkpoint.save_checkpoint(out, step, model, optimizer,
                                   {"tokens": tokens_seen, "data": data_state, "world_size": world},
                                   keep_last=tc.keep_last, sharded=sharded)
        saved_step = step

    def log(rec):
        nonlocal logged_step
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
        logged_step = rec["step"]

    # A sharded save is a collective, so every rank must save at the same step: with FSDP under
    # torchrun, Ctrl-C / SIGTERM only raise a flag, which rides in each step's all-reduce; when any
    # rank has it, all of them finish the step, save, and stop together.
    stop_flag = _StopFlag() if sharded and world > 1 else None
    old_sigterm = _sigterm_as_ctrl_c() if stop_flag is None else None
    try:
        while step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, oc, tc.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            n_tokens = torch.zeros((), dtype=torch.float64, device=device)
            extra_sums: dict[str, torch.Tensor] = {}
            for micro in range(grad_accum):
                batch = _to_device(batches.next(), device)
                # DDP all-reduces gradients in backward; only the last micro-step needs to.
                with distributed.no_sync(train_model, skip=micro < grad_accum - 1):
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        ls, n, *more = objective(train_model, batch)
                    ls.backward()
                loss_sum += ls.detach().double()
                n_tokens += n
                # An objective may return a third item: {name: sum over its items}, logged
                # as name = sum / count, like the loss (e.g. DPO's reward margins, PPO's KL).
                for k, v in (more[0] if more else {}).items():
                    extra_sums[k] = extra_sums.get(k, 0) + torch.as_tensor(v, device=device).detach().double()
            names = sorted(extra_sums)
            stop = [torch.tensor(float(stop_flag.is_set()), dtype=torch.float64, device=device)] if stop_flag else []
            totals = distributed.all_reduce_sum(torch.stack([loss_sum, n_tokens, *[extra_sums[k] for k in names],
                                                             *stop]))
            global_loss, global_n, *extra_totals = totals.tolist()
            stopping = bool(stop) and extra_totals.pop() > 0
            # DDP averaged the gradients over ranks: x world / global_n turns the sum of
            # per-token gradients into their mean over the whole global batch.
            scale = world / max(global_n, 1.0)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            grad_norm = distributed.clip_grad_norm_(model.parameters(), oc.grad_clip or float("inf"))
            with _hold_ctrl_c():  # the update is all or nothing, so Ctrl-C can save what it leaves
                consistent = False
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tc.batch_tokens
                data_state = batches.state_dict()
                consistent = True

            dt = time.perf_counter() - t0
            tok_s = tc.batch_tokens / dt
            if step > first_step + 1:
                timed_s, timed_n = timed_s + dt, timed_n + 1
            record = {"step": step, "loss": global_loss / max(global_n, 1.0), "lr": lr,
                      "grad_norm": float(grad_norm), "tokens": tokens_seen, "tok_per_s": round(tok_s, 1),
                      "mfu": round(flops_per_token * tok_s / (peak * world), 5) if peak else None,
                      "time": round(time.perf_counter() - t_start, 3)}
            record.update({k: v / max(global_n, 1.0) for k, v in zip(names, extra_totals)})
            if hasattr(batches, "metrics"):  # what the batch source measured (e.g. RL rollouts' rewards)
                record.update(batches.metrics())
            last = step == tc.max_steps
            if eval_batches is not None and (last or (tc.eval_every and step % tc.eval_every == 0)):
                record.update(evaluate(fwd_model, eval_batches, objective, device, amp, tb))
                record.update(run_probes(fwd_model, probes or {}, device, amp))
            if main:
                if step % tc.log_every == 0 or last or "val_loss" in record:
                    log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:,.0f}",
                                mfu=f"{record['mfu']:.1%}" if record["mfu"] is not None else "-")
                if timed_n == ESTIMATE_STEPS and not last:  # once, early: what the whole run will cost
                    _, left, line = estimate(timed_s / timed_n, tc.max_steps - step, tc.batch_tokens)
                    if left >= ESTIMATE_ABOVE_S:
                        bar.write(line)  # above the bar, which shows the time left from here on
                        sys.stdout.flush()
                if bar.disable and (last or step % quiet_every == 0 or "val_loss" in record):
                    val = f" val_loss {record['val_loss']:.4f}" if "val_loss" in record else ""
                    bpb = f" val_bpb {record['val_bpb']:.4f}" if "val_bpb" in record else ""
                    eta = f", ~{duration(timed_s / timed_n * (tc.max_steps - step))} left" if timed_n and not last else ""
                    print(f"step {step}/{tc.max_steps} loss {record['loss']:.4f}{val}{bpb} "
                          f"lr {lr:.2e} {tok_s:,.0f} tok/s{eta}", flush=True)
            if (main or sharded) and (last or (tc.save_every and step % tc.save_every == 0)):
                save()
            if stopping and step < tc.max_steps:  # (at the last step the run ends anyway)
                if step > saved_step:
                    save()
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if main:
            if record.get("step") == step and logged_step < step:
                log(record)  # Ctrl-C during the evaluation: keep the step's training metrics
            if consistent and step > saved_step and not (sharded and world > 1):  # (saved above)
                save()
            last_saved = checkpoint.latest_checkpoint(out)
            print(f"\ninterrupted at step {step}; "
                  + (f"{last_saved.name} is saved in {out}, continue with --resume" if last_saved
                     else "no checkpoint was saved"), file=sys.stderr, flush=True)
        raise
    finally:
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)
        if stop_flag is not None:
            stop_flag.restore()
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    distributed.barrier()
    return record


def _sigterm_as_ctrl_c():
    """Make SIGTERM (`kill`, a cluster scheduler's preemption, torchrun shutting down) save and
    exit like Ctrl-C. Returns the previous handler (None when not on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


class _StopFlag:
    """SIGINT and SIGTERM set a flag instead of raising (restore() puts the old handlers back).
    Outside the main thread no handler can be set: the flag is then never set."""

    def __init__(self):
        self._set, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _hold_ctrl_c():
    """Block SIGINT for the duration of the block; a Ctrl-C that arrives meanwhile is
    delivered (as KeyboardInterrupt) right after it. No-op where signal masks do not exist."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run re-logs what came after its checkpoint,
    and a fresh run starts an empty file). Torn last lines from a kill are dropped."""
    keep = []
    if step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
    if path.exists() or keep:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
