"""The rollout phase of RL (rl.py): prompts, replies sampled from the current policy, rewards.

A prompts file's rows become `Prompt`s (rendered, a held-out split kept aside); a `Scorer` turns
(prompt, reply) pairs into rewards (a reward function of the row and the answer, or a frozen
reward model). `RolloutBatches` is an RL stage's batch source for THE training loop: each phase
samples replies from the very module the loop trains (so the rollouts are the current policy's),
scores them, computes the log-probs of the rollout policy and of the frozen reference once, the
advantages, and serves the rollouts `rl.epochs` times. Log-probs everywhere are of the tempered
distribution the rollouts were sampled from. With tools (GRPO), the tool results are context the
policy did not write: they stay out of the loss. A phase cut by a checkpoint is saved whole, so
a resumed run sees exactly the batches it would have (README: Alignment, how the stages are
built).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmstack.align import reward as rm_lib
from lmstack.align.rewards import BUILTIN, call_reward, load_reward
from lmstack.chatformat import ChatFormatError, chat_format, row_prompt
from lmstack.config import RunConfig
from lmstack.device import autocast_dtype
from lmstack.engine import generate_batch
from lmstack.model import GPT
from lmstack.modelio import load_model_and_tokenizer
from lmstack.tokenizer import Tokenizer
from lmstack.toolloop import ToolLoop
from lmstack.tools import default_registry
from lmstack.train.loop import freeze
from lmstack.train.objectives import gae, group_advantages
from lmstack.utils import UserError, read_jsonl

HELDOUT_EVERY = 20  # every 20th prompt is held out (when there are at least 2 x 20)
HELDOUT_MAX = 200


# --------------------------------------------------------------------------- prompts

@dataclass
class Prompt:
    messages: list[dict]  # the conversation the reply answers (ends with a user or tool message)
    ids: list[int]  # rendered with the generation prompt (<|assistant|> last)
    row: dict  # the jsonl row, for the reward


def load_prompts(path, tok: Tokenizer, max_len: int) -> tuple[list[Prompt], dict]:
    """Every usable row of a jsonl prompts file, rendered; stats {rows, usable, skipped: {why: n}}.
    Prompts longer than max_len tokens are skipped (a rollout must fit train.seq_len)."""
    fmt = chat_format(tok)
    prompts, skipped = [], Counter()
    for _, row in read_jsonl(path, "prompts file", skipped):
        try:
            msgs = row_prompt(row)
            ids = fmt.prompt(msgs)
        except ChatFormatError as e:
            skipped[str(e).split(": ", 1)[-1]] += 1
            continue
        if len(ids) > max_len:
            skipped[f"longer than {max_len} tokens"] += 1
            continue
        prompts.append(Prompt(msgs, ids, row))
    rows = len(prompts) + sum(skipped.values())
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
    ids: list[int]  # the sampled tokens, the stop id that closed the reply included (and tool results)
    text: str  # the final answer: the text of the last assistant turn outside tool calls
    calls: int  # tool calls in it (opened, closed or not)
    finish: str  # "stop" | "length"
    env: list[int] = dataclasses.field(default_factory=list)  # positions in ids the tools wrote, not the policy
    unanswered: int = 0  # tool calls in the last turn (no result came back)


def parse_reply(tok: Tokenizer, ids: list[int], stop: int | None, finish: str) -> Reply:
    """One reply's ids (no tool rounds) as a Reply: its text outside tool calls, its calls."""
    p = chat_format(tok).parse(ids)
    return Reply(list(ids) + ([stop] if isinstance(stop, int) else []), p.text.strip(), p.opened, finish,
                 unanswered=p.opened)


def sample(model, tok: Tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
           seed: int, top_p: float | None = None, tools=None, tool_rounds: int = 0) -> list[Reply]:
    """Replies to id prompts through the engine (one batched call per round). With a tool
    registry, a reply that ends its turn after a tool call gets the results and goes on, up to
    `tool_rounds` times (THE tool loop, continuing the sampled ids: the results' positions are
    listed in Reply.env, left out of the loss); max_new_tokens bounds the whole reply, tool
    results included. Row i samples with seed + i (+ a per-round offset)."""
    fmt = chat_format(tok)
    loop = ToolLoop(fmt, prompt_ids, tools, tool_rounds if tools is not None else 0, max_new_tokens,
                    continuation=True)
    while todo := loop.next_round():
        done = generate_batch(model, [loop.prompt(i) for i in todo], [loop.budget(i) for i in todo],
                              temperature=temperature, top_p=top_p, seed=seed + 1_000_003 * loop.round,
                              stop_ids=sorted(fmt.stop_ids))
        for i, c in zip(todo, done):
            loop.add(i, c.ids, c.stop, c.finish_reason)
    return [Reply(t.ids[t.start:], t.text.strip(), t.calls, t.finish, t.env, unanswered=t.unanswered)
            for t in loop.turns]


Scorer = Callable[[list[Prompt], list[Reply]], list[float]]


class RowRewardScorer:
    """A reward callable (row, answer text) -> float as a scorer. A reply whose last turn calls a
    tool scores 0: it never got to answer (no tools given to the stage, or no rounds left)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, prompts: list[Prompt], replies: list[Reply]) -> list[float]:
        return [0.0 if r.unanswered else call_reward(self.fn, p.row, r.text) for p, r in zip(prompts, replies)]


class RewardModelScorer:
    """A reward model folder (`lmstack reward train`, lmstack/align/reward.py) as a scorer, frozen.
    With the policy's tokenizer it scores the rollout's own tokens, prompt + reply + <|end|>
    (appended when the reply did not close its turn: a truncated reply is scored as it stands),
    read at that final <|end|>, as it was trained. With another tokenizer it scores the
    reply's text (tool calls left out) through `score_answers`."""

    def __init__(self, model_dir, tok: Tokenizer):
        self.dir, self.tok = Path(model_dir), tok
        rm, self.rm_tok = load_model_and_tokenizer(model_dir, kind="reward")  # UserError when not a reward model
        self.rm = freeze(rm)
        self.same_tokenizer = self.rm_tok.to_str() == tok.to_str()
        self.end_id = chat_format(tok).end_id

    def to(self, device):
        self.rm.to(device)
        return self

    def __call__(self, prompts: list[Prompt], replies: list[Reply]) -> list[float]:
        if self.same_tokenizer:
            seqs = [p.ids + r.ids + ([] if r.ids and r.ids[-1] == self.end_id else [self.end_id])
                    for p, r in zip(prompts, replies)]
            ctx = self.rm.cfg.max_seq_len
            seqs = [s[:1] + s[len(s) - ctx + 1:] if len(s) > ctx else s for s in seqs]
            return rm_lib.score_sequences(self.rm, seqs, self.tok.pad_id)
        scores = rm_lib.score_answers(self.rm, self.rm_tok, [p.messages for p in prompts],
                                      [r.text if r.text.strip() else "(no reply)" for r in replies])
        return [float("nan") if s is None else float(s) for s in scores]


class EnsembleScorer:
    """Several reward models as one cautious scorer, so that PPO cannot climb the blind spot of a
    single one (Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization").
    Each member's score is first standardised by its own mean and std on the reference's replies
    (`calibrate`, once, before PPO's first phase), so members on different scales count alike;
    the reward is then their minimum (how="min", worst-case optimisation: a reply scores high
    only when every member agrees) or their mean (how="mean")."""

    def __init__(self, members: list[RewardModelScorer], how: str = "min"):
        assert members and how in ("min", "mean"), (len(members), how)
        self.members, self.how = members, how
        self.norms: list[list[float]] | None = None  # [mean, std] per member

    def to(self, device):
        for m in self.members:
            m.to(device)
        return self

    def member_scores(self, prompts: list[Prompt], replies: list[Reply]) -> np.ndarray:
        """Raw scores [members, replies]."""
        return np.array([m(prompts, replies) for m in self.members], dtype=np.float64)

    def calibrate(self, prompts: list[Prompt], replies: list[Reply]) -> list[list[float]]:
        raw = self.member_scores(prompts, replies)
        std = np.nanstd(raw, axis=1)
        self.norms = [[float(m), float(s) if s > 1e-6 else 1.0] for m, s in zip(np.nanmean(raw, axis=1), std)]
        return self.norms

    def __call__(self, prompts: list[Prompt], replies: list[Reply]) -> list[float]:
        z = self.member_scores(prompts, replies)
        if self.norms is not None:
            norms = np.array(self.norms)
            z = (z - norms[:, :1]) / norms[:, 1:]
        return (z.min(axis=0) if self.how == "min" else z.mean(axis=0)).tolist()


def make_scorer(reward, tok: Tokenizer, prompts_file=None, ensemble: str = "min") -> Scorer:
    """A scorer from: a reward model folder, arithmetic | world | python:MODULE:FUNCTION, a
    Python callable (row, answer) -> float, or a list of reward model folders (an
    `EnsembleScorer` combining them by `ensemble`: min | mean)."""
    if isinstance(reward, (list, tuple)):
        if len(reward) == 1:
            return make_scorer(reward[0], tok, prompts_file)
        if not reward or not all(isinstance(r, (str, Path)) and Path(r).is_dir() for r in reward):
            raise UserError(f"--reward: an ensemble is of reward model folders, not {', '.join(map(str, reward))}")
        return EnsembleScorer([RewardModelScorer(r, tok) for r in reward], ensemble)
    if callable(reward) and not isinstance(reward, (str, Path)):
        return RowRewardScorer(reward)
    spec = str(reward)
    if spec in BUILTIN or spec.startswith("python:"):
        return RowRewardScorer(load_reward(spec, prompts_file))
    if Path(spec).is_dir():
        return RewardModelScorer(spec, tok)
    raise UserError(f"--reward {spec}: not a reward model folder, nor arithmetic | world | python:MODULE:FUNCTION")


# --------------------------------------------------------------------------- rollouts

def tempered_logprobs(logits: torch.Tensor, y: torch.Tensor, temperature: float):
    """(log p(y) [B, T], log-softmax [B, T, V]) of softmax(logits / temperature), in fp32."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp_all.gather(-1, y.clamp_min(0)[..., None])[..., 0], logp_all


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
    env: list[list[int]] | None = None  # per reply: positions that tools wrote (not trained on)

    def to_state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "Rollout":
        return cls(**d)


class RolloutBatches:
    """The batch source of an RL stage. kind: "grpo" | "ppo". A phase:
      1. the next rl.prompts_per_step prompts (shuffled, epoch after epoch), rl.group_size
         replies to each from the current policy, until a turn end or rl.max_new_tokens;
      2. rewards: a reply whose last turn calls a tool scores 0 under a row reward (it never
         answered);
      3. with no gradient, once: old_logp (the rollout policy), ref_logp (the frozen
         reference), PPO's values;
      4. advantages: GRPO / RLOO one per reply from its group, on every reply token; PPO per
         token by GAE on r_t = -kl_coef * (old_logp - ref_logp)_t + the standardised score at
         the reply's last token, whitened over the batch;
      5. rl.epochs passes, reshuffled, as micro-batches of train.micro_batch_size rollouts.
    Micro-batches: GRPO (x, y, mask, old_logp, ref_logp, adv); PPO (x, y, mask, old_logp,
    ref_logp, adv, returns, old_values); all [B, T], mask 1 on reply tokens of y; with `ptx`,
    followed by its next packed SFT batch (x, y, mask, doc_ids) ("PPO-ptx", rl.py).
    `metrics()`: the phase's reward (mean, std), pass rate and groups with signal (GRPO), reply
    length, truncated and tool-call fractions, KL of the rollout policy to the reference.
    `tools`: the registry the rollouts may call (rl.tools through `tool_registry`: run_rl builds
    it once, for the rollouts and the held-out evaluation alike; GRPO only); None: no tools.
    State: {"phase", "pos"} and, inside a phase, the phase's rollouts (so resuming is exact)."""

    def __init__(self, kind: str, policy: GPT, ref: GPT, tok: Tokenizer, prompts: list[Prompt],
                 scorer: Scorer, cfg: RunConfig, rank: int = 0, world_size: int = 1,
                 reward_norm: tuple[float, float] = (0.0, 1.0), tools=None, ptx=None):
        assert kind in ("grpo", "ppo") and prompts
        self.kind, self.policy, self.ref, self.tok, self.prompts, self.scorer = kind, policy, ref, tok, prompts, scorer
        self.rl, self.tc, self.rank, self.world = cfg.rl, cfg.train, rank, world_size
        self.B = cfg.train.micro_batch_size
        self.per_rank = cfg.rl.prompts_per_step // world_size
        self.next_phase, self.pos = 0, 0
        self.rollout: Rollout | None = None
        self.order: list[np.ndarray] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.lengths: np.ndarray | None = None
        self._metrics: dict = {}
        self._perm_cache: dict[int, np.ndarray] = {}
        self.reward_norm = reward_norm  # PPO: (mean, std) of the reference's scores; rewards are standardised
        self.tools = tools
        self.ptx = ptx  # "PPO-ptx": a source of packed SFT windows, one batch appended to each micro-batch

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
        replies = sample(self.policy, self.tok, [self.prompts[i].ids for i in index], self.rl.max_new_tokens,
                         self.rl.temperature, self.phase_seed(phase), self.rl.top_p if self.rl.top_p < 1 else None,
                         self.tools, self.rl.tool_rounds)
        rewards = [float(r) for r in self.scorer([self.prompts[i] for i in index], replies)]
        ro = Rollout(phase, index, [r.ids for r in replies], [r.finish for r in replies], [r.calls for r in replies],
                     rewards, [], [], [] if self.kind == "ppo" else None, 0.0,
                     [r.env for r in replies] if self.tools is not None else None)
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
            start = len(self.prompts[i].ids) - 1  # y position of the reply's first token
            mask[j, start:len(s) - 1] = 1
            for e in (ro.env[j] if ro.env else ()):  # tool results: in the context, not in the loss
                mask[j, start + e] = 0
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
        batch = tuple(self.tensors[k][rows, :T] for k in names)
        return batch + self.ptx.next() if self.ptx is not None else batch

    def metrics(self) -> dict:
        return dict(self._metrics)

    def state_dict(self) -> dict:
        state = {"phase": self.next_phase, "pos": self.pos}
        if self.rollout is not None and 0 < self.pos < len(self.order):  # inside a phase: keep it whole
            state["rollout"] = self.rollout.to_state()
        else:
            state["pos"] = 0
        if self.ptx is not None:
            state["ptx"] = self.ptx.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.next_phase, self.pos = int(state["phase"]), int(state.get("pos", 0))
        if self.ptx is not None and "ptx" in state:
            self.ptx.load_state_dict(state["ptx"])
        self.rollout = None
        if state.get("rollout") is not None:
            self._prepare(Rollout.from_state(state["rollout"]))
        else:
            self.pos = 0


# --------------------------------------------------------------------------- evaluation

def tool_registry(names: str):
    """rl.tools ("calculator,...") -> the registry the rollouts may call, or None for no tools."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        return None
    registry = default_registry()
    unknown = [n for n in wanted if n not in registry.names()]
    if unknown:
        raise UserError(f"rl.tools: unknown tool(s) {', '.join(unknown)} (known: {', '.join(registry.names())})")
    return registry.subset(wanted)


def sample_replies(model, tok: Tokenizer, prompts: list[Prompt], k: int = 1, temperature: float = 0.0,
                   max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, tools=None,
                   tool_rounds: int = 0) -> list[list[Reply]]:
    """k replies to each prompt (greedy when temperature is 0), batched; [len(prompts)][k]."""
    flat = [(i, j) for i in range(len(prompts)) for j in range(k)]
    out: list[list[Reply]] = [[None] * k for _ in prompts]
    ctx = model.cfg.max_seq_len
    for s in range(0, len(flat), batch_size):
        chunk = flat[s:s + batch_size]
        ids = [prompts[i].ids for i, _ in chunk]
        replies = sample(model, tok, ids, min(max_new_tokens, ctx - max(len(p) for p in ids)), temperature,
                         seed + s, tools=tools, tool_rounds=tool_rounds)
        for (i, j), r in zip(chunk, replies):
            out[i][j] = r
    return out


def evaluate_prompts(model, tok: Tokenizer, prompts: list[Prompt], scorer: Scorer, max_new_tokens: int = 64,
                     k: int = 1, temperature: float = 0.0, seed: int = 0, tools=None, tool_rounds: int = 0) -> dict:
    """Rewards of k replies per prompt: {n, k, mean (over all replies), pass@1 (mean fraction of
    a prompt's replies with reward > 0), pass@k (any of its k > 0), rewards [n][k], replies}."""
    replies = sample_replies(model, tok, prompts, k, temperature, max_new_tokens, seed, tools=tools,
                             tool_rounds=tool_rounds)
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


def reward_stats(ref, tok: Tokenizer, prompts: list[Prompt], scorer: Scorer, cfg: RunConfig) -> list[float]:
    """[mean, std] of the scores of the reference's sampled replies to 2 x rl.prompts_per_step
    prompts: PPO standardises the reward model's score with them (a fixed gain and bias, as in
    Ziegler et al. 2019), so returns, values and the KL penalty are on a known scale. An
    `EnsembleScorer` not yet calibrated is calibrated on these same replies first (its members'
    scales; the caller saves `scorer.norms` for a resume)."""
    rl, seed = cfg.rl, cfg.train.seed
    pick = np.random.default_rng([seed, 37]).permutation(len(prompts))[:2 * rl.prompts_per_step]
    picked = [prompts[i] for i in pick]
    replies = [rs[0] for rs in sample_replies(ref, tok, picked, 1, rl.temperature, rl.max_new_tokens, seed)]
    if isinstance(scorer, EnsembleScorer) and scorer.norms is None:
        scorer.calibrate(picked, replies)  # each member standardised on the same replies
    scores = np.array(scorer(picked, replies), dtype=np.float64)
    std = float(np.nanstd(scores))
    return [float(np.nanmean(scores)), std if std > 1e-6 else 1.0]
