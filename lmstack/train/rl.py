"""Reinforcement learning from the policy's own rollouts: PPO-RLHF and GRPO / RLOO.

    lmstack ppo  --policy runs/small/chat --reward runs/small/rm --prompts WORLD/comparisons.jsonl --out runs/small/ppo
    lmstack grpo --model runs/small/chat --prompts train.jsonl --reward arithmetic --out runs/small/grpo

Both are THE training loop (train/loop.py) with a batch source that has a rollout phase:
`RolloutBatches.next()` starts a phase when the previous one is used up. A phase
  1. takes the next `rl.prompts_per_step` prompts (shuffled, epoch after epoch) and samples
     `rl.group_size` replies to each from the CURRENT policy (the very module the loop is
     training) through the engine (eval mode, inference_mode, temperature / top_p), until a
     turn end or `rl.max_new_tokens`. A rollout = prompt ids + reply ids + the stop id that
     closed the reply (<|end|>: part of what the policy learns to write);
  2. scores each reply: a reward callable on (prompt row, reply text) for GRPO, a reward model
     (or a stand-in callable) for PPO. No tools run during RL: a reply that calls one scores
     0 under a row reward (it never answered; for arithmetic this is what `lmstack eval`'s
     no-tool `arithmetic` task counts too);
  3. computes, once, with no gradient: the log-probabilities of the sampled tokens under the
     rollout policy (`old_logp`) and under the frozen reference (`ref_logp`, the SFT model,
     requires_grad False, never given to the optimizer), and for PPO the value estimates;
  4. computes advantages: GRPO / RLOO, one per reply from its group (`group_advantages`),
     on every reply token; PPO, per token by GAE on the reward r_t = -kl_coef * (old_logp -
     ref_logp)_t plus the reward model's score at the reply's last token, whitened over the
     rollout batch;
  5. serves the rollout batch `rl.epochs` times, reshuffled each time, as micro-batches of
     `train.micro_batch_size` rollouts (right-padded to the longest in the micro-batch).
Log-probabilities everywhere are of the tempered distribution softmax(logits / rl.temperature),
the one the rollouts were sampled from (top_p, when < 1, is ignored there).

Batch mapping: one optimizer step = `train.batch_tokens / train.seq_len` rollouts (the loop's
grad_accum micro-batches of micro_batch_size); train.seq_len is the longest rollout
(prompt + reply). Unless train.batch_tokens is set, it is derived so that one optimizer step is
one whole rollout batch: batch_tokens = prompts_per_step * group_size * seq_len; then a phase is
`rl.epochs` optimizer steps and train.max_steps = phases x epochs. A smaller batch_tokens splits
each epoch into minibatches (more steps per phase; it must divide the rollout batch).
The loss is summed over reply tokens and divided by their count in the step (per-token mean).

Objectives (math in train/objectives.py, tested there):
  GRPO: ppo_clip_loss(logp, old_logp, A_group) + rl.kl_coef * k3(logp, ref_logp), per token;
  PPO:  ppo_clip_loss(logp, old_logp, A_gae) + rl.vf_coef * value_loss(V, V_old, returns), per
        token (the KL is in the reward). The value head is a Linear on the policy's final
        (normed) hidden state (`PolicyValue`): it shares the policy's trunk.
Logged per step: the phase's reward (mean, std), pass rate and groups with signal (GRPO),
reply length, truncated / tool-call fractions, KL of the rollout policy to the reference
(per token `rollout_kl` and per reply `rollout_kl_seq`, k1), and from the objective the current
policy's k3 KL, entropy (full, per token), clip fraction, policy-gradient and value losses.

Output (OUT): a chat model folder (policy weights, config, tokenizer) with stage.json
{"stage", "base", "chat": true, prompts, reward, held-out reward before/after}; PPO's value
head is saved beside it in value_head.safetensors (model.safetensors is the policy alone, so
every command reads OUT as a plain chat model). Every 20th prompt (at most 200) is held out:
greedy replies of the SFT model and of the result are scored on them at the start / end.
--resume continues from the last checkpoint; the batch source's state holds the phase and
position, and a phase cut by a checkpoint is saved whole (its rollouts and log-probs), so the
resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from lmstack import distributed
from lmstack.chat import TURN_ENDS
from lmstack.config import RunConfig, load_config
from lmstack.engine import generate_batch
from lmstack.model import GPT
from lmstack.tokenizer import ChatFormatError, Tokenizer, render_chat
from lmstack.train import checkpoint
from lmstack.train.loop import autocast_dtype, train
from lmstack.train.objectives import gae, group_advantages, kl_estimates, ppo_clip_loss, value_loss
from lmstack.train.pretrain import seed_everything
from lmstack.train.rewards import BUILTIN, call_reward, load_reward
from lmstack.utils import UserError, atomic_write_json

STAGE = "stage.json"
VALUE_HEAD = "value_head.safetensors"
HELDOUT_EVERY = 20  # every 20th prompt is held out (when there are at least 2 x 20)
HELDOUT_MAX = 200


# --------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    messages: list[dict]  # the conversation the reply answers (ends with a user or tool message)
    ids: list[int]  # rendered with the generation prompt (<|assistant|> last)
    row: dict  # the jsonl row, for the reward


def row_messages(row) -> list[dict]:
    """A prompts row -> the conversation to reply to. Rows: {"prompt": str | [messages]},
    {"question": str} (a user message), or {"messages": [...]} (trailing assistant messages,
    e.g. an SFT row's answer, are dropped)."""
    if not isinstance(row, dict):
        raise ChatFormatError("row is not a JSON object")
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row:
        msgs = row["prompt"]
    elif "question" in row:
        msgs = row["question"]
    else:
        raise ChatFormatError("no prompt, question or messages field")
    if isinstance(msgs, str):
        if not msgs.strip():
            raise ChatFormatError("empty prompt")
        msgs = [{"role": "user", "content": msgs}]
    if not isinstance(msgs, list) or not msgs:
        raise ChatFormatError("the prompt must be a string or a non-empty list of messages")
    msgs = list(msgs)
    while msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        msgs.pop()
    if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") not in ("user", "tool"):
        raise ChatFormatError("the conversation does not end with a user (or tool) message")
    return msgs


def load_prompts(path, tok: Tokenizer, max_len: int) -> tuple[list[Prompt], dict]:
    """Every usable row of a jsonl prompts file, rendered; stats {rows, usable, skipped: {why: n}}.
    Prompts longer than max_len tokens are skipped (a rollout must fit train.seq_len)."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder: name the .jsonl file)" if path.is_dir() else ""
        raise UserError(f"prompts file {path} not found{hint}")
    prompts, skipped, rows = [], Counter(), 0
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            rows += 1
            try:
                row = json.loads(line)
            except ValueError:
                skipped["bad JSON"] += 1
                continue
            try:
                msgs = row_messages(row)
                ids, _ = render_chat(tok, msgs, add_generation_prompt=True)
            except ChatFormatError as e:
                skipped[str(e).split(": ", 1)[-1]] += 1
                continue
            if len(ids) > max_len:
                skipped[f"longer than {max_len} tokens"] += 1
                continue
            prompts.append(Prompt(msgs, ids, row))
    return prompts, {"rows": rows, "usable": len(prompts), "skipped": dict(skipped)}


def split_heldout(prompts: list, every: int = HELDOUT_EVERY, cap: int = HELDOUT_MAX) -> tuple[list, list]:
    """Every `every`-th prompt held out (evenly spread, at most `cap`); none below 2 x every prompts."""
    if len(prompts) < 2 * every:
        return list(prompts), []
    step = max(every, math.ceil(len(prompts) / cap))
    held = set(range(step - 1, len(prompts), step))
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


# --------------------------------------------------------------------------- replies and rewards

@dataclass
class Reply:
    ids: list[int]  # the sampled tokens, the stop id that closed the reply included
    text: str  # the reply's text outside tool calls (special tokens dropped)
    calls: int  # tool calls in it (opened, closed or not)
    finish: str  # "stop" | "length"


def parse_reply(tok: Tokenizer, ids: list[int], stop: int | None, finish: str) -> Reply:
    sid = tok.special_ids
    open_id, close_id = sid["<|tool_call|>"], sid["<|/tool_call|>"]
    visible, calls, inside = [], 0, False
    for t in ids:
        if t == open_id:
            calls, inside = calls + 1, True
        elif t == close_id:
            inside = False
        elif not inside:
            visible.append(t)
    return Reply(list(ids) + ([stop] if isinstance(stop, int) else []),
                 tok.decode(visible, skip_special=True).strip(), calls, finish)


Scorer = Callable[[list[Prompt], list[Reply]], list[float]]


class RowRewardScorer:
    """A reward callable (row, answer text) -> float as a scorer. A reply that calls a tool scores
    0: no tool runs during RL, so it never got to answer."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, prompts: list[Prompt], replies: list[Reply]) -> list[float]:
        return [0.0 if r.calls else call_reward(self.fn, p.row, r.text) for p, r in zip(prompts, replies)]


class RewardModelScorer:
    """A reward model folder (`lmstack reward train`, lmstack/train/reward.py) as a scorer, frozen.
    With the policy's tokenizer it scores the rollout's own tokens, prompt + reply + <|end|>
    (appended when the reply did not close its turn: a truncated reply is scored as it stands),
    read at that final <|end|>, as it was trained. With another tokenizer it scores the
    reply's text (tool calls left out) through `score_answers`."""

    def __init__(self, model_dir, tok: Tokenizer):
        from lmstack.train import reward as rm_lib

        self.lib, self.dir, self.tok = rm_lib, Path(model_dir), tok
        self.rm = freeze(rm_lib.load_reward_model(model_dir))  # UserError when not a reward model
        self.rm_tok = Tokenizer.load(model_dir)
        self.same_tokenizer = self.rm_tok.to_str() == tok.to_str()
        self.end_id = tok.special_ids["<|end|>"]

    def to(self, device):
        self.rm.to(device)
        return self

    def __call__(self, prompts: list[Prompt], replies: list[Reply]) -> list[float]:
        if self.same_tokenizer:
            seqs = [p.ids + r.ids + ([] if r.ids and r.ids[-1] == self.end_id else [self.end_id])
                    for p, r in zip(prompts, replies)]
            ctx = self.rm.cfg.max_seq_len
            seqs = [s[:1] + s[len(s) - ctx + 1:] if len(s) > ctx else s for s in seqs]
            return self.lib.score_sequences(self.rm, seqs, self.tok.pad_id)
        scores = self.lib.score_answers(self.rm, self.rm_tok, [p.messages for p in prompts],
                                        [r.text if r.text.strip() else "(no reply)" for r in replies])
        return [float("nan") if s is None else float(s) for s in scores]


def make_scorer(reward, tok: Tokenizer, prompts_file=None) -> Scorer:
    """A scorer from: a reward model folder, arithmetic | world | python:MODULE:FUNCTION, or a
    Python callable (row, answer) -> float."""
    if callable(reward) and not isinstance(reward, (str, Path)):
        return RowRewardScorer(reward)
    spec = str(reward)
    if spec in BUILTIN or spec.startswith("python:"):
        return RowRewardScorer(load_reward(spec, prompts_file))
    if Path(spec).is_dir():
        return RewardModelScorer(spec, tok)
    raise UserError(f"--reward {spec}: not a reward model folder, nor arithmetic | world | python:MODULE:FUNCTION")


# --------------------------------------------------------------------------- the models

class PolicyValue(GPT):
    """PPO's policy with a value head: a GPT (the same weights, the same forward for the engine)
    plus `value_head`, a Linear on the final normed hidden state, initialised to 0.
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

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """The final normed hidden state [B, T, d] (GPT.forward's training path, without the head)."""
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, idx, start_pos=None, attn_mask=None, slot: int = 0, values: bool = False):
        if not values:
            return super().forward(idx, start_pos, attn_mask, slot)
        h = self.hidden(idx)
        return self.lm_head(h), self.value_head(h).squeeze(-1)


def freeze(model: nn.Module) -> nn.Module:
    """The frozen reference: eval mode, no gradients (it is never given to an optimizer)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tempered_logprobs(logits: torch.Tensor, y: torch.Tensor, temperature: float):
    """(log p(y) [B, T], log-softmax [B, T, V]) of softmax(logits / temperature), in fp32."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, y.clamp_min(0)[..., None])[..., 0], logp_all


# --------------------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    """One phase's rollouts on this rank (what a checkpoint cut inside the phase saves)."""
    phase: int
    prompt_index: list[int]  # into the train prompts, one per row (rows of a group are adjacent)
    replies: list[list[int]]  # reply ids, the stop id included
    finish: list[str]
    calls: list[int]
    rewards: list[float]
    old_logp: list[list[float]]  # per reply token
    ref_logp: list[list[float]]
    values: list[list[float]] | None  # PPO
    seconds: float

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "Rollout":
        return cls(**d)


class RolloutBatches:
    """The batch source of an RL stage (see the module doc). kind: "grpo" | "ppo".

    Micro-batches: GRPO (x, y, mask, old_logp, ref_logp, adv); PPO (x, y, mask, old_logp,
    ref_logp, adv, returns, old_values); all [B, T], mask 1 on reply tokens of y.
    State: {"phase", "pos"} and, inside a phase, the phase's rollouts (so resuming is exact)."""

    def __init__(self, kind: str, policy: GPT, ref: GPT, tok: Tokenizer, prompts: list[Prompt],
                 scorer: Scorer, cfg: RunConfig, rank: int = 0, world_size: int = 1,
                 reward_norm: tuple[float, float] = (0.0, 1.0)):
        assert kind in ("grpo", "ppo") and prompts
        self.kind, self.policy, self.ref, self.tok, self.prompts, self.scorer = kind, policy, ref, tok, prompts, scorer
        self.rl, self.tc, self.rank, self.world = cfg.rl, cfg.train, rank, world_size
        self.B = cfg.train.micro_batch_size
        self.per_rank = cfg.rl.prompts_per_step // world_size
        self.stop_ids = sorted({tok.special_ids[t] for t in TURN_ENDS})
        self.next_phase, self.pos = 0, 0
        self.rollout: Rollout | None = None
        self.order: list[np.ndarray] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.lengths: np.ndarray | None = None
        self._metrics: dict = {}
        self._perm_cache: dict[int, np.ndarray] = {}
        self.reward_norm = reward_norm  # PPO: (mean, std) of the reference's scores; rewards are standardised

    # --- prompts of a phase
    def _prompt_at(self, k: int) -> int:
        epoch, i = divmod(k, len(self.prompts))
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.tc.seed, 17, epoch]).permutation(len(self.prompts))}
        return int(self._perm_cache[epoch][i])

    def phase_prompts(self, phase: int) -> list[int]:
        first = (phase * self.world + self.rank) * self.per_rank
        return [self._prompt_at(k) for k in range(first, first + self.per_rank)]

    def phase_seed(self, phase: int) -> int:
        """Row i of the phase samples with its own generator seeded phase_seed + i (engine)."""
        return int(np.random.default_rng([self.tc.seed, 29, phase, self.rank]).integers(2 ** 31))

    # --- the rollout phase
    def _device(self):
        return next(self.policy.parameters()).device

    @torch.no_grad()
    def collect(self, phase: int) -> Rollout:
        """Sample, score and evaluate the log-probs of one phase's rollouts with the current policy."""
        t0 = time.perf_counter()
        device = self._device()
        self.ref.to(device)
        if hasattr(self.scorer, "to"):
            self.scorer.to(device)
        k = self.rl.group_size
        index = [i for i in self.phase_prompts(phase) for _ in range(k)]
        done = generate_batch(self.policy, [self.prompts[i].ids for i in index], self.rl.max_new_tokens,
                              temperature=self.rl.temperature, top_p=self.rl.top_p if self.rl.top_p < 1 else None,
                              seed=self.phase_seed(phase), stop_ids=self.stop_ids)
        replies = [parse_reply(self.tok, c.ids, c.stop, c.finish_reason) for c in done]
        rewards = [float(r) for r in self.scorer([self.prompts[i] for i in index], replies)]
        ro = Rollout(phase, index, [r.ids for r in replies], [r.finish for r in replies], [r.calls for r in replies],
                     rewards, [], [], [] if self.kind == "ppo" else None, 0.0)
        x, y, mask = self._sequences(ro)
        amp = autocast_dtype(self.tc.dtype, device)
        was_training = self.policy.training
        self.policy.eval()
        try:
            for s in range(0, len(index), self.B):
                sl = slice(s, s + self.B)
                xs, ys = x[sl].to(device), y[sl].to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    if self.kind == "ppo":
                        logits, values = self.policy(xs, values=True)
                    else:
                        logits = self.policy(xs)
                    ref_logits = self.ref(xs)
                old = tempered_logprobs(logits, ys, self.rl.temperature)[0].cpu()
                ref = tempered_logprobs(ref_logits, ys, self.rl.temperature)[0].cpu()
                for j, m in enumerate(mask[sl]):
                    on = m.bool()
                    ro.old_logp.append(old[j][on].tolist())
                    ro.ref_logp.append(ref[j][on].tolist())
                    if self.kind == "ppo":
                        ro.values.append(values[j].float().cpu()[on].tolist())
        finally:
            self.policy.train(was_training)
        ro.seconds = round(time.perf_counter() - t0, 3)
        return ro

    def _sequences(self, ro: Rollout):
        """Rollouts -> right-padded (x, y, mask) [N, T] with T the longest rollout minus one."""
        seqs = [self.prompts[i].ids + r for i, r in zip(ro.prompt_index, ro.replies)]
        T = max(len(s) for s in seqs) - 1
        x = torch.full((len(seqs), T), self.tok.pad_id, dtype=torch.long)
        y = torch.full((len(seqs), T), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, (s, i) in enumerate(zip(seqs, ro.prompt_index)):
            t = torch.tensor(s)
            x[j, :len(s) - 1], y[j, :len(s) - 1] = t[:-1], t[1:]
            mask[j, len(self.prompts[i].ids) - 1:len(s) - 1] = 1
        return x, y, mask

    def _prepare(self, ro: Rollout) -> None:
        """Tensors, advantages, the micro-batch order and the phase's metrics from a Rollout."""
        rl = self.rl
        x, y, mask = self._sequences(ro)
        self.lengths = (mask.shape[1] - mask.flip(1).argmax(1)).numpy()  # through the last reply token
        N, T = x.shape
        old, ref = torch.zeros(N, T), torch.zeros(N, T)
        vals = torch.zeros(N, T)
        for j in range(N):
            on = mask[j].bool()
            old[j, on] = torch.tensor(ro.old_logp[j])
            ref[j, on] = torch.tensor(ro.ref_logp[j])
            if ro.values is not None:
                vals[j, on] = torch.tensor(ro.values[j])
        m = mask.float()
        rewards = torch.tensor(ro.rewards, dtype=torch.float32)
        k1 = (old - ref) * m
        t = {"x": x, "y": y, "mask": mask, "old_logp": old, "ref_logp": ref}
        metrics = {"phase": ro.phase, "reward": rewards.mean().item(),
                   "reward_std": rewards.std(unbiased=False).item()}
        if self.kind == "grpo":
            adv = group_advantages(rewards.view(-1, rl.group_size), rl.method).view(-1)
            t["adv"] = adv[:, None] * m
            groups = rewards.view(-1, rl.group_size)
            metrics.update(pass_rate=(rewards > 0).float().mean().item(),
                           groups_with_signal=(groups.max(1).values > groups.min(1).values).float().mean().item())
        else:
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the reply's last token (in y)
            mean, std = self.reward_norm
            score = (rewards - mean) / std
            token_rewards = -rl.kl_coef * k1
            token_rewards[torch.arange(N), last] += score
            adv, returns = gae(token_rewards, vals, m, rl.gamma, rl.lam)
            n = m.sum()
            mean = adv.sum() / n
            std = (((adv - mean) ** 2 * m).sum() / n).sqrt()
            t["adv"] = (adv - mean) / (std + 1e-8) * m
            t["returns"], t["old_values"] = returns, vals
            metrics.update(score_std=score.mean().item(), score_std_minus_kl=(score - rl.kl_coef * k1.sum(1)).mean().item(),
                           value_mean=((vals * m).sum() / n).item(), return_mean=((returns * m).sum() / n).item())
        n_reply = m.sum(1)
        metrics.update(response_len=n_reply.mean().item(),
                       truncated=float(np.mean([f == "length" for f in ro.finish])),
                       tool_calls=float(np.mean([c > 0 for c in ro.calls])),
                       rollout_kl=(k1.sum() / m.sum()).item(), rollout_kl_seq=k1.sum(1).mean().item(),
                       rollout_s=ro.seconds)
        self.tensors, self._metrics, self.rollout = t, metrics, ro
        self.order = []
        for e in range(rl.epochs):
            perm = np.random.default_rng([self.tc.seed, 31, ro.phase, e, self.rank]).permutation(N)
            self.order += [perm[s:s + self.B] for s in range(0, N, self.B)]

    # --- the loop's interface
    def next(self):
        if self.rollout is None or self.pos >= len(self.order):
            self._prepare(self.collect(self.next_phase))
            self.next_phase, self.pos = self.next_phase + 1, 0
        rows = torch.from_numpy(np.sort(self.order[self.pos]))
        self.pos += 1
        T = int(self.lengths[rows.numpy()].max())
        names = ["x", "y", "mask", "old_logp", "ref_logp", "adv"]
        if self.kind == "ppo":
            names += ["returns", "old_values"]
        return tuple(self.tensors[k][rows, :T] for k in names)

    def metrics(self) -> dict:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        state = {"phase": self.next_phase, "pos": self.pos}
        if self.rollout is not None and 0 < self.pos < len(self.order):  # inside a phase: keep it whole
            state["rollout"] = self.rollout.to_state()
        else:
            state["pos"] = 0
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_phase, self.pos = int(state["phase"]), int(state.get("pos", 0))
        self.rollout = None
        if state.get("rollout") is not None:
            self._prepare(Rollout.from_state(state["rollout"]))
        else:
            self.pos = 0


# --------------------------------------------------------------------------- objectives

class GRPOObjective:
    """Clipped surrogate with the group advantage + kl_coef * k3 KL to the reference, per reply token."""

    def __init__(self, rl):
        self.rl = rl

    def __call__(self, model, batch):
        x, y, mask, old_logp, ref_logp, adv = batch
        logp, logp_all = tempered_logprobs(model(x), y, self.rl.temperature)
        m = mask.to(logp.dtype)
        logp = torch.where(mask > 0, logp, old_logp)  # padding: ratio 1, KL 0 (never inf * 0)
        pg, clipped = ppo_clip_loss(logp, old_logp, adv, self.rl.clip)
        kl = kl_estimates(logp, torch.where(mask > 0, ref_logp, logp.detach()))["k3"]
        loss = pg + self.rl.kl_coef * kl
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        extras = {"kl": (kl * m).sum().detach(), "clip_frac": (clipped * m).sum().detach(),
                  "entropy": (entropy * m).sum().detach(), "pg_loss": (pg * m).sum().detach()}
        return (loss * m).sum(), m.sum(), extras


class PPOObjective:
    """Clipped surrogate with the GAE advantage + vf_coef * clipped value loss, per reply token."""

    def __init__(self, rl):
        self.rl = rl

    def __call__(self, model, batch):
        x, y, mask, old_logp, ref_logp, adv, returns, old_values = batch
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
        return (loss * m).sum(), m.sum(), extras


# --------------------------------------------------------------------------- evaluation

def sample_replies(model, tok: Tokenizer, prompts: list[Prompt], k: int = 1, temperature: float = 0.0,
                   max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64) -> list[list[Reply]]:
    """k replies to each prompt (greedy when temperature is 0), batched; [len(prompts)][k]."""
    stop_ids = sorted({tok.special_ids[t] for t in TURN_ENDS})
    flat = [(i, j) for i in range(len(prompts)) for j in range(k)]
    out: list[list[Reply]] = [[None] * k for _ in prompts]
    ctx = model.cfg.max_seq_len
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        ids = [prompts[i].ids for i, _ in chunk]
        done = generate_batch(model, ids, min(max_new_tokens, ctx - max(len(p) for p in ids)),
                              temperature=temperature, seed=seed + s, stop_ids=stop_ids)
        for (i, j), c in zip(chunk, done):
            out[i][j] = parse_reply(tok, c.ids, c.stop, c.finish_reason)
    return out


def evaluate_prompts(model, tok: Tokenizer, prompts: list[Prompt], scorer: Scorer, max_new_tokens: int = 64,
                     k: int = 1, temperature: float = 0.0, seed: int = 0) -> dict:
    """Rewards of k replies per prompt: {n, k, mean (over all replies), pass@1 (mean fraction of
    a prompt's replies with reward > 0), pass@k (any of its k > 0), rewards [n][k], replies}."""
    replies = sample_replies(model, tok, prompts, k, temperature, max_new_tokens, seed)
    flat_p = [p for p, rs in zip(prompts, replies) for _ in rs]
    flat_r = [r for rs in replies for r in rs]
    scores = scorer(flat_p, flat_r)
    rewards = [scores[i * k:(i + 1) * k] for i in range(len(prompts))]
    return {"n": len(prompts), "k": k, "temperature": temperature,
            "mean": float(np.mean(scores)) if scores else float("nan"),
            "pass@1": float(np.mean([np.mean([s > 0 for s in r]) for r in rewards])) if rewards else float("nan"),
            f"pass@{k}": float(np.mean([any(s > 0 for s in r) for r in rewards])) if rewards else float("nan"),
            "response_len": float(np.mean([len(r.ids) for r in flat_r])) if flat_r else float("nan"),
            "rewards": rewards, "replies": [[r.text for r in rs] for rs in replies]}


# --------------------------------------------------------------------------- config

def reward_stats(ref, tok: Tokenizer, prompts: list[Prompt], scorer: Scorer, cfg: RunConfig) -> list[float]:
    """[mean, std] of the scores of the reference's sampled replies to 2 x rl.prompts_per_step
    prompts: PPO standardises the reward model's score with them (a fixed gain and bias, as in
    Ziegler et al. 2019), so returns, values and the KL penalty are on a known scale."""
    rl, seed = cfg.rl, cfg.train.seed
    pick = np.random.default_rng([seed, 37]).permutation(len(prompts))[:2 * rl.prompts_per_step]
    ev = evaluate_prompts(ref, tok, [prompts[i] for i in pick], scorer, rl.max_new_tokens,
                          temperature=rl.temperature, seed=seed)
    scores = np.array([r[0] for r in ev["rewards"]], dtype=np.float64)
    std = float(np.nanstd(scores))
    return [float(np.nanmean(scores)), std if std > 1e-6 else 1.0]


def _user_int(overrides, key: str, default: int) -> int:
    value = default
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            try:
                value = int(float(v))
            except ValueError:
                pass  # load_config reports it
    return value


def rl_config(preset: str, overrides, base_model, world_size: int = 1) -> RunConfig:
    """The stage's preset + --set, with the model's config (model.* cannot be overridden), and
    train.batch_tokens derived from the rollout batch unless given (see the module doc)."""
    overrides = list(overrides)
    keys = [o.partition("=")[0].strip() for o in overrides]
    bad = [k for k in keys if k.startswith("model.")]
    if bad:
        raise UserError(f"--set {bad[0]}: RL starts from the model as it is (its config.json); "
                        "model.* cannot be changed")
    ctx = base_model.max_seq_len
    p = load_config(preset, [f"model.max_seq_len={2 ** 30}"]).train  # the preset alone
    fit = [f"train.seq_len={ctx}"] if "train.seq_len" not in keys and p.seq_len > ctx else []
    micro = _user_int(overrides, "train.micro_batch_size", p.micro_batch_size)
    seq = _user_int(overrides, "train.seq_len", min(p.seq_len, ctx))
    given_bt = "train.batch_tokens" in keys
    placeholder = [] if given_bt else [f"train.batch_tokens={max(1, micro * seq)}"]
    cfg = load_config(preset, fit + placeholder + overrides + [f"model.max_seq_len={ctx}"])
    cfg.model = dataclasses.replace(base_model)
    rl, tc = cfg.rl, cfg.train
    if rl.temperature <= 0:
        raise UserError("rl.temperature must be > 0 (rollouts are sampled; 0 would be greedy)")
    if rl.prompts_per_step % world_size:
        raise UserError(f"rl.prompts_per_step ({rl.prompts_per_step}) must be a multiple of the world size "
                        f"({world_size})")
    if rl.max_new_tokens >= tc.seq_len:
        raise UserError(f"rl.max_new_tokens ({rl.max_new_tokens}) must be < train.seq_len ({tc.seq_len}): "
                        "a rollout is prompt + reply")
    n = rl.prompts_per_step * rl.group_size  # rollouts per phase, all ranks
    per_rank = n // world_size
    if per_rank % tc.micro_batch_size:
        ranks = f" / {world_size} ranks" if world_size > 1 else ""
        raise UserError(f"rl.prompts_per_step * rl.group_size ({n}{ranks}) "
                        f"must be a multiple of train.micro_batch_size ({tc.micro_batch_size})")
    if not given_bt:
        tc.batch_tokens = n * tc.seq_len
    per_step = tc.batch_tokens // tc.seq_len  # rollouts per optimizer step
    if tc.batch_tokens % tc.seq_len or n % per_step:
        raise UserError(f"train.batch_tokens ({tc.batch_tokens}) must be train.seq_len ({tc.seq_len}) times a divisor "
                        f"of the rollouts per phase (rl.prompts_per_step * rl.group_size = {n})")
    if rl.method == "rloo" and rl.group_size < 2:
        raise UserError("rl.method=rloo needs rl.group_size >= 2")
    cfg.validate()
    return cfg


def steps_per_phase(cfg: RunConfig) -> int:
    n = cfg.rl.prompts_per_step * cfg.rl.group_size
    return cfg.rl.epochs * n // (cfg.train.batch_tokens // cfg.train.seq_len)


# --------------------------------------------------------------------------- the stages

def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def split_value_head(out) -> None:
    """OUT/model.safetensors -> the policy alone (a plain chat model folder) + OUT/value_head.safetensors."""
    from safetensors.torch import load_file, save_file

    path = Path(out) / checkpoint.WEIGHTS
    if not path.is_file():
        return
    sd = load_file(str(path))
    head = {k: v for k, v in sd.items() if k.startswith("value_head.")}
    if not head:
        return
    for name, part in ((VALUE_HEAD, head), (checkpoint.WEIGHTS, {k: v for k, v in sd.items() if k not in head})):
        tmp = Path(out) / f".{name}.tmp"
        save_file(part, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, Path(out) / name)


def _summary(ev: dict | None) -> dict | None:
    if ev is None:
        return None
    return {k: v for k, v in ev.items() if k not in ("rewards", "replies")}


def run_rl(kind: str, model, prompts_file, reward, out, overrides=(), resume: bool = False,
           preset: str | None = None) -> dict:
    """PPO or GRPO from the chat model folder `model` (see the module doc); returns the last
    metrics record with the held-out evaluation under "heldout"."""
    base = Path(model)
    saved = _read_json(base / STAGE)
    if saved and saved.get("stage") == "reward":
        raise UserError(f"{base} is a reward model; the policy must be a chat (SFT) model folder")
    net = checkpoint.load_model(base)  # UserError when not a model folder
    tok = Tokenizer.load(base)
    if tok.vocab_size > net.cfg.vocab_size:
        raise UserError(f"{base}: tokenizer.json has {tok.vocab_size} tokens, the model {net.cfg.vocab_size}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = rl_config(preset or kind, overrides, net.cfg, world_size)
    rl, tc = cfg.rl, cfg.train
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if resume and checkpoint.latest_checkpoint(out_dir) is None:
        raise UserError(f"nothing to resume: {out_dir / checkpoint.STATE} has no checkpoint")
    if not resume and out_dir.is_dir() and any(out_dir.iterdir()):
        raise UserError(f"output folder {out_dir} is not empty (use --resume to continue the run "
                        "in it, or choose another --out)")
    scorer = make_scorer(reward, tok, prompts_file)
    prompts, stats = load_prompts(prompts_file, tok, tc.seq_len - rl.max_new_tokens)
    if not prompts:
        why = ", ".join(f"{n} {k}" for k, n in stats["skipped"].items()) or "empty"
        raise UserError(f"no usable prompts in {prompts_file} ({why})")
    train_prompts, heldout = split_heldout(prompts)
    reward_name = reward if isinstance(reward, (str, Path)) else getattr(reward, "__name__", type(reward).__name__)
    info = {"stage": kind, "base": str(base), "chat": True, "prompts": str(prompts_file), "reward": str(reward_name),
            **stats, "train_prompts": len(train_prompts), "heldout_prompts": len(heldout),
            "steps_per_phase": steps_per_phase(cfg)}
    if resume:
        old = _read_json(out_dir / STAGE) or {}
        if old.get("stage") != kind:
            raise UserError(f"{out_dir} holds no {kind} run to resume (no {STAGE} with stage {kind!r})")
        if _read_json(out_dir / "config.json") != dataclasses.asdict(cfg.model):
            raise UserError(f"--resume with another model than the run in {out_dir} started from ({old.get('base')})")
        keys = ("prompts", "reward", "rows", "usable", "skipped", "train_prompts")
        diff = [k for k in keys if old.get(k) != info.get(k)]
        if diff:
            raise UserError(f"--resume with other prompts or reward than the run in {out_dir} "
                            f"({', '.join(diff)} differ)")
        info["heldout"] = old.get("heldout", {})
        if kind == "ppo":
            info["reward_norm"] = old.get("reward_norm")

    dist = distributed.init(tc.device)
    try:
        main = distributed.is_main()
        seed_everything(tc.seed)
        ref = freeze(checkpoint.load_model(base, dist.device))
        policy = PolicyValue.from_gpt(net) if kind == "ppo" else net
        policy.to(dist.device).train()
        if kind == "ppo" and not info.get("reward_norm"):
            info["reward_norm"] = reward_stats(ref, tok, train_prompts, scorer, cfg)
        if main:
            skipped = ", ".join(f"{n} {k}" for k, n in stats["skipped"].items())
            print(f"{kind} prompts: {len(prompts):,} of {stats['rows']:,} rows ({len(train_prompts):,} train, "
                  f"{len(heldout)} held out)" + (f"; skipped {skipped}" if skipped else ""), flush=True)
            print(f"{kind}: {rl.prompts_per_step} prompts x {rl.group_size} replies per phase, {rl.epochs} epochs, "
                  f"{steps_per_phase(cfg)} optimizer steps per phase, {tc.max_steps} steps", flush=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                info["heldout"] = {}
                if heldout:
                    ev = evaluate_prompts(ref, tok, heldout, scorer, rl.max_new_tokens)
                    info["heldout"]["before"] = _summary(ev)
                    print(f"held out, greedy, {base}: mean reward {ev['mean']:.4f}", flush=True)
            atomic_write_json(out_dir / STAGE, info)
        batches = RolloutBatches(kind, policy, ref, tok, train_prompts, scorer, cfg, dist.rank, dist.world_size,
                                 reward_norm=tuple(info["reward_norm"]) if kind == "ppo" else (0.0, 1.0))
        objective = GRPOObjective(rl) if kind == "grpo" else PPOObjective(rl)
        try:
            record = train(cfg, policy, batches, objective, out_dir, tokenizer_file=base / "tokenizer.json",
                           resume=resume)
        finally:
            if kind == "ppo" and main:
                split_value_head(out_dir)
        if main and heldout:
            ev = evaluate_prompts(policy, tok, heldout, scorer, rl.max_new_tokens)
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
    `reward` (or, as a stand-in, any reward spec / callable `grpo` takes)."""
    return run_rl("ppo", policy, prompts, reward, out, overrides, resume, preset)


