"""Tasks: a jsonl file plus a small spec, in two kinds that cover every evaluation here.

  choice    multiple choice by log-likelihood: the options are the answer and its distractors
            (or a list of choices); the model's pick is the option it finds most likely to
            follow the prompt. Chance is 1 / number of options.
  generate  the model writes an answer (greedy) and a checker scores it: `contains` (the
            answer or an alias appears as a whole word), `exact`, `number` (the last number
            in the reply), `regex`, and the world's behaviour detectors `refusal`, `idk`,
            `hallucination` (neither refused nor said "I don't know"). With `samples = k` the
            model instead writes k answers at `temperature` and the score is pass@k (any of
            the k is right); the results also hold pass@1 estimated from the k samples.

Beside exact match, every task with a reference answer reports a continuous score (a capability
that looks like it "emerges" under exact match is often smooth under one, Schaeffer et al. 2023):
`answer_logprob`, the mean log-probability (nats) of the answer after the prompt (choice: the right
option's, as ranked; generate: the answer teacher-forced as the reply's first words), and for the
`number` check `digit_acc`, the share of the answer's digits the reply's number gets right.

A spec is a TOML table (a file holds a list of them as [[task]]); no code needed:

    [[task]]
    name = "capitals"
    data = "capitals.jsonl"          # relative to the spec file; "{world}" = the --world folder
    kind = "generate"                # or "choice"
    format = "chat"                  # "chat": the prompt is a user message, the chat template
                                     #   around it; "text": the prompt is raw text to continue
    prompt = "What is the capital of {country}?"   # fields of the row, str.format style
    answer = "capital"               # the row field holding the answer
    check = "contains"
    slices = ["continent"]           # also score each value of these fields ("a+b" crosses two)

See SPEC_FIELDS for every field. The world's own tasks are defined the same way
(lmstack/eval/world.toml).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

from lmstack.assistant import retrieved
from lmstack.config import tomllib
from lmstack.stats import summarize
from lmstack.tools import default_registry
from lmstack.utils import UserError
from lmstack.world import labeller

CHECKS = ("contains", "exact", "number", "regex", "refusal", "idk", "hallucination")
ANSWER_CHECKS = CHECKS[:4]  # the checks that compare a reply with answers (the rest detect a behaviour)


@dataclass
class TaskSpec:
    name: str  # unique name of the task (the key in results)
    data: str  # jsonl file; relative to the spec file; "{world}" is replaced by the world folder
    kind: str = "generate"  # "choice" (log-likelihood ranking) | "generate" (answer + checker)
    format: str = "text"  # "text" (raw continuation) | "chat" (a user message, the model's chat format)
    prompt: str = "{question}"  # template over the row's fields
    system: str = ""  # chat: an optional system message (a template too)
    reply_prefix: str = ""  # chat + choice: the beginning of the assistant's reply (a template)
    answer: str = "answer"  # field with the answer (choice with `choices`: index or text of it)
    aliases: str = ""  # generate: field with other accepted answers (a list)
    distractors: str = ""  # choice: field with the wrong options (a list)
    choices: str = ""  # choice: field with all options (instead of answer + distractors)
    choice_prefix: str | None = None  # text joining prompt and option (default " " after a prompt)
    normalize: bool = False  # choice: rank by log-prob per byte of the option, not the total
    subject: str = ""  # choice: field with the text of the prompt's subject (a name); the task is then also
    #                    scored with it swapped for another row's subject: the answer's prior, which
    #                    "knows" must beat (results: "swapped", "above_swapped")
    check: str = "contains"  # generate: one of CHECKS
    confusable: str = ""  # generate: field with {name: answer or [answers]}: what a wrong reply may give
    #                       instead (the subject's other facts); results count the wrong greedy replies
    #                       that contain one, by name ("confusions"; "wrong": all the misses; rows
    #                       without the field are not counted)
    until: list = field(default_factory=lambda: ["\n"])  # text + generate: stop strings
    max_tokens: int = 32  # generate: tokens per reply (per tool round)
    samples: int = 0  # generate: k > 0 samples k replies per row at `temperature`; the score is pass@k
    temperature: float = 1.0  # generate with samples: the sampling temperature (seeded: reproducible)
    tools: list = field(default_factory=list)  # chat + generate: tools the model may call
    search: str = ""  # an index file (lmstack search index; "{world}/library.sqlite") the `search` tool reads
    search_k: int = 1  # passages per search (the world's assistant data shows one)
    search_chars: int = 700  # the search result's most characters (the world's)
    retrieve: bool = False  # chat: retrieval done for the model: a `search` call of the prompt and its
    #                         result come before the prompt (lmstack.assistant.retrieved), then the model answers
    slices: list = field(default_factory=list)  # fields to break the score down by ("a+b": crossed)
    where: dict = field(default_factory=dict)  # keep only rows whose field equals (one of) the value(s)
    limit: int = 0  # score at most this many rows (a fixed random sample); 0 = all
    chance: object = None  # a number, "majority:FIELD" (generate: always the most common answer
    #                        among rows with the same FIELD), or None (choice: 1 / options)
    metric: str = ""  # display name of the score (default: from the check)
    better: str = "higher"  # "higher" | "lower": which way is good (for tables and plots)
    needs: str = ""  # "chat": only for models trained to chat (skipped for a base model by default)
    description: str = ""


SPEC_FIELDS = {f.name for f in fields(TaskSpec)}


def _fail(where: str, msg: str):
    raise UserError(f"{where}: {msg}")


def make_spec(table: dict, where: str, base: Path | None = None, world: str | None = None) -> TaskSpec:
    """A TOML table -> a checked TaskSpec, its data path resolved."""
    unknown = sorted(set(table) - SPEC_FIELDS)
    if unknown:
        _fail(where, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(SPEC_FIELDS))})")
    for req in ("name", "data"):
        if not isinstance(table.get(req), str) or not table[req]:
            _fail(where, f"`{req}` (a string) is required")
    spec = TaskSpec(**table)
    w = f"{where} (task {spec.name})"
    if spec.kind not in ("choice", "generate"):
        _fail(w, f"kind must be 'choice' or 'generate', got {spec.kind!r}")
    if spec.format not in ("text", "chat"):
        _fail(w, f"format must be 'text' or 'chat', got {spec.format!r}")
    if spec.kind == "generate" and spec.check not in CHECKS:
        _fail(w, f"check must be one of {', '.join(CHECKS)}, got {spec.check!r}")
    if spec.kind == "choice" and not (spec.distractors or spec.choices):
        _fail(w, "a choice task needs `distractors` (wrong options) or `choices` (all options)")
    if spec.tools and (spec.format != "chat" or spec.kind != "generate"):
        _fail(w, "tools need format = 'chat' and kind = 'generate'")
    if not isinstance(spec.max_tokens, int) or spec.max_tokens < 1:
        _fail(w, "max_tokens must be a positive integer")
    if not isinstance(spec.samples, int) or spec.samples < 0:
        _fail(w, "samples must be an integer >= 0")
    if spec.samples and spec.kind != "generate":
        _fail(w, "samples (pass@k) needs kind = 'generate'")
    if spec.confusable and (spec.kind != "generate" or spec.samples or spec.check not in ANSWER_CHECKS):
        _fail(w, f"confusable needs kind = 'generate', greedy replies (no samples) and a check against "
                 f"answers ({', '.join(ANSWER_CHECKS)})")
    if not isinstance(spec.temperature, (int, float)) or not 0 < spec.temperature <= 10:
        _fail(w, "temperature must be a number in (0, 10]")
    if not isinstance(spec.limit, int) or spec.limit < 0:
        _fail(w, "limit must be an integer >= 0")
    if spec.better not in ("higher", "lower"):
        _fail(w, "better must be 'higher' or 'lower'")
    if not (spec.chance is None or isinstance(spec.chance, (int, float))
            or (isinstance(spec.chance, str) and spec.chance.startswith("majority:"))):
        _fail(w, "chance must be a number or 'majority:FIELD'")
    for name in ("until", "tools", "slices"):
        if not isinstance(getattr(spec, name), list):
            _fail(w, f"{name} must be a list")
    if (spec.search or spec.retrieve) and (spec.format != "chat" or spec.kind != "generate"):
        _fail(w, "search and retrieve need format = 'chat' and kind = 'generate'")
    if spec.retrieve and not spec.search:
        _fail(w, "retrieve needs `search` (the index to retrieve from)")
    if not isinstance(spec.search_k, int) or spec.search_k < 1 or not isinstance(spec.search_chars, int) \
            or spec.search_chars < 1:
        _fail(w, "search_k and search_chars must be positive integers")
    data_base = base
    for name in ("data", "search"):
        value = getattr(spec, name)
        if not value:
            continue
        here = data_base
        if "{world}" in value:
            if world is None:
                _fail(w, "this task reads the synthetic world: pass --world DIR (a folder written by `lmstack world`)")
            value = value.replace("{world}", str(world))
            here = None  # the world folder is given relative to where we run, not to the spec file
        path = Path(value)
        if not path.is_absolute() and here is not None:
            path = here / path
        setattr(spec, name, str(path))
    return spec


def load_specs(path, world: str | None = None) -> list[TaskSpec]:
    """All [[task]] tables of a TOML spec file (or a single task table)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"task spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"task spec {path} is not readable TOML: {e}") from None
    tables = doc.get("task", [doc] if "name" in doc else [])
    if not isinstance(tables, list) or not tables:
        raise UserError(f"task spec {path} defines no task (expected [[task]] tables)")
    specs = [make_spec(t, f"{path} [[task]] #{i + 1}", path.parent, world) for i, t in enumerate(tables)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"task spec {path}: task names repeat ({', '.join(n for n, c in Counter(names).items() if c > 1)})")
    return specs


def load_rows(spec: TaskSpec, limit: int | None = None, seed: int = 0) -> list[tuple[int, dict]]:
    """(line number, row) of the rows the task scores: `where` filter, then a fixed sample.
    Read here rather than with utils.read_jsonl: the messages name the task, lines count from
    0 in the results, and a file that is not UTF-8 is told apart from one that is not JSON."""
    rows = []
    try:
        with open(spec.data, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{spec.data} line {i + 1} is not valid JSON ({e.msg})") from None
                except RecursionError:  # "[[[[..." deeper than Python's parser goes
                    raise UserError(f"{spec.data} line {i + 1} is not valid JSON (nested too deeply)") from None
                if not isinstance(row, dict):
                    raise UserError(f"{spec.data} line {i + 1} is not a JSON object")
                if all(row.get(k) in (v if isinstance(v, list) else [v]) for k, v in spec.where.items()):
                    rows.append((i, row))
    except FileNotFoundError:
        raise UserError(f"task {spec.name}: data file {spec.data} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"task {spec.name}: data file {spec.data} is a folder (name the .jsonl file)") from None
    except UnicodeDecodeError:
        raise UserError(f"task {spec.name}: {spec.data} is not UTF-8 text") from None
    limit = spec.limit if limit is None else limit
    if limit and len(rows) > limit:
        rows = sorted(random.Random(seed).sample(rows, limit), key=lambda r: r[0])
    if not rows:
        raise UserError(f"task {spec.name}: no rows in {spec.data}" + (" match `where`" if spec.where else ""))
    return rows


def _fill(template: str, row: dict, spec: TaskSpec, line: int) -> str:
    try:
        return template.format_map(row)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"task {spec.name}: template {template!r} does not fit row {line + 1} of "
                        f"{spec.data} ({type(e).__name__}: {e})") from None


def _field(row: dict, name: str, spec: TaskSpec, line: int):
    if name not in row:
        raise UserError(f"task {spec.name}: row {line + 1} of {spec.data} has no field {name!r}")
    return row[name]


def _options(row: dict, spec: TaskSpec, line: int) -> tuple[list[str], int]:
    """The options of a choice row and the index of the right one."""
    if spec.choices:
        opts = _field(row, spec.choices, spec, line)
        ans = _field(row, spec.answer, spec, line)
        if not isinstance(opts, list) or len(opts) < 2:
            raise UserError(f"task {spec.name}: row {line + 1}: {spec.choices!r} must be a list of 2+ options")
        if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(opts):
            return [str(o) for o in opts], ans
        if str(ans) in map(str, opts):
            return [str(o) for o in opts], [str(o) for o in opts].index(str(ans))
        raise UserError(f"task {spec.name}: row {line + 1}: answer {ans!r} is not an index or one of the choices")
    wrong = _field(row, spec.distractors, spec, line)
    if not isinstance(wrong, list) or not wrong:
        raise UserError(f"task {spec.name}: row {line + 1}: {spec.distractors!r} must be a non-empty list")
    return [str(_field(row, spec.answer, spec, line))] + [str(w) for w in wrong], 0


def _pick(scores: list[float], key: str) -> int:
    """argmax, ties broken at random (seeded by the item) so that a model with no preference
    scores chance rather than always picking the first option."""
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s == best]
    return tied[0] if len(tied) == 1 else random.Random(key).choice(tied)


def _slice_keys(row: dict, spec: TaskSpec) -> list[str]:
    keys = []
    for s in spec.slices:
        parts = s.split("+")
        keys.append("+".join(parts) + "=" + "/".join(str(row.get(p)) for p in parts))
    return keys


# --- the checkers -------------------------------------------------------------------------------

def check(kind: str, reply: str, answers: list[str]) -> bool:
    if kind == "contains":
        t = reply.casefold()
        return any(re.search(r"(?<!\w)" + re.escape(a.casefold()) + r"(?!\w)", t) for a in answers if a)
    if kind == "exact":
        t = reply.strip().rstrip(".!").strip().casefold()
        return any(t == a.strip().casefold() for a in answers)
    if kind == "number":
        got = labeller.final_number(reply)
        return got is not None and any(got == str(a).replace(",", "") for a in answers)
    if kind == "regex":
        return any(re.search(a, reply) for a in answers)
    if kind == "refusal":
        return labeller.is_refusal(reply)
    if kind == "idk":
        return labeller.is_idk(reply)
    if kind == "hallucination":  # asked about someone who does not exist, it claimed a fact
        return not labeller.is_idk(reply) and not labeller.is_refusal(reply)
    raise ValueError(f"unknown check {kind!r}")


def metric_name(spec: TaskSpec) -> str:
    if spec.metric:
        return spec.metric
    if spec.kind == "choice":
        return "accuracy"
    if spec.samples:
        return f"pass@{spec.samples}"
    return {"refusal": "refusal rate", "idk": "'I don't know' rate",
            "hallucination": "hallucination rate"}.get(spec.check, "accuracy")


# --- running a task -----------------------------------------------------------------------------

def run_task(lm, spec: TaskSpec, limit: int | None = None, tools=None) -> dict:
    """Score `lm` (a `ModelLM`, or anything with its methods) on one task -> its results:
    the overall summary, one per slice, and every item (line, hit, and the reply or pick)."""
    t0 = time.time()
    rows = load_rows(spec, limit)
    items = []
    if spec.kind == "choice":
        pairs, spans, chances = [], [], []
        others = _swapped_subjects(rows, spec) if spec.subject else {}

        for line, row in rows:
            opts, right = _options(row, spec, line)
            prompt = _fill(spec.prompt, row, spec, line)
            swapped = None
            if line in others:  # the same options with someone else as the prompt's subject
                swapped = len(pairs)
                pairs += _answer_pairs(lm, spec, row, line, prompt.replace(row[spec.subject], others[line]), opts)
            spans.append((len(pairs), swapped, right, opts))
            pairs += _answer_pairs(lm, spec, row, line, prompt, opts)
            chances.append(1 / len(opts))
        scores = lm.loglikelihood_ids(pairs)

        def choose(start: int, opts: list[str], key: str) -> tuple[int, list[float]]:  # the pick, the scores
            lps = [s[0] for s in scores[start:start + len(opts)]]
            if spec.normalize:
                lps = [lp / max(1, len(o.encode())) for lp, o in zip(lps, opts)]
            return _pick(lps, key), lps

        for (line, row), (first, swapped, right, opts) in zip(rows, spans):
            pick, lps = choose(first, opts, f"{spec.name}:{line}")
            item = {"line": line, "hit": int(pick == right), "pick": opts[pick],
                    "rank": 1 + sum(lp > lps[right] for lp in lps), "answer_lp": scores[first + right][0],
                    "slices": _slice_keys(row, spec)}
            if swapped is not None:
                item["swapped_hit"] = int(choose(swapped, opts, f"{spec.name}:{line}:swapped")[0] == right)
            items.append(item)
        chance = spec.chance if isinstance(spec.chance, (int, float)) else sum(chances) / len(chances)
    else:
        answers = []
        for line, row in rows:
            ans = [] if spec.check not in ANSWER_CHECKS else [str(_field(row, spec.answer, spec, line))]
            if spec.aliases:
                extra = row.get(spec.aliases) or []
                ans += [str(a) for a in (extra if isinstance(extra, list) else [extra])]
            answers.append(ans)
        if spec.format == "chat":
            convs = [_messages(spec, row, line, _fill(spec.prompt, row, spec, line)) for line, row in rows]
            registry = None
            if spec.search:
                from lmstack.tools.search import search_tool

                finder = search_tool(spec.search, k=spec.search_k, max_chars=spec.search_chars)
                if spec.retrieve:
                    convs = [retrieved(c, finder, f"retrieve_{i}") for i, c in enumerate(convs)]
            if spec.tools:
                registry = tools or default_registry()
                if spec.search:
                    registry = registry.with_tools(finder)
                missing = [t for t in spec.tools if t not in registry.names()]
                if missing:
                    raise UserError(f"task {spec.name}: unknown tool(s) {', '.join(missing)} "
                                    f"(known: {', '.join(registry.names())})")
                registry = registry.subset(spec.tools)
            k = max(1, spec.samples)  # the k samples of a row are k rows: one batched call
            sampling = {"temperature": spec.temperature} if spec.samples else {}
            replies = lm.chat([c for c in convs for _ in range(k)], spec.max_tokens, tools=registry, **sampling)
            outs = [(r.text, r.closed, r.tool_calls) for r in replies]
        else:
            k = max(1, spec.samples)
            sampling = {"temperature": spec.temperature} if spec.samples else {}
            prompts = [lm.tok.bos + lm.tok.encode(_fill(spec.prompt, row, spec, line)) for line, row in rows]
            done = lm.generate([p for p in prompts for _ in range(k)], spec.max_tokens, until=spec.until, **sampling)
            outs = [(c.text, None, 0) for c in done]
        forced = _teacher_forced(lm, spec, rows, answers)
        for j, ((line, row), ans) in enumerate(zip(rows, answers)):
            mine = outs[j * k:(j + 1) * k]
            hits = [int(check(spec.check, text, ans)) for text, _, _ in mine]
            item = {"line": line, "hit": int(any(hits)), "slices": _slice_keys(row, spec)}
            if forced:
                item["answer_lp"] = forced[j]
            if spec.check == "number":  # per-digit accuracy, averaged over the k samples
                item["digit_acc"] = sum(digit_accuracy(labeller.final_number(text), ans[0])
                                        for text, _, _ in mine) / len(mine)
            if spec.samples:  # pass@k: hit = any of the k; each sample kept
                item.update(samples=[text for text, _, _ in mine], sample_hits=hits)
            else:
                item["reply"] = mine[0][0]
                confused = _confused(spec, row, line, mine[0][0]) if spec.confusable and not item["hit"] else None
                if confused is not None:
                    item["confused"] = confused
            if mine[0][1] is not None and not spec.samples:  # format compliance: greedy replies only
                item["closed"] = int(mine[0][1])
            if spec.tools:
                item["tool_calls"] = sum(c for _, _, c in mine)
            items.append(item)
        chance = _majority(spec, rows) if isinstance(spec.chance, str) else spec.chance
    result = {"kind": spec.kind, "format": spec.format, "metric": metric_name(spec), "better": spec.better,
              "data": spec.data, "description": spec.description,
              **summarize([it["hit"] for it in items], chance), **continuous(items), **confusions(items)}
    if spec.kind == "choice":
        result["mean_rank"] = sum(it["rank"] for it in items) / len(items)
        _add_swapped(result, items, chance)
    if spec.samples:  # pass@1 estimated from the samples (the unbiased estimator for k = 1)
        result["samples"], result["temperature"] = spec.samples, spec.temperature
        result["pass@1"] = _pass1(items)
    if spec.kind == "generate" and spec.format == "chat" and not spec.samples:
        result["closed"] = summarize([it["closed"] for it in items])
    if spec.tools:
        result["used_tools"] = sum(1 for it in items if it["tool_calls"]) / len(items)
    by = defaultdict(list)
    for it in items:
        for key in it["slices"]:
            by[key].append(it)
    result["slices"] = {}
    for key in sorted(by):
        its = by[key]
        s = {**summarize([it["hit"] for it in its], _slice_chance(spec, rows, items, its, chance)), **continuous(its),
             **confusions(its)}
        if spec.kind == "choice":
            s["mean_rank"] = sum(it["rank"] for it in its) / len(its)
            _add_swapped(s, its, s.get("chance"))
        if spec.samples:
            s["pass@1"] = _pass1(its)
        result["slices"][key] = s
    result["seconds"] = round(time.time() - t0, 2)
    result["items"] = items
    return result


def _messages(spec: TaskSpec, row: dict, line: int, prompt: str) -> list[dict]:
    """A chat task's conversation: its system message (if any), then the prompt as the user's."""
    system = [{"role": "system", "content": _fill(spec.system, row, spec, line)}] if spec.system else []
    return system + [{"role": "user", "content": prompt}]


def _answer_pairs(lm, spec: TaskSpec, row: dict, line: int, prompt: str, answers: list[str]) -> list:
    """The (context ids, continuation ids) pairs that score each of `answers` after `prompt`: in
    the chat format, as the start of the assistant's reply (after `reply_prefix`); in text, as
    the prompt's continuation (joined by `choice_prefix`, default a space)."""
    if spec.format == "chat":  # the reply's text follows the format's lead, as the format encodes it
        head, lead = lm.fmt.prompt(_messages(spec, row, line, prompt)), lm.fmt.lead
        context = _fill(spec.reply_prefix, row, spec, line)
    else:
        head, lead, context = None, "", prompt
    sep = spec.choice_prefix if spec.choice_prefix is not None else (" " if context else "")
    return [lm.split_pair(lead + context, sep + a, head) for a in answers]


def _teacher_forced(lm, spec: TaskSpec, rows, answers) -> list[float]:
    """Each row's answer log-probability (nats) after its prompt, teacher-forced (one batched
    scoring call); [] for checks with no reference answer (behaviour detectors, regex)."""
    if spec.check not in ("contains", "exact", "number") or spec.search:
        return []  # (with search, the context the answer follows is the tool's: not scored here)
    pairs = [pair for (line, row), ans in zip(rows, answers)
             for pair in _answer_pairs(lm, spec, row, line, _fill(spec.prompt, row, spec, line), ans[:1])]
    return [lp for lp, _ in lm.loglikelihood_ids(pairs)]


def digit_accuracy(got: str | None, want: str) -> float:
    """The share of digit positions the number `got` has right, aligned from the units digit: the
    answer's positions plus any extra the reply wrote (each extra one wrong), a minus sign counting
    as a position. No number at all scores 0. ("81", "81") -> 1; ("71", "81") -> 0.5; ("181", "81") -> 2/3."""
    want = str(want).replace(",", "")
    if got is None or not want:
        return 0.0
    width = max(len(got), len(want))
    return sum(a == b for a, b in zip(got.rjust(width), want.rjust(width))) / width


def continuous(items) -> dict:
    """The continuous scores over items that have them: mean answer log-probability, mean per-digit accuracy."""
    out = {}
    for key, name in (("answer_lp", "answer_logprob"), ("digit_acc", "digit_acc")):
        values = [it[key] for it in items if key in it]
        if values:
            out[name] = sum(values) / len(values)
    return out


def _confused(spec: TaskSpec, row: dict, line: int, reply: str) -> list[str] | None:
    """The names of the row's `confusable` answers a (wrong) reply contains; None for a row
    without the field (a world written before probes had it)."""
    table = row.get(spec.confusable)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UserError(f"task {spec.name}: row {line + 1} of {spec.data}: {spec.confusable!r} must be an "
                        f"object {{name: answer or [answers]}}")
    return [name for name, ans in table.items()
            if check(spec.check, reply, [str(a) for a in (ans if isinstance(ans, list) else [ans])])]


def confusions(items) -> dict:
    """What the wrong replies gave instead, over items scored with `confusable`: {"wrong": misses,
    "confusions": {name: misses containing that name's answer}} (a reply may count under two)."""
    wrong = [it for it in items if "confused" in it]
    if not wrong:
        return {}
    return {"wrong": len(wrong), "confusions": dict(Counter(n for it in wrong for n in it["confused"]).most_common())}


def _swapped_subjects(rows, spec: TaskSpec) -> dict:
    """line -> another row's subject for every row whose subject is a non-empty string in its
    prompt: the first, from half the file away onwards (away from rows about the same people, e.g.
    a child's and its parent's probes, which sit side by side), that differs from the row's own and
    is none of its options (a swapped subject that is the answer would test something else)."""
    subjects = [(line, row.get(spec.subject)) for line, row in rows]
    out = {}
    n = len(subjects)
    for i, (line, mine) in enumerate(subjects):
        row = rows[i][1]
        if not isinstance(mine, str) or not mine or mine not in _fill(spec.prompt, row, spec, line):
            continue
        taken = {mine, *_options(row, spec, line)[0]}
        for j in range(n):
            other = subjects[(i + n // 2 + j) % n][1]
            if isinstance(other, str) and other and other not in taken:
                out[line] = other
                break
    return out


def _add_swapped(summary: dict, items, chance) -> None:
    """The score with the subject swapped (the answer's prior) beside the real one, and whether the
    real one's whole interval is above it ("knows", rather than "picks the likelier name")."""
    hits = [it["swapped_hit"] for it in items if "swapped_hit" in it]
    if hits:
        summary["swapped"] = summarize(hits, chance)
        summary["above_swapped"] = summary["ci"][0] > summary["swapped"]["acc"]


def _pass1(items) -> float:
    return sum(sum(it["sample_hits"]) / len(it["sample_hits"]) for it in items) / len(items)


def _majority(spec: TaskSpec, rows, subset=None) -> float:
    """Chance of always giving the most common answer among rows that share `spec.chance`'s field."""
    key = spec.chance.split(":", 1)[1]
    common = {}
    groups = defaultdict(Counter)
    for line, row in rows:
        groups[row.get(key)][str(row.get(spec.answer))] += 1
    for g, counter in groups.items():
        common[g] = counter.most_common(1)[0][0]
    chosen = rows if subset is None else [r for r in rows if r[0] in subset]
    return sum(common[row.get(key)] == str(row.get(spec.answer)) for _, row in chosen) / len(chosen)


def _slice_chance(spec, rows, items, its, overall):
    if spec.kind == "choice" and not isinstance(spec.chance, (int, float)):
        by_line = {line: row for line, row in rows}
        return sum(1 / len(_options(by_line[it["line"]], spec, it["line"])[0]) for it in its) / len(its)
    if isinstance(spec.chance, str):
        return _majority(spec, rows, {it["line"] for it in its})
    return overall
