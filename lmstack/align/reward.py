"""Reward model: `lmstack reward train` and `lmstack reward score`.

    lmstack reward train --model runs/small/chat --data runs/small/world/comparisons.jsonl --out runs/small/rm
    lmstack reward score --model runs/small/rm --data answers.jsonl [--out scored.jsonl]

The reward model (`lmstack.model.RewardModel`) is the SFT model's transformer with a scalar
head that reads the final hidden state at the last token of the answer, its closing <|end|>.
It is trained on comparisons (pairs.py) with the Bradley-Terry loss -log sigmoid(r_chosen -
r_rejected), summed over pairs, through THE training loop; `accuracy` (r_chosen > r_rejected)
and `margin` are logged. At the end the held-out pairwise accuracy (overall and by meta.type;
chance 50%) is printed and written to OUT/reward_eval.json.

The folder is a model folder (config.json, tokenizer.json, run.json, metrics.jsonl, state/)
whose model.safetensors holds the SFT weights plus `score_head.weight`, and stage.json
{"stage": "reward", "base": SFT_DIR, ...}. `modelio.load_model(dir, kind="reward")` loads it;
rewards of text: `score_answers(rm, tok, prompts, answers)`; of a batch: `rm(x, last)`.

`reward score` reads jsonl rows {prompt, answer} (adds "score") or {prompt, chosen, rejected}
(adds "score_chosen" and "score_rejected", and prints the pairwise accuracy).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch

from lmstack import distributed
from lmstack.align.pairs import describe, pair_sources, prepare, render_answers
from lmstack.chatformat import prompt_problem, reply_problem
from lmstack.device import pick_device
from lmstack.model import RewardModel
from lmstack.modelio import STAGE, load_model_and_tokenizer
from lmstack.stats import wilson
from lmstack.tokenizer import Tokenizer
from lmstack.train.loop import seed_everything, train
from lmstack.train.objectives import bradley_terry_loss
from lmstack.utils import UserError, atomic_write_json, atomic_write_text, check_output_file, read_jsonl

PRESET = "reward"
EVAL_FILE = "reward_eval.json"


def bt_objective(model, batch):
    """Bradley-Terry over B pairs: (sum of -log sigmoid(r_c - r_r), B, {accuracy, margin})."""
    x, _, _, last = batch
    r = model(x, last)
    B = r.shape[0] // 2
    rc, rr = r[:B], r[B:]
    diff = (rc - rr).detach()
    return bradley_terry_loss(rc, rr).sum(), B, {"accuracy": (diff > 0).sum(), "margin": diff.sum()}


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_sequences(rm: RewardModel, seqs: list, pad_id: int, batch_size: int = 32) -> list[float]:
    """Token-id sequences (each ending with the answer's <|end|>) -> their rewards."""
    was = rm.training
    rm.eval()
    device = rm.embed_tokens.weight.device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths: less padding
    out = [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        T = max(len(seqs[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, :len(seqs[i])] = torch.as_tensor(seqs[i], dtype=torch.long)
        last = torch.tensor([len(seqs[i]) - 1 for i in chunk])
        for i, v in zip(chunk, rm(x.to(device), last.to(device)).tolist()):
            out[i] = v
    rm.train(was)
    return out


def score_answers(rm: RewardModel, tok: Tokenizer, prompts: list, answers: list,
                  batch_size: int = 32) -> list[float | None]:
    """The reward of each (prompt, answer): prompt a string or a list of messages. A prompt too
    long for the context loses its oldest tokens; None when the answer alone does not fit."""
    seqs, where = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        got = render_answers(tok, p, [a], rm.cfg.max_seq_len)
        if got is not None:
            seqs.append(got[0][0][0])
            where.append(i)
    scores: list[float | None] = [None] * len(answers)
    for i, v in zip(where, score_sequences(rm, seqs, tok.pad_id, batch_size)):
        scores[i] = v
    return scores


def pairwise_report(rm: RewardModel, pairs: list, pad_id: int, batch_size: int = 32) -> dict:
    """Pairwise accuracy (r_chosen > r_rejected) of `pairs`, with its 95% interval, overall and
    by pair type; mean margin r_chosen - r_rejected."""
    scores = score_sequences(rm, [p.chosen[0] for p in pairs] + [p.rejected[0] for p in pairs], pad_id, batch_size)
    n = len(pairs)
    groups = defaultdict(list)
    for p, c, r in zip(pairs, scores[:n], scores[n:]):
        groups["all"].append(c - r)
        groups[p.type or "untyped"].append(c - r)

    def summary(d):
        k = sum(x > 0 for x in d)
        return {"n": len(d), "accuracy": k / len(d), "ci": list(wilson(k, len(d))), "margin": sum(d) / len(d)}

    if not n:
        return {"n": 0}
    out = summary(groups.pop("all"))
    out["by_type"] = {t: summary(d) for t, d in sorted(groups.items())}
    return out


def _print_report(title: str, r: dict, file=None) -> None:
    if not r.get("n"):
        print(f"{title}: no pairs", file=file)
        return
    lo, hi = r["ci"]
    print(f"{title}: {100 * r['accuracy']:.1f}% of {r['n']} pairs [95% CI {100 * lo:.1f}-{100 * hi:.1f}], "
          f"mean margin {r['margin']:+.2f} (chance 50%)", file=file)
    if len(r.get("by_type", {})) > 1:
        for t, s in r["by_type"].items():
            lo, hi = s["ci"]
            print(f"  {t:16s} {100 * s['accuracy']:5.1f}% of {s['n']:4d} [{100 * lo:.1f}-{100 * hi:.1f}] "
                  f"margin {s['margin']:+.2f}", file=file)


# --------------------------------------------------------------------------- entry points


def reward_train(model, data, out, overrides=(), resume: bool = False, preset: str = PRESET) -> dict:
    """Train a reward model from the SFT model folder `model` on comparison files `data` into
    `out`; returns the last metrics record with the held-out report under "reward_eval"."""
    run = prepare("reward", model, data, out, overrides, resume, preset)
    cfg, tc = run.cfg, run.cfg.train
    if tc.parallel == "fsdp":  # rank 0 alone scores the held-out pairs afterwards, with the whole model
        raise UserError("the reward model trains with train.parallel=ddp (its report runs on rank 0 alone)")
    pad = run.tok.pad_id
    dist = distributed.init(tc.device)
    try:
        main = distributed.is_main()
        if main:
            print(describe(run), flush=True)
            run.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run.out / STAGE, run.info)
        seed_everything(tc.seed)
        rm = RewardModel.from_gpt(run.net)
        run.net = None  # one copy of the weights
        rm.train()
        batches, eval_batches = pair_sources(run, pad, dist)
        record = train(cfg, rm, batches, bt_objective, run.out, eval_batches=eval_batches,
                       tokenizer_file=run.base / "tokenizer.json", resume=run.resume)
        if main:
            # Held-out pairs (unseen prompts), and as many training pairs, to show the gap.
            report = {"held_out": pairwise_report(rm, run.val_pairs, pad),
                      "train_sample": pairwise_report(rm, run.train_pairs[:max(len(run.val_pairs), 200)], pad),
                      "data": run.info["data"], "step": record.get("step")}
            atomic_write_json(run.out / EVAL_FILE, report)
            _print_report("held-out pairwise accuracy", report["held_out"])
            _print_report("training pairs (sample)", report["train_sample"])
            print(f"reward model -> {run.out} (report: {run.out / EVAL_FILE})", flush=True)
            record = {**record, "reward_eval": report}
        return record
    finally:
        distributed.cleanup()


def reward_score(model, data, out=None, batch_size: int = 32) -> dict:
    """Score the rows of jsonl `data` with the reward model folder `model`: {prompt, answer}
    rows get "score", {prompt, chosen, rejected} rows "score_chosen" / "score_rejected".
    Rows go to `out` (jsonl), else to stdout; returns {rows, scored, pairs, accuracy, ...}."""
    if out is not None:
        check_output_file(out, what="scored .jsonl file")
    rows = []
    for n, row in read_jsonl(data, "data file"):
        why = _score_row_problem(row)
        if why:
            raise UserError(f"{data}:{n}: {why}")
        rows.append(row)
    if not rows:
        raise UserError(f"{data} has no rows")
    rm, tok = load_model_and_tokenizer(model, pick_device("auto"), kind="reward")
    prompts, answers, slots = [], [], []
    for i, row in enumerate(rows):
        for field in (("answer",) if "answer" in row else ("chosen", "rejected")):
            prompts.append(row["prompt"])
            answers.append(row[field])
            slots.append((i, "score" if field == "answer" else f"score_{field}"))
    scores = score_answers(rm, tok, prompts, answers, batch_size)
    for (i, key), s in zip(slots, scores):
        rows[i][key] = s
    pairs = [r for r in rows if "score_chosen" in r and r["score_chosen"] is not None
             and r["score_rejected"] is not None]
    k = sum(r["score_chosen"] > r["score_rejected"] for r in pairs)
    result = {"rows": len(rows), "scored": sum(s is not None for s in scores), "too_long": scores.count(None),
              "pairs": len(pairs)}
    if pairs:
        result.update(accuracy=k / len(pairs), ci=list(wilson(k, len(pairs))))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    info = sys.stdout if out is not None else sys.stderr  # rows on stdout: the summary goes to stderr
    if out is not None:
        atomic_write_text(out, text)
    else:
        sys.stdout.write(text)
    print(f"scored {result['scored']} answers in {len(rows)} rows"
          + (f" ({result['too_long']} too long for the context: score null)" if result["too_long"] else "")
          + (f" -> {out}" if out is not None else ""), file=info)
    if pairs:
        lo, hi = result["ci"]
        print(f"pairwise accuracy (score_chosen > score_rejected): {100 * result['accuracy']:.1f}% of "
              f"{len(pairs)} pairs [95% CI {100 * lo:.1f}-{100 * hi:.1f}]", file=info)
    return result


def _score_row_problem(row) -> str | None:
    if not isinstance(row, dict) or "prompt" not in row:
        return "rows are {prompt, answer} or {prompt, chosen, rejected}"
    fields = ("answer",) if "answer" in row else ("chosen", "rejected")
    for f in fields:
        if f not in row:
            return "rows are {prompt, answer} or {prompt, chosen, rejected}"
        why = reply_problem(row[f])
        if why:
            return f"{f} {why}"
    return prompt_problem(row["prompt"])
