"""Direct preference optimisation: `lmstack dpo`.

    lmstack dpo --model runs/small/chat --data runs/small/world/comparisons.jsonl --out runs/small/dpo
    lmstack dpo ... --set pref.beta=0.2 --set optim.lr=5e-5

DPO (Rafailov et al. 2023) optimises the preference directly, with no reward model and no
sampling: the policy (starting from the SFT weights) and a frozen reference (a second copy of
the SFT weights, never updated) score both answers of each comparison (sum of the answer's
token log-probs); the loss is -log sigmoid(beta * [(log pi - log ref)(chosen) - (log pi -
log ref)(rejected)]) (objectives.dpo_loss), summed over pairs, through THE training loop.
beta (pref.beta) is the strength of the implicit KL penalty: higher keeps the policy closer
to the reference. By default each pair's loss also has the chosen answer's mean token NLL
(pref.nll_weight, 10 by default: RPO, Pang et al. 2024, whose weight is 1; see DPOObjective;
0 is plain DPO; the README has what each weight did on the speedrun's world).
Logged per step (and as val_* on held-out pairs): chosen_reward and rejected_reward
(beta * log pi/ref of each answer), margin (their difference), accuracy (margin > 0) and
chosen_nll (the NLL term, nats per token).

The output is an ordinary chat model folder (the policy's weights) with stage.json
{"stage": "dpo", "base": SFT_DIR, "chat": true}: `lmstack eval`, `chat`, `serve` take it.
"""

from __future__ import annotations

import torch

from lmstack import distributed
from lmstack.align.pairs import describe, pair_sources, prepare
from lmstack.modelio import STAGE
from lmstack.train.loop import frozen_copy, seed_everything, train
from lmstack.train.objectives import dpo_loss, token_logprobs
from lmstack.utils import atomic_write_json

PRESET = "dpo"


def answer_logprobs(model, x, y, mask) -> torch.Tensor:
    """Sum of log p(answer token) per row, [rows]."""
    return (token_logprobs(model, x, y) * mask).sum(-1)


class DPOObjective:
    """objective(policy, batch) for the loop: the reference is held here, frozen, and only ever
    run under no_grad (so it is never updated, whatever the optimizer holds).

    nll_weight > 0 adds nll_weight x the chosen answer's mean per-token negative log-likelihood
    to each pair's loss (RPO, Pang et al. 2024): plain DPO only widens the gap, and lets the
    chosen answers' own probability fall with the rejected ones (and with it the <|end|> that
    closes them); the NLL term holds it up."""

    def __init__(self, reference: torch.nn.Module, beta: float, nll_weight: float = 0.0):
        self.reference, self.beta, self.nll_weight = reference, beta, nll_weight

    def __call__(self, model, batch):
        x, y, mask, _ = batch
        B = x.shape[0] // 2
        if self.reference.training:  # someone called .train() on everything: stay in eval mode
            self.reference.eval()
        with torch.no_grad():
            ref = answer_logprobs(self.reference, x, y, mask)
        pol = answer_logprobs(model, x, y, mask)
        loss, chosen, rejected = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], self.beta)
        margin = chosen - rejected
        extras = {"chosen_reward": chosen.sum(), "rejected_reward": rejected.sum(),
                  "margin": margin.sum(), "accuracy": (margin > 0).sum()}
        if self.nll_weight:
            nll = -pol[:B] / mask[:B].sum(-1).clamp_min(1)
            loss = loss + self.nll_weight * nll
            extras["chosen_nll"] = nll.detach().sum()
        return loss.sum(), B, extras


def dpo(model, data, out, overrides=(), resume: bool = False, preset: str = PRESET,
        nll_weight: float | None = None) -> dict:
    """DPO from the SFT model folder `model` on comparison files `data` into `out`; returns the
    last metrics record. nll_weight: an override of pref.nll_weight (checked with the rest of the
    config, and recorded in it); see DPOObjective; 0 is plain DPO."""
    if nll_weight is not None:
        overrides = [*overrides, f"pref.nll_weight={nll_weight}"]
    run = prepare("dpo", model, data, out, overrides, resume, preset)
    cfg, tc = run.cfg, run.cfg.train
    nll_weight = cfg.pref.nll_weight
    run.info.update(beta=cfg.pref.beta, nll_weight=nll_weight)
    pad = run.tok.pad_id
    dist = distributed.init(tc.device)
    try:
        main = distributed.is_main()
        if main:
            print(describe(run) + f"; beta {cfg.pref.beta}" + (f", nll_weight {nll_weight}" if nll_weight else ""),
                  flush=True)
            run.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run.out / STAGE, run.info)
        seed_everything(tc.seed)
        policy = run.net
        # The SFT weights, before train() moves the policy or loads a checkpoint into it on --resume.
        reference = frozen_copy(policy).to(dist.device)
        policy.train()
        objective = DPOObjective(reference, cfg.pref.beta, nll_weight)
        batches, eval_batches = pair_sources(run, pad, dist)
        record = train(cfg, policy, batches, objective, run.out, eval_batches=eval_batches,
                       tokenizer_file=run.base / "tokenizer.json", resume=run.resume)
        if main:
            val = {k: v for k, v in record.items() if k.startswith("val_")}
            if val:
                print("held-out pairs: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in sorted(val.items())), flush=True)
            print(f"DPO model -> {run.out} (a chat model: lmstack eval / chat / serve take it)", flush=True)
        return record
    finally:
        distributed.cleanup()
