"""`lmstack think beam`: a step-level search over a scratchpad, guided by a process verifier.

A reply asked to think step by step is a list of lines (steps). The search keeps `beam` partial
solutions per problem; each round it samples `expand` next lines for every unfinished one, the
process verifier (a reward model trained on partial solutions, lmstack/think/verifier.py)
scores every candidate prefix, and the best `beam` survive (finished ones compete with the rest).
A solution is finished when its line starts "Answer:" or the model ends its turn; the answer is
the last number of the best-scored finished solution. Every generated token is counted, so the
search is compared with sampling at the same compute (`lmstack think curve`).
"""

from __future__ import annotations

import json
from collections import defaultdict

from lmstack.stats import summarize
from lmstack.think.curve import PROMPT, command_problems
from lmstack.utils import UserError, atomic_write_json, check_output_file
from lmstack.world.labeller import final_number


def beam_search(lm, prm, problems: list[dict], prompt: str = PROMPT, beam: int = 4, expand: int = 4,
                temperature: float = 0.8, max_steps: int = 12, step_tokens: int = 48, seed: int = 0) -> dict:
    """Search every problem at once (each round is one batched generation and one scoring pass)."""
    from lmstack.align.reward import score_answers

    rm, rm_tok = prm
    convs = [[{"role": "user", "content": prompt.format(**p)}] for p in problems]
    heads = [lm.fmt.prompt(c) for c in convs]
    beams = [[("", 0.0, False)] for _ in problems]  # (text so far, verifier score, finished)
    tokens = 0
    for step in range(max_steps):
        todo = [(i, text) for i, b in enumerate(beams) for text, _, done in b if not done]
        if not todo:
            break
        prompts = [heads[i] + (lm.fmt.text_ids(text + "\n") if text else []) for i, text in todo for _ in range(expand)]
        outs = lm.generate(prompts, step_tokens, until=["\n"], stop_ids=lm.fmt.stop_ids, temperature=temperature,
                           seed=seed + 1009 * step)
        cands = defaultdict(dict)  # problem -> text -> finished
        for i, b in enumerate(beams):
            for text, _, done in b:
                if done:
                    cands[i][text] = True
        for n, (i, text) in enumerate(todo):
            for c in outs[n * expand:(n + 1) * expand]:
                tokens += len(c.ids)
                line = c.text.strip("\n")
                line = line if text else line.removeprefix(lm.fmt.lead)  # the reply's text starts after it
                new = f"{text}\n{line}" if text else line
                cands[i][new] = c.stop != "\n" or line.startswith("Answer:")
        # an empty candidate (the model ended its turn at once) is no message to render: it scores lowest
        flat = [(i, t, d) for i in sorted(cands) for t, d in cands[i].items()]
        read = [x for x in flat if x[1].strip()]
        scores = dict(zip(((i, t) for i, t, _ in read),
                          score_answers(rm, rm_tok, [convs[i] for i, _, _ in read], [t for _, t, _ in read])))
        best = defaultdict(list)
        for i, t, d in flat:
            s = scores.get((i, t))
            best[i].append((t, float("-inf") if s is None else s, d))
        for i, b in best.items():
            beams[i] = sorted(b, key=lambda x: -x[1])[:beam]
    results = []
    for p, b in zip(problems, beams):
        finished = [x for x in b if x[2]] or b
        text, score, _ = max(finished, key=lambda x: x[1])
        results.append({"problem": p, "text": text, "score": score, "answer": final_number(text),
                        "hit": int(final_number(text) == str(p["answer"]))})
    return {"problems": len(problems), **summarize([r["hit"] for r in results]), "tokens": tokens,
            "tokens_per_problem": tokens / max(1, len(problems)), "beam": beam, "expand": expand,
            "results": results}


def think_beam(model, prm, out, problems=None, world=None, digits=(2, 3), limit: int = 0, beam: int = 4,
               expand: int = 4, temperature: float = 0.8, prompt: str = PROMPT, max_steps: int = 12,
               batch_size: int = 64, seed: int = 0) -> dict:
    """The command: load, search, write OUT (a JSON file: the summary and every problem's result)."""
    from lmstack.eval.lm import ModelLM
    from lmstack.modelio import load_model_and_tokenizer

    if beam < 1 or expand < 1:
        raise UserError("--beam and --expand must be at least 1")
    rows = command_problems(problems, world, digits, limit, seed)
    out = check_output_file(out, what=".json file")
    lm = ModelLM.load(model, batch_size=batch_size)
    rm = load_model_and_tokenizer(prm, kind="reward")
    res = beam_search(lm, rm, rows, prompt, beam, expand, temperature, max_steps, seed=seed)
    res.update(model=str(model), verifier=str(prm), temperature=temperature)
    atomic_write_json(out, res)
    print(json.dumps({k: v for k, v in res.items() if k != "results"}))
    return res
