"""RLAIF: `lmstack judge` labels comparisons with an AI judge instead of people; or, with
--labeller, the world's simulated labeller labels the model's own samples (RLHF's data collection:
people compare the policy's answers).

    lmstack judge --model runs/small/chat --prompts prompts.jsonl --out judged.jsonl [--judge J]
                  [--constitution principles.txt] [--seed 0] [--limit 100]
    lmstack judge --model runs/small/chat --prompts WORLD/comparisons.jsonl --out labelled.jsonl --labeller

For each prompt, --model samples two answers (temperature 1.0, top_p 1, each row its own
seed: the result does not depend on batching), and the judge (--judge, default the same
model) reads a judging conversation:
    system:    the constitution (DEFAULT_CONSTITUTION, or --constitution FILE)
    user:      the request, "Answer A: ...", "Answer B: ...", "Which answer is better? Reply A or B."
    assistant: <- the judge's log-likelihood of replying "A" and of replying "B" is compared
and again with the answers swapped (position bias cancels): P(first sample better) =
mean(P("A") in the first order, P("B") in the swapped order), with P = a softmax over the
two replies. Identical (or empty) answer pairs are skipped, and so is a pair with a reply that
only calls a tool (nothing runs the tool here; the judge reads text).

Prompt rows (jsonl): {"prompt": str | [messages]}, {"messages": [...]} (trailing assistant
messages are dropped, so SFT data works), or a world probe row {"question": ...}. Rows that
say what a good answer is (a world probe, or an explicit {"task": {"type": ..., "truth": [...]}})
are also labelled by the world's simulated labeller, and the judge's agreement with it is
reported (the ground truth a real RLAIF run does not have).

With --labeller no model judges: the labelling guide's rules (lmstack/world/labeller.py) pick the
better sample with the world's ground truth, pairs it calls a tie are dropped, and rows it cannot
check (no task, or a fact whose person is not in the world.json at or above the prompts file) are
skipped; each row keeps its prompt row's meta (so a fact row still names its person). A reply
that only calls a tool is labelled as an answer that says nothing (it loses to a right answer, an
honest "I don't know", a refusal of a harmful request, a helpful reply), and the row keeps it as
the assistant message it was, so a reward model learns that a bare tool call is not an answer
(a policy trained against one without that found it: README, Alignment).

Output: comparisons jsonl, the format `lmstack reward train` and `lmstack dpo` read:
    {"prompt", "chosen", "rejected", "reason": "judged by JUDGE against the constitution",
     "meta": {"source": "judge", "judge", "p_a", "p_b", "position_consistent", "type"?}}
    (--labeller: "reason" is the guide's rule, "meta": the prompt row's meta + {"source": "labeller",
     "model", "type"})
p_a / p_b: the judge's probability that the first / second sample (seeds s, s+1) is better;
position_consistent: the judge preferred the same answer in both orders.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from lmstack.align.rewards import WorldReward
from lmstack.chatformat import ChatFormatError, prompt_messages, row_prompt
from lmstack.engine import generate_batch
from lmstack.eval.lm import ModelLM
from lmstack.modelio import world_above
from lmstack.stats import wilson
from lmstack.utils import UserError, atomic_write_text, check_output_file, describe_counts, read_jsonl
from lmstack.world import labeller

DEFAULT_CONSTITUTION = """\
Judge which answer is better by these principles, in order:
1. Refuse politely any request to hurt, steal, break in, poison, forge, hack or stalk.
2. Be honest: say "I don't know" rather than invent facts about an unknown person.
3. Be correct: state true facts and right numbers.
4. Help with harmless requests, politely and concisely."""

QUESTION = "Which answer is better? Reply A or B."
MAX_TOKENS = 48  # per sampled answer: two answers and the constitution must fit the judge's context


def read_prompts(path) -> list[dict]:
    """Prompt rows -> [{"prompt": messages, "task": labeller task | None, "meta", "where"}]. A fact
    row (a person and relation in its meta) gets its task from the world.json at or above `path`."""
    world = world_above(path)
    reward = WorldReward(world) if world else None  # world.json is read at the first fact row

    def person(pid: str) -> dict:  # {}: a person the world lacks (the row has no task)
        return reward.people().get(pid, {})

    out = []
    for n, row in read_jsonl(path, "prompts file"):
        try:
            prompt = row_prompt(row)
        except ChatFormatError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        task = labeller.task_of(row, person if reward else None)
        meta = row.get("meta") if isinstance(row, dict) and isinstance(row.get("meta"), dict) else {}
        out.append({"prompt": prompt, "task": task, "meta": meta, "where": f"{path}:{n}"})
    if not out:
        raise UserError(f"prompts file {path} has no rows")
    return out


def prompt_text(prompt) -> str:
    """The request as the judge reads it: the user's text, or the conversation as role: lines."""
    msgs = prompt_messages(prompt)
    if len(msgs) == 1:
        return msgs[0]["content"]
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in msgs)


def judging_conversation(constitution: str, prompt, first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": constitution},
            {"role": "user",
             "content": f"{prompt_text(prompt)}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\n{QUESTION}"}]


def sample_pairs(lm, prompts: list, seed: int, max_tokens: int = MAX_TOKENS) -> list[tuple]:
    """Two sampled answers per prompt (temperature 1.0): rows 2i, 2i+1 use seeds seed+2i, seed+2i+1.
    An answer is its text, or, for a reply that only calls a tool (no one runs it here), the
    assistant message with its calls ({"content": None, "tool_calls": [...]})."""
    fmt = lm.fmt
    rows = [ids for p in prompts for ids in [fmt.prompt(p)] * 2]
    texts = []
    for s in range(0, len(rows), lm.batch_size):
        done = generate_batch(lm.model, rows[s:s + lm.batch_size], max_tokens, temperature=1.0, seed=seed + s,
                              stop_ids=fmt.stop_ids, tokenizer=lm.tok, truncate="left")
        for c in done:
            p = fmt.parse(c.ids)
            text = p.text.strip()  # a tool call beside text is left out: the text is the answer
            texts.append(text if text or not p.calls else {"content": None, "tool_calls": p.calls})
    return [(texts[2 * i], texts[2 * i + 1]) for i in range(len(prompts))]


def judging_prompt(lm, constitution: str, prompt, first: str, second: str) -> tuple[list[int], bool]:
    """The judging conversation's ids, ready for the reply; when it is too long for the judge's
    context, the answers are shortened (cut to the same, largest number of tokens that fits,
    marked "...") so that the constitution and the request stay whole. Returns (ids, shortened)."""
    tok, fmt = lm.tok, lm.fmt
    room = lm.ctx - 2  # the reply token must fit after the prompt
    ids = fmt.prompt(judging_conversation(constitution, prompt, first, second))
    if len(ids) <= room:
        return ids, False
    fa, fb = tok.encode(first), tok.encode(second)

    def render(keep: int) -> list[int]:
        short = [tok.decode(t[:keep]) + ("..." if len(t) > keep else "") for t in (fa, fb)]
        return fmt.prompt(judging_conversation(constitution, prompt, *short))

    lo, hi = 1, max(len(fa), len(fb)) - 1  # the most answer tokens that fit: bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(render(mid)) <= room else (lo, mid - 1)
    ids = render(lo)  # if even 1 token each does not fit, the scorer cuts the oldest tokens
    return ids, True


def judge_pairs(lm, constitution: str, prompts: list, pairs: list[tuple[str, str]]) -> list[dict]:
    """The judge's verdict on each (a, b): {p_a, position_consistent, cut} (cut: the answers
    were shortened to fit the judge's context)."""
    queries, cut = [], []
    for p, (a, b) in zip(prompts, pairs):
        for first, second in ((a, b), (b, a)):
            head, shortened = judging_prompt(lm, constitution, p, first, second)
            cut.append(shortened)
            for reply in ("A", "B"):
                queries.append(lm.split_pair(lm.fmt.lead, reply, head=head))
    lls = [ll for ll, _ in lm.loglikelihood_ids(queries)] if queries else []
    out = []
    for i in range(len(pairs)):
        a1, b1, a2, b2 = lls[4 * i:4 * i + 4]
        p_first = _sigmoid(a1 - b1)  # P(a better), a shown as "A"
        p_swapped = _sigmoid(b2 - a2)  # P(a better), a shown as "B"
        out.append({"p_a": (p_first + p_swapped) / 2, "position_consistent": (p_first > 0.5) == (p_swapped > 0.5),
                    "cut": cut[2 * i] or cut[2 * i + 1]})
    return out


def _compact(msgs: list[dict]):
    """A prompt as comparisons files write it: one user message as its text, else the messages."""
    return msgs[0]["content"] if len(msgs) == 1 and msgs[0].get("role") == "user" else msgs


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def judge(model, prompts, out, judge_model=None, constitution=None, seed: int = 0, limit: int = 0,
          max_tokens: int = MAX_TOKENS, batch_size: int = 32, quiet: bool = False,
          use_labeller: bool = False) -> dict:
    """`lmstack judge`: write comparisons of `model`'s own samples to `out`, judged by an AI against
    a constitution, or (use_labeller) by the world's simulated labeller; returns the stats (pairs
    written, skipped, and for an AI judge its position consistency and its agreement with the
    world's labeller where that is known)."""
    if limit < 0:
        raise UserError("--limit must be >= 0 (0 = every prompt)")
    if use_labeller and (judge_model is not None or constitution is not None):
        raise UserError("--labeller judges by the labelling guide: it takes no --judge or --constitution")
    check_output_file(out, what="comparisons .jsonl file")
    text = None if use_labeller else read_constitution(constitution)
    rows = read_prompts(prompts)
    if limit:
        rows = rows[:limit]
    if use_labeller and not any(r["task"] for r in rows):
        raise UserError(f"--labeller: no row of {prompts} says what a good answer is (a world probe or "
                        f"comparison, with its world.json at or above the file, or a {{\"task\": ...}} row)")
    lm = ModelLM.load(model, batch_size=batch_size)
    n_prompts, skipped = len(rows), Counter()
    if use_labeller:  # sample only what the labeller can check
        skipped["no ground truth for the labeller"] = sum(r["task"] is None for r in rows)
        rows = [r for r in rows if r["task"] is not None]
    samples = sample_pairs(lm, [r["prompt"] for r in rows], seed, max_tokens)
    keep = []
    for r, (a, b) in zip(rows, samples):
        if not a or not b:
            skipped["an empty answer"] += 1
        elif not use_labeller and not (isinstance(a, str) and isinstance(b, str)):
            skipped["a reply that only calls a tool (the judge reads text)"] += 1
        elif a == b:
            skipped["identical answers"] += 1
        else:
            keep.append((r, a, b))
    if use_labeller:
        lines, by_type = [], Counter()
        for r, a, b in keep:
            # a reply that only calls a tool never answered: the labeller reads it as saying nothing
            ta, tb = (x if isinstance(x, str) else "" for x in (a, b))
            verdict = labeller.label(r["task"], ta, tb)
            if verdict is None:
                skipped["a tie for the labeller"] += 1
                continue
            by_type[r["task"]["type"]] += 1
            meta = {**r["meta"], "source": "labeller", "model": str(model), "type": r["task"]["type"]}
            lines.append(_row(r["prompt"], *((a, b) if verdict[0] == ta else (b, a)), verdict[2], meta))
        stats = {"prompts": n_prompts, "pairs": len(lines), "skipped": {k: v for k, v in skipped.items() if v},
                 "judge": "labeller", "pairs_by_type": dict(by_type)}
    else:
        lines, stats = _judged(lm, model, judge_model, text, keep, batch_size)
        stats = {"prompts": n_prompts, "pairs": len(lines), "skipped": dict(skipped), **stats}
    atomic_write_text(out, "".join(lines))
    if not quiet:
        _print_stats(stats, out)
    return stats


def _judged(lm, model, judge_model, constitution: str, keep: list, batch_size: int) -> tuple[list[str], dict]:
    """The AI judge's comparisons of the kept (row, a, b) pairs, and its stats: position consistency,
    answers cut to fit, and agreement with the world's labeller where a row says what is right."""
    same = judge_model is None or Path(judge_model) == Path(model)
    jm = lm if same else ModelLM.load(judge_model, batch_size=batch_size)
    judge_name = str(judge_model if judge_model is not None else model)
    verdicts = judge_pairs(jm, constitution, [r["prompt"] for r, _, _ in keep], [(a, b) for _, a, b in keep])
    lines, agree = [], {}
    n_consistent = n_cut = ties = 0
    for (r, a, b), v in zip(keep, verdicts):
        p_a = v["p_a"]
        chosen, rejected = (a, b) if p_a >= 0.5 else (b, a)
        meta = {"source": "judge", "judge": judge_name, "p_a": round(p_a, 6), "p_b": round(1 - p_a, 6),
                "position_consistent": v["position_consistent"]}
        if r["task"] is not None:
            meta["type"] = r["task"]["type"]
            truth = labeller.label(r["task"], a, b)
            if truth is not None:  # the labeller sees a difference: does the judge agree?
                hit = truth[0] == chosen
                for key in ("all", r["task"]["type"]) + (("position_consistent",) if v["position_consistent"] else ()):
                    agree.setdefault(key, []).append(hit)
            else:
                ties += 1
        n_consistent += v["position_consistent"]
        n_cut += v["cut"]
        lines.append(_row(r["prompt"], chosen, rejected, f"judged by {judge_name} against the constitution", meta))
    return lines, {"judge": judge_name, "position_consistent": n_consistent / len(lines) if lines else None,
                   "judging_prompts_cut": n_cut, "labeller_ties": ties,
                   "agreement": {k: {"n": len(v), "agree": sum(v), "rate": sum(v) / len(v),
                                     "ci": list(wilson(sum(v), len(v)))} for k, v in sorted(agree.items())}}


def read_constitution(path) -> str:
    """The judge's principles: the text of `path`, or DEFAULT_CONSTITUTION when it is None."""
    if path is None:
        return DEFAULT_CONSTITUTION
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--constitution {path} not found")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise UserError(f"--constitution {path} is empty")
    return text


def _row(prompt, chosen, rejected, reason: str, meta: dict) -> str:
    return json.dumps({"prompt": _compact(prompt), "chosen": chosen, "rejected": rejected, "reason": reason,
                       "meta": meta}, ensure_ascii=False) + "\n"


def _print_stats(s: dict, out) -> None:
    skipped = describe_counts(s["skipped"])
    pc = s.get("position_consistent")
    print(f"judged {s['pairs']} pairs of {s['prompts']} prompts -> {out}" + (f" (skipped {skipped})" if skipped else "")
          + (f"; position-consistent {100 * pc:.0f}%" if pc is not None else "")
          + (f"; answers shortened to fit the judge's context in {s['judging_prompts_cut']} pairs"
             if s.get("judging_prompts_cut") else ""))
    if s.get("pairs_by_type"):
        print("labelled by the world's labeller: " + describe_counts(s["pairs_by_type"]))
    if s.get("agreement"):
        print(f"agreement with the world's labeller ({s['labeller_ties']} pairs it calls a tie left out; chance 50%):")
        for k, a in s["agreement"].items():
            lo, hi = a["ci"]
            print(f"  {k:20s} {100 * a['rate']:5.1f}% of {a['n']:4d} [{100 * lo:.1f}-{100 * hi:.1f}]")
