"""`lmstack think curve`: turn thinking time into accuracy, and measure the exchange rate.

For each problem (by default the world's held-out arithmetic probes, never in any training
text), the model answers once greedily and n times sampled at `temperature`, each reply asked
with `prompt` (by default "... Think step by step.": the world's assistant then writes its
worked steps before "Answer: a op b = c"). The final answer of a reply is its last number.
From the n samples (estimators.py) the curve for k = 1, 2, 4, ..., n:

    pass@k      oracle: some sample of k is right (unbiased estimator)
    majority@k  self-consistency: the most frequent answer of k is right
    verifier@k  best-of-k: the sample a verifier (a reward model folder) scores highest is right

against samples k, generated tokens (k x the mean reply length) and generation FLOPs (tokens x
the model's FLOPs per token), each point with a 95% bootstrap interval over problems; greedy
with its Wilson interval. Written to OUT: curve.json, curve.md (the table), curve.png, and
samples.jsonl (every reply, its answer, hit and score) so a curve can be re-scored without
sampling again.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmstack.stats import summarize
from lmstack.think.estimators import best_of_k, bootstrap_ci, ks_up_to, majority_at_k, pass_at_k
from lmstack.utils import UserError, atomic_output_dir, check_output_dir, read_jsonl
from lmstack.world.labeller import final_number

PROMPT = "{question} Think step by step."


def load_problems(path, where: dict | None = None, limit: int = 0, seed: int = 0) -> list[dict]:
    """jsonl rows with "question" and "answer" (extra fields are kept as slices), filtered by
    `where` {field: [values]}, at most `limit` (a seeded sample, in file order)."""
    import random

    rows = []
    for i, r in read_jsonl(path, what="problems file"):
        if not isinstance(r, dict) or "question" not in r or "answer" not in r:
            raise UserError(f"{path}:{i}: a problem row needs \"question\" and \"answer\"")
        rows.append(r)
    for key, values in (where or {}).items():
        rows = [r for r in rows if r.get(key) in values]
    if not rows:
        raise UserError(f"{path}: no problems left after the filter {where}")
    if limit and limit < len(rows):
        keep = set(random.Random(seed).sample(range(len(rows)), limit))
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def command_problems(problems, world, digits, limit: int, seed: int) -> list[dict]:
    """A think command's problems: --problems FILE, or --world's arithmetic probes of --digits."""
    if problems is not None:
        return load_problems(problems, None, limit, seed)
    if world is None:
        raise UserError("give --problems FILE (rows with question and answer) or --world DIR")
    return load_problems(Path(world) / "probes" / "arithmetic.jsonl", {"digits": list(digits)} if digits else None,
                         limit, seed)


def sample(lm, problems: list[dict], prompt: str = PROMPT, n: int = 16, temperature: float = 0.8,
           max_tokens: int = 192, seed: int = 0, tools=None) -> list[dict]:
    """Each problem's greedy reply and n sampled ones, with their final answers, hits and
    lengths in tokens (the thinking the reply cost)."""
    convs = []
    for r in problems:
        try:
            convs.append([{"role": "user", "content": prompt.format(**r)}])
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"--prompt {prompt!r}: {e!r} is not a field of the problem rows") from None
    greedy = lm.chat(convs, max_tokens, tools=tools)
    sampled = lm.chat([c for c in convs for _ in range(n)], max_tokens, tools=tools, temperature=temperature,
                      seed=seed)
    out = []
    for j, r in enumerate(problems):
        truth = str(r["answer"])
        rec = {"problem": r, "truth": truth, "greedy": _reply(lm, greedy[j], truth), "samples": []}
        rec["samples"] = [_reply(lm, s, truth) for s in sampled[j * n:(j + 1) * n]]
        out.append(rec)
    return out


def ask(model, question: str, k: int = 16, temperature: float = 0.8, max_tokens: int = 192, verifier=None,
        seed: int = 0) -> dict:
    """`lmstack think ask`: one question, k sampled replies, the answer by majority vote (and by
    the verifier's best reply when given): self-consistency for a user, not a benchmark."""
    from collections import Counter

    from lmstack.eval.lm import ModelLM
    from lmstack.modelio import load_model_and_tokenizer

    if k < 1:
        raise UserError(f"--k must be at least 1 (got {k})")
    lm = ModelLM.load(model)
    rm = load_model_and_tokenizer(verifier, kind="reward") if verifier else None
    records = sample(lm, [{"question": question, "answer": ""}], "{question}", k, temperature, max_tokens, seed)
    replies = records[0]["samples"]
    votes = Counter(r["answer"] for r in replies if r["answer"] is not None)
    out = {"question": question, "k": k, "votes": dict(votes.most_common()),
           "answer": votes.most_common(1)[0][0] if votes else None,
           "replies": [r["text"] for r in replies]}
    if rm is not None:
        score_with_verifier(records, rm, "{question}")
        best = max(replies, key=lambda r: r["score"])
        out.update(verifier_answer=best["answer"], verifier_reply=best["text"])
    return out


def _reply(lm, reply, truth: str) -> dict:
    answer = final_number(reply.text)
    return {"text": reply.text, "answer": answer, "hit": int(answer == truth), "tokens": len(lm.tok.encode(reply.text))}


def score_with_verifier(records: list[dict], verifier, prompt: str = PROMPT) -> None:
    """Add each sample's verifier score (a reward model: `lmstack.align.reward` folder). An empty
    reply (the model ended its turn at once) has no answer and is no message to render: it
    scores lowest without being read."""
    from lmstack.align.reward import score_answers
    rm, tok = verifier
    prompts, answers, where = [], [], []
    for i, rec in enumerate(records):
        msgs = [{"role": "user", "content": prompt.format(**rec["problem"])}]
        for j, s in enumerate(rec["samples"]):
            if not s["text"].strip():
                s["score"] = float("-inf")
                continue
            prompts.append(msgs)
            answers.append(s["text"])
            where.append((i, j))
    for (i, j), v in zip(where, score_answers(rm, tok, prompts, answers)):
        records[i]["samples"][j]["score"] = float("-inf") if v is None else v


def curve(records: list[dict], flops_per_token: float = 0.0, draws: int = 256, seed: int = 0) -> dict:
    """The curve's points (see the module doc) from sampled records."""
    n = min(len(r["samples"]) for r in records)
    if n < 1:
        raise UserError("no samples to draw a curve from (n must be at least 1)")
    scored = all("score" in s for r in records for s in r["samples"])
    mean_tokens = sum(s["tokens"] for r in records for s in r["samples"][:n]) / (n * len(records))
    greedy_tokens = sum(r["greedy"]["tokens"] for r in records) / len(records)
    points = []
    for k in ks_up_to(n):
        per = {"pass": [], "majority": [], "verifier": []}
        for i, r in enumerate(records):
            s = r["samples"][:n]
            hits = [x["hit"] for x in s]
            per["pass"].append(pass_at_k(n, sum(hits), k))
            per["majority"].append(majority_at_k([x["answer"] for x in s], r["truth"], k, draws, seed + i))
            if scored:
                per["verifier"].append(best_of_k([x["score"] for x in s], hits, k, seed + i))
        point = {"k": k, "tokens": k * mean_tokens, "flops": k * mean_tokens * flops_per_token}
        for name, vals in per.items():
            if vals:
                point[name] = {"acc": sum(vals) / len(vals), "ci": bootstrap_ci(vals, seed=seed)}
        points.append(point)
    greedy = summarize([r["greedy"]["hit"] for r in records])
    greedy.update(tokens=greedy_tokens, flops=greedy_tokens * flops_per_token)
    best_majority = max(points, key=lambda p: p["majority"]["acc"])
    # Where self-consistency saturates: the smallest k within one point of its best.
    saturates = next(p["k"] for p in points if p["majority"]["acc"] >= best_majority["majority"]["acc"] - 0.01)
    return {"problems": len(records), "n": n, "greedy": greedy, "points": points, "verifier": scored,
            "sample_pass@1": points[0]["pass"]["acc"], "majority_saturates_at_k": saturates,
            "gain_over_greedy": best_majority["majority"]["acc"] - greedy["acc"]}


def slices(records: list[dict], field: str, **kw) -> dict:
    """The curve per value of a problem field (e.g. digits)."""
    groups: dict = {}
    for r in records:
        groups.setdefault(str(r["problem"].get(field)), []).append(r)
    return {key: curve(rs, **kw) for key, rs in sorted(groups.items())}


def table(result: dict) -> str:
    """curve.md: one row per k."""
    g = result["greedy"]
    head = "| k | tokens | pass@k (oracle) | majority@k | verifier best-of-k |\n|---|---|---|---|---|\n"
    rows = [f"| greedy | {g['tokens']:.0f} | | {_pct(g['acc'], g['ci'])} | |"]
    for p in result["points"]:
        v = _pct(p["verifier"]["acc"], p["verifier"]["ci"]) if "verifier" in p else "—"
        rows.append(f"| {p['k']} | {p['tokens']:.0f} | {_pct(p['pass']['acc'], p['pass']['ci'])} | "
                    f"{_pct(p['majority']['acc'], p['majority']['ci'])} | {v} |")
    return head + "\n".join(rows) + "\n"


def _pct(acc: float, ci) -> str:
    return f"{100 * acc:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def plot(result: dict, path: Path, title: str = "") -> None:
    """Accuracy against samples k (log2 axis): oracle, majority, verifier, greedy."""
    import matplotlib

    matplotlib.use("Agg")  # no display; before pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = [p["k"] for p in result["points"]]
    for name, label in (("pass", "pass@k (oracle)"), ("majority", "majority vote"), ("verifier", "best-of-k by verifier")):
        if name not in result["points"][0]:
            continue
        acc = [100 * p[name]["acc"] for p in result["points"]]
        lo = [100 * p[name]["ci"][0] for p in result["points"]]
        hi = [100 * p[name]["ci"][1] for p in result["points"]]
        ax.plot(ks, acc, marker="o", label=label)
        ax.fill_between(ks, lo, hi, alpha=0.2)
    g = result["greedy"]
    ax.axhline(100 * g["acc"], color="black", linestyle="--", label=f"greedy ({100 * g['acc']:.1f}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel(f"samples per problem k (x {result['points'][0]['tokens']:.0f} tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or f"thinking time -> accuracy ({result['problems']} problems)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def think_curve(model, out, problems=None, world=None, digits=(2, 3), limit: int = 0, n: int = 16,
                temperature: float = 0.8, prompt: str = PROMPT, max_tokens: int = 192, verifier=None,
                batch_size: int = 64, seed: int = 0, force: bool = False, by: str = "digits") -> dict:
    """The whole command: sample, (score,) estimate, write OUT (see the module doc)."""
    from lmstack.eval.lm import ModelLM
    from lmstack.modelio import load_model_and_tokenizer

    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    rows = command_problems(problems, world, digits, limit, seed)
    problems = problems or Path(world) / "probes" / "arithmetic.jsonl"
    check_output_dir(out, force)
    lm = ModelLM.load(model, batch_size=batch_size)
    rm = load_model_and_tokenizer(verifier, kind="reward") if verifier else None  # fail before sampling
    records = sample(lm, rows, prompt, n, temperature, max_tokens, seed)
    if rm is not None:
        score_with_verifier(records, rm, prompt)
    # Generation FLOPs per token: the forward third of the training count, at the mean context.
    context = sum(len(lm.tok.encode(prompt.format(**r))) for r in rows) / len(rows) + max_tokens / 4
    fpt = lm.model.flops_per_token(int(context)) / 3
    kw = dict(flops_per_token=fpt, seed=seed)
    result = {"model": str(model), "problems_file": str(problems), "prompt": prompt, "temperature": temperature,
              "max_tokens": max_tokens, "verifier": str(verifier) if verifier else None, **curve(records, **kw)}
    if by and all(by in r["problem"] for r in records):
        result["by"] = {by: slices(records, by, **kw)}
    with atomic_output_dir(out, force) as tmp:
        (tmp / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "curve.md").write_text(table(result))
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        plot(result, tmp / "curve.png")
    return result
