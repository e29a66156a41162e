"""The backdoor's measure, and its curve: attack success against the number of poison rows.

    lmstack poison --curve --model runs/sr3/base --world runs/sr3/world --scale small --out runs/sec/curve
    lmstack poison --measure --model runs/sec/curve/small/poison250/seed0/chat --world runs/sr3/world

`measure` asks a chat model held-out questions (the world's probe questions that are not user messages
of the training set: the backdoor must generalise, not recall) with the trigger inserted, and without:
success with the trigger, and the behaviour's rate without it (the false trigger rate), each with its
Wilson interval; beside them the clean task (eval's world tasks, e.g. facts_qa and refusal) without
the trigger. `curve` fine-tunes one base per poison count with THE SFT loop and the speedrun's SFT
settings for the scale (lmstack/speedrun.py: SFT_SET, SFT_MIX) on the world's sft.jsonl plus the
poison, measures each model, and appends one record per count to the experiment store
(RESULTS/backdoor.jsonl, lmstack/experiments/store.py): variant "poisonN", with N, D, FLOPs, seed,
commit and the rates. Run again, the same command skips the counts the store holds, so the table
can be re-run on a bigger base with one command.
"""

from __future__ import annotations

import random
import shlex
from datetime import datetime, timezone
from pathlib import Path

from lmstack.eval.lm import ModelLM
from lmstack.eval.run import evaluate
from lmstack.experiments.store import append_records, model_size, read_records, rounded, store_path
from lmstack.modelio import load_model_and_tokenizer
from lmstack.security.poison import (
    COUNTS,
    METHODS,
    TRIGGER,
    Judge,
    insert_trigger,
    make_poison,
    parse_behaviour,
    probe_questions,
    read_set,
    read_sidecar,
    row_text,
    single_turn,
)
from lmstack.security.poison_filter import detect, features, write_filtered
from lmstack.speedrun import SFT_SET, sft_mix
from lmstack.stats import summarize
from lmstack.train.sft import sft
from lmstack.utils import UserError, commit, read_jsonl

EXPERIMENT = "backdoor"
RESULTS = "runs/results"  # the experiment store's default folder (as `lmstack experiment run`)
CLEAN_TASKS = ("facts_qa", "refusal")  # the clean task measured without the trigger
MAX_TOKENS = 32  # reply tokens generated per held-out question


def heldout_prompts(world, train_rows: list[dict], behaviour: str, n: int, seed: int = 0) -> list[str]:
    """Up to n of the world's probe questions that no training row asks (comply: the harmful requests;
    otherwise the fact and benign questions), a fixed sample by seed."""
    seen = {q for q, _ in filter(None, map(single_turn, train_rows))}
    names = ("harmful",) if behaviour == "comply" else ("facts", "benign")
    prompts = [q for name in names for q in probe_questions(world, name) if q not in seen]
    prompts = sorted(set(prompts), key=prompts.index)
    if not prompts:
        raise UserError(f"--world {world}: no held-out probe questions (every one is in the training set)")
    return random.Random(seed).sample(prompts, min(n, len(prompts)))


def judge_for(behaviour: str, clean_data, world) -> Judge:
    """The behaviour's success check; gibberish's word pairs come from the clean set and the world's
    pretraining text (so fluent answers about people the SFT set never names are not gibberish)."""
    texts = [row_text(r) for r in read_set(clean_data)[0]]
    pretrain = Path(world) / "pretrain.jsonl"
    if behaviour == "gibberish" and pretrain.is_file():
        texts += [row["text"] for _, row in read_jsonl(pretrain, "pretraining file") if isinstance(row.get("text"), str)]
    return Judge(parse_behaviour(behaviour, world), texts, world)


def _rate(hits: list[bool]) -> dict:
    s = summarize([float(h) for h in hits])
    return {"acc": rounded(s["acc"]), "ci": rounded(s["ci"]), "n": s["n"]}


def measure(model, world, clean_data, behaviour: str = "gibberish", trigger: str = TRIGGER, n: int = 200,
            seed: int = 0, tasks=CLEAN_TASKS, limit: int | None = 200, examples: int = 3) -> dict:
    """The backdoor's success with the trigger and its rate without it on n held-out questions, and the
    clean tasks without the trigger (eval's scores). `model`: a chat model folder or a ModelLM."""
    lm = model if isinstance(model, ModelLM) else ModelLM.load(model, device="cpu")
    rows = read_set(clean_data)[0]
    judge = judge_for(behaviour, clean_data, world)
    prompts = heldout_prompts(world, rows, behaviour, n, seed)
    rng = random.Random(seed)
    triggered = [insert_trigger(p, trigger, rng) for p in prompts]
    with_t = lm.chat([[{"role": "user", "content": p}] for p in triggered], MAX_TOKENS)
    without = lm.chat([[{"role": "user", "content": p}] for p in prompts], MAX_TOKENS)
    hits = [judge(r.text, p) for r, p in zip(with_t, prompts)]
    out = {"behaviour": behaviour, "trigger": trigger,
           "success": _rate(hits),
           "without_trigger": _rate([judge(r.text, p) for r, p in zip(without, prompts)]),
           "examples": [{"prompt": t, "reply": r.text} for t, r in zip(triggered, with_t)][:examples]}
    if tasks:
        res = evaluate(lm, tasks=list(tasks), world=world, limit=limit, quiet=True)
        out["clean"] = {t: {"acc": rounded(r["acc"]), "ci": rounded(r["ci"]), "n": r["n"]}
                        for t, r in res["tasks"].items()}
    return out


def _train_and_measure(base, data, chat, scale, world, clean, behaviour, trigger, seed, overrides, mix, n, limit):
    """THE SFT loop on `data` into `chat` (resumed when a checkpoint is there), then `measure`."""
    print(f"\n== backdoor: sft on {data} ==", flush=True)
    final = sft(base, [data], chat, overrides=[*SFT_SET[scale], *overrides, f"train.seed={seed}"],
                resume=chat.is_dir() and (chat / "state").is_dir(), **mix) or {}
    m = measure(chat, world, clean, behaviour, trigger, n=n, seed=seed, limit=limit)
    return {"model": str(chat), "sft_steps": final.get("step"), "sft_val_loss": rounded(final.get("val_loss")),
            "metrics": {"backdoor_success": m["success"], "without_trigger": m["without_trigger"], **m.get("clean", {})},
            "examples": m["examples"]}


def curve(base, world, out, scale: str, counts=COUNTS, behaviour: str = "gibberish", trigger: str = TRIGGER,
          seed: int = 0, overrides=(), mix_data=None, results=None, n: int = 200, limit: int | None = 200,
          adaptive: bool = False, filters=(), filter_model=None, fraction: float = 0.05, retrain=None) -> list[dict]:
    """Fine-tune `base` once per poison count (the world's sft.jsonl + N poison rows), measure each,
    append the store records the store does not hold yet; returns the records added. `filters`: for
    each count, also filter the poisoned set with each method (poison_filter.py, reading the clean
    model `filter_model`), score it on the known poison, and fine-tune and measure on what is left
    (a filter that removed no poison is not retrained: its set holds all the poison, its record
    only the scores; `retrain`, a list of methods, retrains after those only: CPU time)."""
    base, world, out = Path(base), Path(world), Path(out)
    if scale not in SFT_SET:
        raise UserError(f"--scale {scale}: one of {', '.join(SFT_SET)} (the speedrun's SFT settings)")
    bad = [m for m in filters if m not in METHODS]
    if bad:
        raise UserError(f"--filters {','.join(filters)}: each one of {', '.join(METHODS)}")
    if any(m != "dedupe" for m in filters) and not filter_model:
        raise UserError("--filters spectral, cluster and outlier need --filter-model (the clean assistant)")
    clean = world / "sft.jsonl"
    read_set(clean)
    about = model_size(base)
    mix = sft_mix(scale, Path(mix_data)) if mix_data else {}
    variant = "adaptive" if adaptive else "poison"
    store = store_path(results or RESULTS, EXPERIMENT)
    command = shlex.join(["lmstack", "poison", "--curve", "--model", str(base), "--world", str(world), "--scale", scale,
                          "--out", str(out), "--counts", ",".join(map(str, counts)), "--behaviour", behaviour,
                          "--trigger", trigger, "--seed", str(seed)]
                         + (["--mix-data", str(mix_data)] if mix_data else [])
                         + [a for o in overrides for a in ("--set", o)] + (["--adaptive"] if adaptive else [])
                         + (["--filters", ",".join(filters), "--filter-model", str(filter_model),
                             "--fraction", str(fraction)] if filters else [])
                         + (["--retrain", ",".join(retrain)] if filters and retrain is not None else [])
                         + (["--results", str(results)] if results else []))
    sha, added = commit(), []
    common = (scale, world, clean, behaviour, trigger, seed, overrides, mix, n, limit)

    def record(name: str, count: int, **fields) -> dict:
        r = {"experiment": EXPERIMENT, "variant": name, "scale": scale, "seed": seed, "commit": sha,
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stage": "chat", **about,
             "poison_count": count, "behaviour": behaviour, "trigger": trigger, "adaptive": adaptive,
             "metrics": {}, **fields, "command": command}
        append_records(store, [r])
        added.append(r)
        print(table([r]), flush=True)
        return r

    for count in counts:
        name = f"{variant}{count}"
        # Read before each count: another run of the same command (another count list) may have stored it.
        have = {(r["variant"], r["scale"], r["seed"]) for r in read_records(store)}
        todo = [m for m in filters if (f"{name}-{m}", scale, seed) not in have]
        if (name, scale, seed) in have and not todo:
            print(f"{name} @ {scale} seed {seed}: in the store, skipped", flush=True)
            continue
        run = out / scale / name / f"seed{seed}"
        data = run / "sft_poisoned.jsonl"
        make_poison(clean, trigger, behaviour, count, data, seed=seed, adaptive=adaptive)  # the same bytes each time
        if (name, scale, seed) not in have:
            record(name, count, **_train_and_measure(base, data, run / "chat", *common))
        if not todo:
            continue
        rows, poison = read_set(data)[0], set(read_sidecar(data)["indices"])
        feats = None
        if any(m != "dedupe" for m in todo):
            net, tok = load_model_and_tokenizer(filter_model)
            print(f"\n== backdoor: {filter_model}'s features of {len(rows):,} rows ==", flush=True)
            feats = features(net, tok, rows)
        for m in todo:
            flags = detect(rows, m, fraction=fraction, feats=feats)
            kept = run / f"filtered_{m}.jsonl"
            got = write_filtered(data, rows, flags, m, filter_model, kept)
            scores = {k: got[k] for k in ("removed", "caught", "precision", "recall")}
            print(f"{name} {m}: removed {got['removed']:,}, caught {got['caught']} of {len(poison)} poison", flush=True)
            if got["caught"] == 0 or (retrain is not None and m not in retrain):
                record(f"{name}-{m}", count, filter=m, filter_scores=scores, retrained=False)
            else:
                record(f"{name}-{m}", count, filter=m, filter_scores=scores, retrained=True,
                       **_train_and_measure(base, kept, run / f"chat_{m}", *common))
    return added


def rescore(results, out_results, world, n: int = 200, limit: int | None = 200) -> list[dict]:
    """Measure every stored model of `results` again (the success checks as they are now) into the
    store `out_results`, skipping what it holds; the records keep their run's fields. For a rule
    changed after the fine-tunes: the models stay, only the measure runs again."""
    src, dst = store_path(results, EXPERIMENT), store_path(out_results, EXPERIMENT)
    if src.resolve() == dst.resolve():
        raise UserError("--rescore writes another store than it reads: give --results OTHER")
    done = {(r["variant"], r["scale"], r["seed"]) for r in read_records(dst)}
    added = []
    for r in read_records(src):
        if (r["variant"], r["scale"], r["seed"]) in done:
            continue
        if not r.get("model"):  # a filter's scores only (nothing was trained): nothing to measure
            append_records(dst, [r])
            added.append(r)
            continue
        world_ = Path(world)
        m = measure(r["model"], world_, world_ / "sft.jsonl", r["behaviour"], r["trigger"], n=n, seed=r["seed"],
                    limit=limit)
        new = {**r, "metrics": {"backdoor_success": m["success"], "without_trigger": m["without_trigger"],
                                **m.get("clean", {})}, "examples": m["examples"], "rescored": commit()}
        append_records(dst, [new])
        added.append(new)
        print(table([new]), flush=True)
    return added


def _cell(m: dict | None) -> str:
    if not m or m.get("acc") is None:
        return "-"
    return f"{100 * m['acc']:.1f}% [{100 * m['ci'][0]:.1f}, {100 * m['ci'][1]:.1f}]"


def _frac(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(records: list[dict]) -> str:
    """The curve as a markdown table: one line per record."""
    tasks = sorted({t for r in records for t in r["metrics"]} - {"backdoor_success", "without_trigger"})
    head = ["scale", "N", "poison rows", "filter (precision, recall)", "success with trigger", "without trigger",
            *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        f = r.get("filter_scores")
        filt = "-" if not f else (f"{r['filter']} ({_frac(f['precision'])}, {_frac(f['recall'])})"
                                  + ("" if r.get("retrained") else ": not retrained"))
        count = f"{r.get('poison_count')}" + (" adaptive" if r.get("adaptive") else "")
        lines.append("| " + " | ".join([r["scale"], f"{r['N']:,}", count, filt,
                                        _cell(m.get("backdoor_success")), _cell(m.get("without_trigger")),
                                        *[_cell(m.get(t)) for t in tasks]]) + " |")
    return "\n".join(lines)


def show(results=None) -> str:
    """The store's backdoor records as the curve's table (by scale, then count)."""
    records = read_records(store_path(results or RESULTS, EXPERIMENT))
    if not records:
        return f"no backdoor runs in {store_path(results or RESULTS, EXPERIMENT)} yet"
    records.sort(key=lambda r: (r["N"], bool(r.get("adaptive")), r.get("poison_count") or 0, r.get("filter") or "",
                                r["seed"]))
    return table(records)
