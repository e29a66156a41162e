"""Reinforcement learning from the policy's own rollouts: PPO-RLHF and GRPO / RLOO.

    lmstack ppo  --policy runs/small/chat --reward runs/small/rm --prompts WORLD/comparisons.jsonl --out runs/small/ppo
    lmstack grpo --model runs/small/chat --prompts train.jsonl --reward arithmetic --out runs/small/grpo

Both are THE training loop with a batch source that has a rollout phase (rollout.py); the math
(clipped surrogate, value loss, k3 KL, GAE, group advantages) is train/objectives.py. Here: the
policy with a value head, the two objectives the loop calls (each + rl.ptx_coef x the SFT loss on
packed SFT conversations when set, "PPO-ptx"), the stage's config (one optimizer step is one
whole rollout batch unless train.batch_tokens says otherwise) and the entry points.
The output is a plain chat model folder (PPO's value head goes beside it, value_head.safetensors);
every 20th prompt is held out and scored before and after (README: Alignment, how the stages
are built).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lmstack import distributed
from lmstack.align.rollout import (EnsembleScorer, RolloutBatches, evaluate_prompts, load_prompts, make_scorer,
                                   reward_stats, split_heldout, tempered_logprobs, tool_registry)
from lmstack.config import RunConfig, stage_config
from lmstack.model import GPT
from lmstack.modelio import STAGE, WEIGHTS, lineage, load_model_and_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.train import checkpoint
from lmstack.train.loop import frozen_copy, seed_everything, train
from lmstack.train.objectives import kl_estimates, ppo_clip_loss, value_loss
from lmstack.train.sft import PackedBatches, load_docs, packed_loss
from lmstack.utils import UserError, atomic_file, atomic_write_json, describe_counts

VALUE_HEAD = "value_head.safetensors"


# --------------------------------------------------------------------------- the models

class PolicyValue(GPT):
    """PPO's policy with a value head: a GPT (the same weights, the same forward for the engine)
    plus `value_head`, a Linear on the trunk's final normed hidden state, initialised to 0.
    `model(x, values=True)` -> (logits [B, T, V], values [B, T]); values[:, t] estimates the
    return of the reply from the state x[:, :t+1], the state in which y[:, t] is sampled."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.value_head = nn.Linear(cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "PolicyValue":
        pv = cls(dataclasses.replace(gpt.cfg)).to(gpt.embed_tokens.weight.device)
        missing, unexpected = pv.load_state_dict(gpt.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("value_head.") for k in missing), (missing, unexpected)
        return pv

    def forward(self, idx, start_pos=None, attn_mask=None, slot: int = 0, values: bool = False,
                last_only: bool = False):
        if not values:
            return super().forward(idx, start_pos, attn_mask, slot, last_only=last_only)
        h = self.hidden(idx)
        return self.lm_head(h), self.value_head(h).squeeze(-1)


# --------------------------------------------------------------------------- objectives

def with_ptx(rl, model, ptx: tuple, loss_sum: torch.Tensor, n: torch.Tensor, extras: dict):
    """InstructGPT's "PPO-ptx" (Ouyang et al. 2022), with SFT conversations where they mixed in
    pretraining text: + rl.ptx_coef x the mean next-token loss on the micro-batch's packed SFT windows `ptx`
    (x, y, mask, doc_ids), added as that mean times this micro-batch's reply-token count `n`,
    so that the loop's division by the tokens leaves rl.ptx_coef x the SFT loss. Nothing to do
    when the batch carries no SFT windows."""
    if not ptx:
        return loss_sum, n, extras
    s, c = packed_loss(model, ptx)
    ce = s / c.clamp(min=1)
    return loss_sum + rl.ptx_coef * ce * n, n, {**extras, "ptx_loss": ce.detach() * n}


class GRPOObjective:
    """Clipped surrogate with the group advantage + kl_coef * k3 KL to the reference, per reply
    token (+ rl.ptx_coef x the SFT loss, `with_ptx`)."""

    def __init__(self, rl):
        self.rl = rl

    def __call__(self, model, batch):
        (x, y, mask, old_logp, ref_logp, adv), ptx = batch[:6], batch[6:]
        logp, logp_all = tempered_logprobs(model(x), y, self.rl.temperature)
        m = mask.to(logp.dtype)
        logp = torch.where(mask > 0, logp, old_logp)  # padding: ratio 1, KL 0 (never inf * 0)
        pg, clipped = ppo_clip_loss(logp, old_logp, adv, self.rl.clip)
        kl = kl_estimates(logp, torch.where(mask > 0, ref_logp, logp.detach()))["k3"]
        loss = pg + self.rl.kl_coef * kl
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        extras = {"kl": (kl * m).sum().detach(), "clip_frac": (clipped * m).sum().detach(),
                  "entropy": (entropy * m).sum().detach(), "pg_loss": (pg * m).sum().detach()}
        return with_ptx(self.rl, model, ptx, (loss * m).sum(), m.sum(), extras)


class PPOObjective:
    """Clipped surrogate with the GAE advantage + vf_coef * clipped value loss, per reply token
    (+ rl.ptx_coef x the SFT loss, `with_ptx`)."""

    def __init__(self, rl):
        self.rl = rl

    def __call__(self, model, batch):
        (x, y, mask, old_logp, ref_logp, adv, returns, old_values), ptx = batch[:8], batch[8:]
        logits, values = model(x, values=True)
        logp, logp_all = tempered_logprobs(logits, y, self.rl.temperature)
        m = mask.to(logp.dtype)
        logp = torch.where(mask > 0, logp, old_logp)
        pg, clipped = ppo_clip_loss(logp, old_logp, adv, self.rl.clip)
        vl = value_loss(values.float(), old_values, returns, self.rl.clip)
        loss = pg + self.rl.vf_coef * vl
        kl = kl_estimates(logp, torch.where(mask > 0, ref_logp, logp.detach()))["k3"]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        extras = {"kl": (kl * m).sum().detach(), "clip_frac": (clipped * m).sum().detach(),
                  "entropy": (entropy * m).sum().detach(), "pg_loss": (pg * m).sum().detach(),
                  "vf_loss": (vl * m).sum().detach()}
        return with_ptx(self.rl, model, ptx, (loss * m).sum(), m.sum(), extras)


# --------------------------------------------------------------------------- config

def rl_config(preset: str, overrides, base_model, world_size: int = 1) -> RunConfig:
    """The stage's config (`stage_config`: preset + --set, the model's own config). One optimizer
    step = train.batch_tokens / train.seq_len rollouts (train.seq_len: the longest rollout,
    prompt + reply); unless given, batch_tokens is derived so that a step is the whole rollout
    batch (prompts_per_step * group_size rollouts): a phase is then rl.epochs steps. A smaller
    batch_tokens splits each epoch into minibatches; it must divide the rollout batch."""
    def derive(cfg, keys):
        rl, tc = cfg.rl, cfg.train
        n = rl.prompts_per_step * rl.group_size  # rollouts per phase, all ranks
        if rl.prompts_per_step % world_size:
            raise UserError(f"rl.prompts_per_step ({rl.prompts_per_step}) must be a multiple of the world size "
                            f"({world_size})")
        if tc.micro_batch_size > 0 and n // world_size % tc.micro_batch_size:
            ranks = f" / {world_size} ranks" if world_size > 1 else ""
            raise UserError(f"rl.prompts_per_step * rl.group_size ({n}{ranks}) "
                            f"must be a multiple of train.micro_batch_size ({tc.micro_batch_size})")
        if "train.batch_tokens" not in keys:
            tc.batch_tokens = n * tc.seq_len

    cfg = stage_config(preset, overrides, base_model, "RL", derive)
    rl, tc = cfg.rl, cfg.train
    if rl.temperature <= 0:
        raise UserError("rl.temperature must be > 0 (rollouts are sampled; 0 would be greedy)")
    if tc.parallel == "fsdp":  # the engine decodes with whole weights, not FSDP's shards
        raise UserError("RL's rollouts generate with the whole policy on each rank: use train.parallel=ddp")
    if rl.max_new_tokens >= tc.seq_len:
        raise UserError(f"rl.max_new_tokens ({rl.max_new_tokens}) must be < train.seq_len ({tc.seq_len}): "
                        "a rollout is prompt + reply")
    n = rl.prompts_per_step * rl.group_size
    per_step = tc.batch_tokens // tc.seq_len  # rollouts per optimizer step
    if tc.batch_tokens % tc.seq_len or n % per_step:
        raise UserError(f"train.batch_tokens ({tc.batch_tokens}) must be train.seq_len ({tc.seq_len}) times a divisor "
                        f"of the rollouts per phase (rl.prompts_per_step * rl.group_size = {n})")
    if rl.method == "rloo" and rl.group_size < 2:
        raise UserError("rl.method=rloo needs rl.group_size >= 2")
    return cfg


def ptx_docs(cfg: RunConfig, base: Path, tok: Tokenizer) -> tuple[list[str], list]:
    """The SFT conversations of "PPO-ptx" (none when rl.ptx_coef is 0): rl.ptx_data, or else the
    data of the SFT stage that made the policy (its lineage); (files, rendered docs of at most
    train.seq_len + 1 tokens: longer conversations are skipped)."""
    rl, tc = cfg.rl, cfg.train
    if rl.ptx_coef == 0:
        return [], []
    files = [f.strip() for f in rl.ptx_data.split(",") if f.strip()]
    if not files:
        files = next((s["data"] for s in lineage(base)["steps"] if s["stage"] == "sft" and s["data"]), [])
    if not files:
        raise UserError(f"rl.ptx_coef needs SFT conversations and {base} records no SFT data: "
                        "set rl.ptx_data=FILE.jsonl[,FILE2.jsonl] (or rl.ptx_coef=0 for plain PPO)")
    files = [str(f) for f in files]
    try:
        docs, stats = load_docs(files, tok, tc.seq_len + 1)
    except UserError as e:  # a missing file, perhaps one the lineage named
        raise UserError(f"rl.ptx_coef: {e} (set rl.ptx_data=FILE.jsonl)") from None
    skipped = describe_counts(stats["skipped"])
    if not docs:
        raise UserError(f"rl.ptx_data: no usable conversations of at most {tc.seq_len + 1} tokens in "
                        f"{', '.join(files)} ({skipped or 'empty'})")
    if distributed.is_main():
        print(f"ptx: {len(docs):,} SFT conversations from {', '.join(files)}, rl.ptx_coef={rl.ptx_coef}"
              + (f"; skipped {skipped}" if skipped else ""), flush=True)
    return files, docs


def ptx_batches(cfg: RunConfig, docs: list, pad_id: int, rank: int, world_size: int) -> PackedBatches | None:
    """The packed SFT windows appended to each micro-batch (sft.py's PackedBatches at the
    policy's micro-batch size and train.seq_len); None without ptx."""
    tc = cfg.train
    return PackedBatches(docs, tc.micro_batch_size, tc.seq_len, pad_id, seed=tc.seed, rank=rank,
                         world_size=world_size) if docs else None


def steps_per_phase(cfg: RunConfig) -> int:
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    return cfg.rl.epochs * n // (cfg.train.batch_tokens // cfg.train.seq_len)


# --------------------------------------------------------------------------- the stages

def split_value_head(out) -> None:
    """OUT/model.safetensors -> the policy alone (a plain chat model folder) + OUT/value_head.safetensors."""
    path = Path(out) / WEIGHTS
    if not path.is_file():
        return
    sd = load_file(str(path))
    head = {k: v for k, v in sd.items() if k.startswith("value_head.")}
    if not head:
        return
    for name, part in ((VALUE_HEAD, head), (WEIGHTS, {k: v for k, v in sd.items() if k not in head})):
        with atomic_file(Path(out) / name) as tmp:
            save_file(part, str(tmp), metadata={"format": "pt"})


def _summary(ev: dict | None) -> dict | None:
    if ev is None:
        return None
    return {k: v for k, v in ev.items() if k not in ("rewards", "replies")}


def run_rl(kind: str, model, prompts_file, reward, out, overrides=(), resume: bool = False,
           preset: str | None = None) -> dict:
    """PPO or GRPO from the chat model folder `model`; returns the last metrics record with the
    held-out evaluation under "heldout". OUT is a chat model folder (the policy's weights) with
    stage.json {"stage", "base", "chat": true, prompts, reward, held-out reward before/after}."""
    base = Path(model)
    net, tok = load_model_and_tokenizer(base, kind="chat")
    world_size = distributed.launched_world_size()
    cfg = rl_config(preset or kind, overrides, net.cfg, world_size)
    rl, tc = cfg.rl, cfg.train
    out_dir, resume = checkpoint.output_folder(out, resume)
    if isinstance(reward, (list, tuple)) and len(reward) > 1 and kind != "ppo":
        raise UserError("an ensemble of reward models is for PPO (GRPO's rewards are checked, not modelled)")
    scorer = make_scorer(reward, tok, prompts_file, rl.ensemble)
    tools = tool_registry(rl.tools)
    if tools is not None and kind != "grpo":
        raise UserError("rl.tools is for GRPO only (PPO's GAE over replies with tool results is not written)")
    tool_use = {"tools": tools, "tool_rounds": rl.tool_rounds}  # the held-out evaluation uses them too
    prompts, stats = load_prompts(prompts_file, tok, tc.seq_len - rl.max_new_tokens)
    if not prompts:
        why = describe_counts(stats["skipped"]) or "empty"
        raise UserError(f"no usable prompts in {prompts_file} ({why})")
    train_prompts, heldout = split_heldout(prompts)
    if isinstance(reward, (list, tuple)):
        reward_name = ",".join(map(str, reward))
    else:
        reward_name = reward if isinstance(reward, (str, Path)) else getattr(reward, "__name__", type(reward).__name__)
    info = {"stage": kind, "base": str(base), "chat": True, "prompts": str(prompts_file), "reward": str(reward_name),
            **stats, "train_prompts": len(train_prompts), "heldout_prompts": len(heldout),
            "steps_per_phase": steps_per_phase(cfg), "tools": rl.tools}
    ptx_data, ptx = ptx_docs(cfg, base, tok)
    if ptx:
        info.update(ptx_data=ptx_data, ptx_coef=rl.ptx_coef)
    if resume:
        old = checkpoint.check_resume(out_dir, kind, dataclasses.asdict(cfg.model), STAGE, info,
                                      ("prompts", "reward", "rows", "usable", "skipped", "train_prompts", "ptx_data"),
                                      what="prompts, reward or SFT data (rl.ptx_data)")
        info["heldout"] = old.get("heldout", {})
        if kind == "ppo":
            info["reward_norm"] = old.get("reward_norm")
            if isinstance(scorer, EnsembleScorer):  # the members' scales as they were calibrated
                scorer.norms = info["reward_members"] = old.get("reward_members")

    dist = distributed.init(tc.device)
    try:
        main = distributed.is_main()
        seed_everything(tc.seed)
        ref = frozen_copy(net).to(dist.device)  # the chat model's weights, before any step changes net
        policy = PolicyValue.from_gpt(net) if kind == "ppo" else net
        policy.to(dist.device).train()
        if kind == "ppo" and not info.get("reward_norm"):
            info["reward_norm"] = reward_stats(ref, tok, train_prompts, scorer, cfg)
            if isinstance(scorer, EnsembleScorer):
                info["reward_members"] = scorer.norms
        if main:
            skipped = describe_counts(stats["skipped"])
            print(f"{kind} prompts: {len(prompts):,} of {stats['rows']:,} rows ({len(train_prompts):,} train, "
                  f"{len(heldout)} held out)" + (f"; skipped {skipped}" if skipped else ""), flush=True)
            print(f"{kind}: {rl.prompts_per_step} prompts x {rl.group_size} replies per phase, {rl.epochs} epochs, "
                  f"{steps_per_phase(cfg)} optimizer steps per phase, {tc.max_steps} steps", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                info["heldout"] = {}
                if heldout:
                    ev = evaluate_prompts(ref, tok, heldout, scorer, rl.max_new_tokens, **tool_use)
                    info["heldout"]["before"] = _summary(ev)
                    print(f"held out, greedy, {base}: mean reward {ev['mean']:.4f}", flush=True)
            atomic_write_json(out_dir / STAGE, info)
        batches = RolloutBatches(kind, policy, ref, tok, train_prompts, scorer, cfg, dist.rank, dist.world_size,
                                 reward_norm=tuple(info["reward_norm"]) if kind == "ppo" else (0.0, 1.0), tools=tools,
                                 ptx=ptx_batches(cfg, ptx, tok.pad_id, dist.rank, dist.world_size))
        objective = GRPOObjective(rl) if kind == "grpo" else PPOObjective(rl)
        try:
            record = train(cfg, policy, batches, objective, out_dir, tokenizer_file=base / "tokenizer.json",
                           resume=resume)
        finally:
            if kind == "ppo" and main:
                split_value_head(out_dir)
        if main and heldout:
            ev = evaluate_prompts(policy, tok, heldout, scorer, rl.max_new_tokens, **tool_use)
            info["heldout"]["after"] = _summary(ev)
            before = (info["heldout"].get("before") or {}).get("mean")
            print(f"held out, greedy, {out_dir}: mean reward {ev['mean']:.4f}"
                  + (f" (was {before:.4f})" if before is not None else ""), flush=True)
            atomic_write_json(out_dir / STAGE, info)
        return {**record, "heldout": info.get("heldout")}
    finally:
        distributed.cleanup()


def grpo(model, prompts, reward, out, overrides=(), resume: bool = False, preset: str = "grpo") -> dict:
    """`lmstack grpo`: group-relative policy optimisation (or RLOO, rl.method=rloo) of the chat
    model `model` on `prompts` with a reward: arithmetic | world | python:MODULE:FUNCTION, or a
    Python callable (row, answer) -> float."""
    return run_rl("grpo", model, prompts, reward, out, overrides, resume, preset)


def ppo(policy, reward, prompts, out, overrides=(), resume: bool = False, preset: str = "ppo") -> dict:
    """`lmstack ppo`: PPO-RLHF of the chat model `policy` against the reward model folder
    `reward`, or a list of them (an ensemble: each member standardised, then their minimum, or
    mean with rl.ensemble=mean), or, as a stand-in, any reward spec / callable `grpo` takes."""
    return run_rl("ppo", policy, prompts, reward, out, overrides, resume, preset)
