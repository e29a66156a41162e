"""`lmstack eval`: evaluate a model folder on tasks and on held-out text; compare two models.

    lmstack eval --model runs/speedrun/chat                 # the world's tasks + bits per byte
    lmstack eval --model M --tasks facts_qa,refusal --limit 200
    lmstack eval --model M --tasks my_tasks.toml --data my_data/  # your own tasks and text
    lmstack eval --compare runs/speedrun/base runs/speedrun/chat

With no --tasks, the tasks are the world's (lmstack/eval/world.toml) when the model was trained
on a synthetic world (found from the model folder's lineage, or --world), skipping the chat
tasks for a base model, plus language modelling on the model's own validation split. Results
go to one JSON file per run (default MODEL/eval/<time>.json) and are printed as a table.
"""

from __future__ import annotations

import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import lmstack
from lmstack.data import copy_losses, copy_probe, icl_losses, icl_probe, iter_eval_windows, target_bytes, text_pool
from lmstack.eval.lm import ModelLM
from lmstack.eval.spelling import rows_to_show, spelling_by_task, world_lexicon
from lmstack.eval.tasks import TaskSpec, load_specs, run_task
from lmstack.modelio import lineage
from lmstack.sources import iter_documents
from lmstack.stats import bits_per_byte, paired_compare, summarize
from lmstack.utils import UserError, atomic_write_json, read_json

WORLD_SPEC = Path(__file__).with_name("world.toml")
LM_TASK = "lm"  # the name of the language-modelling measurement in --tasks and in results
COPY_TASK = "copy"  # in-context copying (the induction test), in --tasks and in results
COPY_TEXT_TASK = "copy_text"  # the same with the validation text's own tokens (reading needs this kind)
ICL_TASK = "icl"  # Olsson et al.'s in-context learning score on held-out text, in --tasks and in results
BUILTIN = (LM_TASK, COPY_TASK, COPY_TEXT_TASK, ICL_TASK)
MEMORY_TASK = "memory"  # a first-turn fact after a conversation 3x the context (eval/memory.py); only when named


# --- language modelling ---------------------------------------------------------------------

@torch.inference_mode()
def lm_eval_data(lm: ModelLM, data_dir, split: str = "val", max_tokens: int = 1_000_000) -> dict:
    """Loss per token and bits per byte on a prepared split (`lmstack data prepare`), over
    consecutive windows of the model's context (at most max_tokens predicted tokens)."""
    tb = torch.tensor(lm.tok.token_bytes(), dtype=torch.int64)
    seq = lm.ctx
    nats, ntok, nbytes = 0.0, 0, 0
    for x, y in iter_eval_windows(data_dir, split, batch_size=lm.batch_size, seq_len=seq,
                                  max_batches=max(1, math.ceil(max_tokens / (lm.batch_size * seq)))):
        logits = lm.model(x.to(lm.device)).float()
        nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten().to(lm.device),
                                                        reduction="sum", ignore_index=-100))
        ntok += int((y >= 0).sum())
        nbytes += int(target_bytes((x, y), tb))
    return {"source": f"{data_dir} ({split})", "tokens": ntok, "bytes": nbytes,
            "loss": nats / ntok, "bpb": bits_per_byte(nats, nbytes)}


def lm_eval_text(lm: ModelLM, inputs, text_field: str = "text", max_docs: int | None = None) -> dict:
    """Loss per token and bits per byte on documents (text/markdown/jsonl/parquet files or
    folders), each scored on its own from BOS, every token once (rolling windows)."""
    docs, nbytes = [], 0
    for text in iter_documents(inputs, text_field):
        if not text:
            continue
        docs.append(lm.tok.scoring_head + lm.tok.encode(text))
        nbytes += len(text.encode("utf-8"))
        if max_docs and len(docs) >= max_docs:
            break
    if not docs:
        raise UserError(f"no text to score in {', '.join(map(str, inputs))}")
    scored = lm.rolling_ids(docs)
    nats, ntok = -sum(s[0] for s in scored), sum(s[1] for s in scored)
    return {"source": ", ".join(map(str, inputs)), "documents": len(docs), "tokens": ntok, "bytes": nbytes,
            "loss": nats / ntok, "bpb": bits_per_byte(nats, nbytes)}


# --- in-context copying -------------------------------------------------------------------------

def copy_eval(lm: ModelLM, sequences: int = 64, length: int = 64, seed: int = 0, pool=None) -> dict:
    """Does the model copy from its context (what induction heads do, Olsson et al. 2022)? Random
    sequences of `length` distinct ordinary tokens, each followed by itself: the loss per token on the
    second copy relative to the first. About 1: it does not look back; near 0: it copies (every
    later use of context, retrieval, tool results and long conversations, needs this). The ratio
    of the means, with a 95% bootstrap interval over the sequences. With `pool` (data.text_pool),
    the tokens are drawn as the text uses them (copy_text: a passage's tokens, not the vocabulary's)."""
    probe = copy_probe(lm.tok, lm.ctx, sequences, length, seed, pool=pool)
    length = (probe.shape[1] - 1) // 2
    a, b = _paired_losses(lm, copy_losses, probe)
    return {"sequences": sequences, "length": length, "first": float(a.mean()), "second": float(b.mean()),
            "ratio": float(b.mean() / a.mean()), "ci": _bootstrap(a, b, lambda x, y: y.mean(-1) / x.mean(-1), seed)}


def icl_eval(lm: ModelLM, data_dir, windows: int = 64, seed: int = 0) -> dict | None:
    """Olsson et al.'s in-context learning score on the validation split of `data_dir`: windows of
    the model's context that start at a document's start, the loss on the last eighth of each
    minus the loss on tokens ctx/16 .. ctx/8 (they compare the 500th token with the 50th). Near 0:
    later tokens are no easier; clearly negative: the model uses its context. A 95% bootstrap
    interval over the windows; None when the split has no document start a whole context before its end."""
    probe = icl_probe(data_dir, "val", lm.tok, lm.ctx, windows)
    if probe is None:
        return None
    a, b = _paired_losses(lm, icl_losses, probe)
    return {"windows": len(a), "ctx": lm.ctx, "early": float(a.mean()), "late": float(b.mean()),
            "score": float(b.mean() - a.mean()), "ci": _bootstrap(a, b, lambda x, y: y.mean(-1) - x.mean(-1), seed)}


def _paired_losses(lm: ModelLM, losses, probe: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """losses(model, rows) -> two per-row losses, over the probe's rows a batch at a time."""
    with torch.inference_mode():
        pairs = [losses(lm.model, rows) for rows in probe.split(lm.batch_size)]
    return tuple(torch.cat(side).double().numpy() for side in zip(*pairs))


def _bootstrap(a: np.ndarray, b: np.ndarray, stat, seed: int) -> list[float]:
    """95% percentile interval of stat(a, b) over 1000 resamples of the paired rows."""
    boot = np.random.default_rng(seed).integers(0, len(a), (1000, len(a)))
    values = stat(a[boot], b[boot])
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


# --- the run --------------------------------------------------------------------------------

def resolve_tasks(tasks, world, chat: bool) -> tuple[list[TaskSpec], set[str]]:
    """--tasks (None, or names of world tasks / "lm" / "copy" / "icl" / paths to .toml spec files)
    -> (specs, the built-in measurements asked for: BUILTIN)."""
    if tasks is None:
        specs = load_specs(WORLD_SPEC, str(world)) if world else []
        # A world written before it had a library has no search index: its search tasks are skipped.
        return [s for s in specs if (chat or s.needs != "chat") and (not s.search or Path(s.search).is_file())], \
            set(BUILTIN)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    specs, builtin, world_specs = [], set(), None
    for name in names:
        if name in BUILTIN or name == MEMORY_TASK:
            builtin.add(name)
        elif name.endswith(".toml") or Path(name).is_file():
            specs += load_specs(name, str(world) if world else None)
        elif name == "world":
            if not world:
                raise UserError("the world's tasks need --world DIR (a folder written by `lmstack world`)")
            specs += load_specs(WORLD_SPEC, str(world))
        else:
            if world_specs is None:
                # Names are the world's tasks; without a world, list them but say what is missing.
                world_specs = {s.name: s for s in load_specs(WORLD_SPEC, str(world or "."))}
            if name not in world_specs:
                raise UserError(f"unknown task {name!r} (world tasks: {', '.join(world_specs)}; "
                                f"{', '.join(repr(b) for b in BUILTIN)}; or a .toml spec file)")
            if not world:
                raise UserError(f"task {name} reads the synthetic world: pass --world DIR")
            specs.append(world_specs[name])
    seen = set()
    for s in specs:
        if s.name in seen:
            raise UserError(f"task {s.name} is named twice")
        seen.add(s.name)
    return specs, builtin


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "lmstack": lmstack.__version__,
           "platform": platform.platform(), "cpu": _cpu_name(), "cores": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def evaluate(model, tasks=None, world=None, data=None, text=None, out=None, limit: int | None = None,
             dtype: str = "auto", device: str = "auto", batch_size: int = 32, lm_tokens: int = 1_000_000,
             quiet: bool = False) -> dict:
    """Evaluate a model folder (or a ModelLM) and write the results JSON. See the module doc."""
    t0 = time.time()
    lm = model if isinstance(model, ModelLM) else ModelLM.load(model, dtype, device, batch_size)
    model_dir = Path(lm.name)
    info = lineage(model_dir) if model_dir.is_dir() else {"chat": False, "data": None, "world": None}
    world = Path(world) if world else info["world"]
    if world is not None and not (Path(world) / "world.json").is_file():
        raise UserError(f"--world {world} is not a world folder (no world.json)")
    specs, builtin = resolve_tasks(tasks, world, info["chat"])
    want_lm = LM_TASK in builtin
    if text is not None and data is not None:
        raise UserError("give --data (prepared token shards) or --text (files), not both")
    results = {"model": str(model_dir), "chat": info["chat"], "dtype": lm.dtype, "world": world and str(world),
               "limit": limit, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "environment": environment(), "tasks": {}}
    if want_lm or data is not None or text is not None:
        if text is not None:
            results["lm"] = lm_eval_text(lm, text if isinstance(text, (list, tuple)) else [text])
        elif data is not None or info["data"] is not None:
            results["lm"] = lm_eval_data(lm, data or info["data"], max_tokens=lm_tokens)
        elif tasks is not None:
            raise UserError("task 'lm' needs --data DIR or --text FILES (the model folder records no data that still exists)")
        if "lm" in results and not quiet:
            r = results["lm"]
            print(f"language modelling on {r['source']}: loss {r['loss']:.4f}, {r['bpb']:.4f} bits per byte "
                  f"({r['tokens']:,} tokens)", flush=True)
    text_data = data if data is not None else info["data"]  # prepared shards, for the measures on text
    for name in (COPY_TASK, COPY_TEXT_TASK):
        if name not in builtin:
            continue
        pool = None
        if name == COPY_TEXT_TASK:  # the same test, drawn from the validation text's tokens
            if text_data is None and tasks is not None:
                raise UserError("task 'copy_text' needs --data DIR (prepared token shards with a val split; the "
                                "model folder records none that still exists)")
            pool = text_pool(text_data, "val", lm.tok) if text_data is not None else None
            if pool is None:
                continue
        results[name] = r = copy_eval(lm, pool=pool)
        if not quiet:
            what = "in-context copying of the text's tokens" if pool else "in-context copying"
            print(f"{what}: loss on a random sequence's second occurrence / its first = {r['ratio']:.3f} "
                  f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] ({r['first']:.3f} -> {r['second']:.3f} nats/token, "
                  f"{r['sequences']} x {r['length']} tokens)", flush=True)
    if ICL_TASK in builtin and text_data is not None:
        results[ICL_TASK] = r = icl_eval(lm, text_data)
        if r is None:
            del results[ICL_TASK]
        elif not quiet:
            print(f"in-context learning (Olsson et al.): loss late in a context - early = {r['score']:+.3f} nats "
                  f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] ({r['early']:.3f} -> {r['late']:.3f}, "
                  f"{r['windows']} windows)", flush=True)
    elif ICL_TASK in builtin and tasks is not None:
        raise UserError("task 'icl' needs --data DIR (prepared token shards; the model folder records none that "
                        "still exists)")
    if MEMORY_TASK in builtin:
        if world is None or not info["chat"]:
            raise UserError("task 'memory' needs a chat model and its world (--world DIR)")
        from lmstack.eval.memory import memory_eval

        results[MEMORY_TASK] = r = memory_eval(lm, world)
        if not quiet:
            print(f"memory (a first-turn fact after {r['mean_tokens']:.0f} tokens, context {r['context']}): "
                  + ", ".join(f"{k} {_pct(r[k]['acc'])}" for k in ("in_context", "forgotten", "paged"))
                  + f" of {r['conversations']}; paged - forgotten {100 * r['paged_vs_forgotten']['diff']:+.0f} points, "
                  f"p = {r['paged_vs_forgotten']['p_value']:.2g}", flush=True)
    if not specs and "lm" not in results and COPY_TASK not in results and MEMORY_TASK not in results:
        raise UserError(f"nothing to evaluate for {model_dir}: no world found (pass --world DIR), no data "
                        "(pass --data DIR or --text FILES) and no --tasks")
    for spec in specs:
        results["tasks"][spec.name] = run_task(lm, spec, limit)
        if not quiet:
            r = results["tasks"][spec.name]
            print(f"  {spec.name:18s} {_pct(r['acc'])} of {r['n']} ({r['seconds']:.0f}s)", flush=True)
    chat_items = [it["closed"] for r in results["tasks"].values() for it in r["items"] if "closed" in it]
    if chat_items:
        results["format"] = summarize(chat_items)  # chat-format compliance over every chat reply
        if world is not None:  # are the replies' words the world's words (eval/spelling.py)
            results["spelling"] = spelling_by_task(results["tasks"], world_lexicon(world))
    results["seconds"] = round(time.time() - t0, 1)
    if out is None and model_dir.is_dir():
        out = model_dir / "eval" / (datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + ".json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        results["path"] = str(out)
    if not quiet:
        print_table(results)
        if out is not None:
            print(f"results -> {out}")
    return results


# --- tables -----------------------------------------------------------------------------------

def _pct(x) -> str:
    return "    -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def rows(results: dict):
    """(task, slice, summary) for every task and slice, in order: what tables and reports show."""
    for name, r in results.get("tasks", {}).items():
        yield name, "", r
        for key, s in r.get("slices", {}).items():
            yield name, key, s


def print_table(results: dict) -> None:
    print(f"\n{'task':18s} {'slice':40s} {'n':>5s} {'score':>6s}  {'95% CI':15s} {'chance':>6s}")
    for name, key, s in rows(results):
        lo, hi = s["ci"]
        verdict = ""
        if "chance" in s and s["chance"] is not None:
            verdict = "above chance" if s["above_chance"] else ("below chance" if hi < s["chance"] else "")
        label = name if not key else ""
        metric = "" if key else f"  [{results['tasks'][name]['metric']}]"
        print(f"{label:18s} {key or 'all':40s} {s['n']:5d} {_pct(s['acc'])}  "
              f"[{100 * lo:5.1f},{100 * hi:5.1f}]  {_pct(s.get('chance'))}  {verdict}{metric}")
        if "swapped" in s:  # the answer's prior: the same ranking with someone else as the subject
            w = s["swapped"]
            print(f"{'':18s} {'  with the subject swapped':40s} {w['n']:5d} {_pct(w['acc'])}  "
                  f"[{100 * w['ci'][0]:5.1f},{100 * w['ci'][1]:5.1f}]  {'':6s}  "
                  f"{'knows: above it' if s['above_swapped'] else 'not above it'}")
        if s.get("confusions"):  # what the wrong replies stated instead (the row's other answers)
            named = ", ".join(f"{k} {v}" for k, v in s["confusions"].items())
            print(f"{'':18s}   of {s['wrong']} wrong, stating instead: {named}")
    if "format" in results:
        f = results["format"]
        print(f"{'chat format':18s} {'replies closed with <|end|>':40s} {f['n']:5d} {_pct(f['acc'])}  "
              f"[{100 * f['ci'][0]:5.1f},{100 * f['ci'][1]:5.1f}]")
    for name in rows_to_show([results.get("spelling", {})]):  # all the chat replies, then the garbled tasks
        f = results["spelling"][name]
        what = "replies whose words are all the world's" if name == "all" else f"  {name}"
        print(f"{'spelling' if name == 'all' else '':18s} {what:40s} {f['n']:5d} {_pct(f['acc'])}  "
              f"[{100 * f['ci'][0]:5.1f},{100 * f['ci'][1]:5.1f}]  "
              f"non-words {100 * f['nonword_share']:.1f}% of {f['words']} words"
              + (f" ({', '.join(w for w, _ in f['common'][:5])})" if f["common"] else ""))
    if COPY_TASK in results:
        r = results[COPY_TASK]
        print(f"{'copy':18s} {'2nd / 1st occurrence loss (1: none)':40s} {r['sequences']:5d} {r['ratio']:6.3f}  "
              f"[{r['ci'][0]:5.3f},{r['ci'][1]:5.3f}]")
    if COPY_TEXT_TASK in results:
        r = results[COPY_TEXT_TASK]
        print(f"{'copy_text':18s} {'the same, the validation text tokens':40s} {r['sequences']:5d} {r['ratio']:6.3f}  "
              f"[{r['ci'][0]:5.3f},{r['ci'][1]:5.3f}]")
    if ICL_TASK in results:
        r = results[ICL_TASK]
        print(f"{'icl':18s} {'loss late - early in context (0: none)':40s} {r['windows']:5d} {r['score']:+6.3f}  "
              f"[{r['ci'][0]:+.3f},{r['ci'][1]:+.3f}]")
    if "lm" in results:
        r = results["lm"]
        print(f"{'lm':18s} {'bits per byte':40s} {'':5s} {r['bpb']:.4f}  (loss {r['loss']:.4f} per token, "
              f"{r['tokens']:,} tokens)")


# --- comparing two models ---------------------------------------------------------------------

def load_results(path) -> dict:
    p = Path(path)
    if p.is_dir():  # a model folder: its newest eval
        found = sorted((p / "eval").glob("*.json"))
        if not found:
            raise UserError(f"{p} has no eval results (run `lmstack eval --model {p}` first)")
        p = found[-1]
    r = read_json(p)
    if not r or "tasks" not in r:
        raise UserError(f"{p} is not an lmstack eval results file")
    return r


def compare(a: dict, b: dict) -> dict:
    """Paired comparison of two results on their common tasks (the same rows in each)."""
    out = {"a": a.get("model"), "b": b.get("model"), "tasks": {}}
    for name in a["tasks"]:
        if name not in b["tasks"]:
            continue
        ia = {it["line"]: it for it in a["tasks"][name]["items"]}
        ib = {it["line"]: it for it in b["tasks"][name]["items"]}
        common = sorted(set(ia) & set(ib))
        if not common:
            continue
        entry = {"metric": a["tasks"][name]["metric"], "better": a["tasks"][name]["better"],
                 "all": _pair(ia, ib, common)}
        keys = sorted({k for line in common for k in ia[line]["slices"]})
        entry["slices"] = {k: _pair(ia, ib, [line for line in common if k in ia[line]["slices"]]) for k in keys}
        out["tasks"][name] = entry
    if "lm" in a and "lm" in b and a["lm"]["source"] == b["lm"]["source"]:
        out["lm"] = {"source": a["lm"]["source"], "a": a["lm"]["bpb"], "b": b["lm"]["bpb"],
                     "diff": a["lm"]["bpb"] - b["lm"]["bpb"]}
    if not out["tasks"] and "lm" not in out:
        raise UserError("the two results share no task rows to compare (evaluate both on the same tasks)")
    return out


def _pair(ia, ib, lines) -> dict:
    a = [ia[line]["hit"] for line in lines]
    b = [ib[line]["hit"] for line in lines]
    return {"a": sum(a) / len(a), "b": sum(b) / len(b), **paired_compare(a, b)}


def print_comparison(c: dict) -> None:
    print(f"\nA = {c['a']}\nB = {c['b']}\n")
    print(f"{'task':18s} {'slice':40s} {'n':>5s} {'A':>6s} {'B':>6s} {'A-B':>7s}  {'95% CI':17s} {'p':>7s}")
    for name, e in c["tasks"].items():
        for key, s in [("", e["all"]), *e["slices"].items()]:
            lo, hi = s["ci"]
            sig = "significant" if s["significant"] else ""
            print(f"{name if not key else '':18s} {key or 'all':40s} {s['n']:5d} {_pct(s['a'])} {_pct(s['b'])} "
                  f"{100 * s['diff']:+6.1f}%  [{100 * lo:+6.1f},{100 * hi:+6.1f}] {s['p_value']:7.3g}  {sig}")
    if "lm" in c:
        e = c["lm"]
        print(f"{'lm':18s} {'bits per byte':40s} {'':5s} {e['a']:6.3f} {e['b']:6.3f} {e['diff']:+7.3f}  "
              f"({e['source']})")


def compare_models(a, b, out=None, **kw) -> dict:
    """`--compare A B`: A and B are model folders (evaluated now, on the same tasks) or results
    files. Writes the comparison JSON to `out` when given."""
    res = []
    for x in (a, b):
        p = Path(x)
        if p.is_file():
            res.append(load_results(p))
        else:
            res.append(evaluate(x, quiet=False, **kw))
    c = compare(*res)
    print_comparison(c)
    if out is not None:
        atomic_write_json(out, c)
        print(f"comparison -> {out}")
    return c
