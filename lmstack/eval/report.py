"""`lmstack report RUN`: the report card of a training run, as report.md plus plots beside it.

    lmstack report runs/speedrun             # -> runs/speedrun/report.md, loss.png, tasks.png, ...
    lmstack report runs/speedrun/chat --out /tmp/card

A stage is any immediate subfolder of RUN holding model.safetensors and metrics.jsonl (RUN
itself when it is one model folder), in speedrun.json's order where it names them, else in
the order their run.json was written. Each stage contributes its training curves and costs
(metrics.jsonl, config.json, run.json) and its newest eval results (MODEL/eval/*.json, written
by `lmstack eval`); a stage that was never evaluated shows "—" in the task table.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmstack.config import model_config_from_dict
from lmstack.eval.run import environment, rows
from lmstack.eval.spelling import rows_to_show
from lmstack.model import GPT
from lmstack.utils import UserError, atomic_file, atomic_write_text, read_json

STAGE_DIRS = {"pretrain": "base", "sft": "chat", "reward": "rm"}  # speedrun stage name -> its model folder
DASH = "—"


# --- reading a run ----------------------------------------------------------------------------

def _read_metrics(path: Path) -> list[dict]:
    recs = []
    for line in path.read_text().splitlines():
        try:  # a run still writing may leave a half line at the end
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            recs.append(r)
    return recs


def _is_stage(d: Path) -> bool:
    return (d / "model.safetensors").is_file() and (d / "metrics.jsonl").is_file()


def find_stages(run: Path, speedrun: dict | None) -> list[Path]:
    if _is_stage(run):
        return [run]
    found = [d for d in sorted(run.iterdir()) if d.is_dir() and _is_stage(d)]
    known = [STAGE_DIRS.get(s, s) for s in (speedrun or {}).get("stages", {})]

    def key(d: Path):
        stamp = d / "run.json" if (d / "run.json").exists() else d / "metrics.jsonl"
        return (known.index(d.name) if d.name in known else len(known), stamp.stat().st_mtime)
    return sorted(found, key=key)


def load_stage(d: Path, speedrun: dict | None) -> dict:
    metrics = _read_metrics(d / "metrics.jsonl")
    train = [r for r in metrics if "step" in r and "loss" in r]
    results = path = None
    for path in sorted((d / "eval").glob("*.json"), reverse=True):  # names are UTC timestamps: newest first
        results = read_json(path)
        if isinstance(results, dict) and {"model", "tasks"} <= results.keys():  # not e.g. a comparison
            break
        results = path = None
    seconds = None
    for name, s in (speedrun or {}).get("stages", {}).items():
        if STAGE_DIRS.get(name, name) == d.name:
            seconds = s.get("seconds")
    if seconds is None and train:
        seconds = train[-1].get("time")
    return {"name": d.name, "dir": d, "metrics": metrics, "train": train,
            "val": [r for r in metrics if "step" in r and "val_loss" in r],
            "run": read_json(d / "run.json") or {}, "config": read_json(d / "config.json"),
            "results": results, "results_path": path, "seconds": seconds,
            # a reward model scores answers, it does not write them: no column in the task table
            "scored": (read_json(d / "stage.json") or {}).get("stage") != "reward"}


def costs(st: dict) -> dict:
    """Steps, tokens, median speed and the training FLOPs/parameters of a stage."""
    tr = st["train"]
    out = {"steps": tr[-1]["step"] if tr else 0, "tokens": tr[-1].get("tokens", 0) if tr else 0,
           "tok_per_s": _median([r.get("tok_per_s") for r in tr]), "mfu": _median([r.get("mfu") for r in tr]),
           "flops": None, "params": None, "params_ne": None}
    if st["config"]:
        try:
            cfg = model_config_from_dict(st["config"])
        except UserError:
            return out
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = GPT(cfg)
        seq = (st["run"].get("train") or {}).get("seq_len") or cfg.max_seq_len
        out.update(flops=model.flops_per_token(seq) * out["tokens"], params=model.num_params(),
                   params_ne=model.num_params(include_embeddings=False))
    return out


def _median(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


# --- formatting -------------------------------------------------------------------------------

def _dur(s) -> str:
    if s is None:
        return DASH
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{s / 60:.1f} min" if s < 3600 else f"{s / 3600:.2f} h"


def _si(x, unit="") -> str:
    if x is None:
        return DASH
    for p, n in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= n:
            return f"{x / n:.3g} {p}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _scored(s: dict | None) -> bool:
    return bool(s) and isinstance(s.get("acc"), (int, float)) and not math.isnan(s["acc"])  # n = 0: NaN


def _cell(s: dict | None) -> str:
    if not _scored(s):
        return DASH
    lo, hi = s["ci"]
    mark = " ▲" if s.get("above_chance") else ""
    return f"{100 * s['acc']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]{mark}"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(":--" if a == "l" else "--:" for a in align) + "|",
            *["| " + " | ".join(r) + " |" for r in rows]]


def _qualifier(task: dict) -> str:
    """' (refusal rate, lower is better)': what a score means when it is not plain accuracy."""
    parts = [task["metric"]] if task.get("metric") not in (None, "", "accuracy") else []
    parts += ["lower is better"] if task.get("better") == "lower" else []
    return f" ({', '.join(parts)})" if parts else ""


def task_rows(stages: list[dict]) -> list[list[str]]:
    """Task | chance | one cell per stage; slices indented under their task; then lm and format."""
    cells: dict[tuple, dict] = {}  # (task, slice) -> {stage: summary}, in first-seen order
    info: dict[str, dict] = {}
    for st in stages:
        for task, key, s in rows(st["results"] or {}):
            cells.setdefault((task, key), {})[st["name"]] = s
            info.setdefault(task, st["results"]["tasks"][task])
    out = []
    for (task, key), by in cells.items():
        chance = next((s["chance"] for s in by.values() if s.get("chance") is not None), None)
        label = f"&nbsp;&nbsp;↳ {key}" if key else f"**{task}**{_qualifier(info[task])}"
        out.append([label, DASH if chance is None else f"{100 * chance:.1f}%",
                    *[_cell(by.get(st["name"])) for st in stages]])
    res = [st["results"] or {} for st in stages]
    if any("format" in r for r in res):
        out.append(["**chat format** (replies closed with <\\|end\\|>)", DASH,
                    *[_cell(r.get("format")) for r in res]])
    spelled = [r.get("spelling") or {} for r in res]
    for name in rows_to_show(spelled):  # all the chat replies, then the tasks where some stage garbles
        label = "**spelling** (replies whose every word is a word of the world)" if name == "all" \
            else f"&nbsp;&nbsp;↳ {name}"
        out.append([label, DASH, *[_cell(s.get(name)) for s in spelled]])
    if any("lm" in r for r in res):
        out.append(["**language modelling** (bits per byte, lower is better)", DASH,
                    *[f"{r['lm']['bpb']:.4f}" if "lm" in r else DASH for r in res]])
    if any("copy" in r for r in res):
        out.append(["**in-context copying** (loss on a random sequence's 2nd occurrence / 1st; 1 = none)", DASH,
                    *[f"{r['copy']['ratio']:.3f} [{r['copy']['ci'][0]:.2f}, {r['copy']['ci'][1]:.2f}]"
                      if "copy" in r else DASH for r in res]])
    if any("icl" in r for r in res):
        out.append(["**in-context learning** (Olsson et al.: loss late in a context - early, nats; 0 = none)", DASH,
                    *[f"{r['icl']['score']:+.3f} [{r['icl']['ci'][0]:+.2f}, {r['icl']['ci'][1]:+.2f}]"
                      if "icl" in r else DASH for r in res]])
    return out


# --- plots ------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 10,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def _smooth(ys: list[float]) -> list[float]:
    """Centred moving average (no lag, unlike an EMA), its window shrinking at the ends."""
    w = max(1, len(ys) // 40)
    return [statistics.fmean(ys[max(0, i - w):i + w + 1]) for i in range(len(ys))]


def _log_ticks(ax, ticker) -> None:
    """Log y axis with round labelled values (1.2, 1.5, 2, 3, ...): the first steps (~ln V)
    would flatten the rest on a linear axis, and matplotlib's default labels only powers of 10."""
    lo, hi = ax.get_ylim()
    for ms in [(1, 1.2, 1.4, 1.7, 2, 2.5, 3, 4, 5, 6, 8), (1, 1.5, 2, 3, 4, 6, 8), (1, 2, 3, 5), (1, 2, 5), (1,)]:
        vals = [m * 10.0 ** k for k in range(-4, 5) for m in ms if lo <= m * 10.0 ** k <= hi]
        if len(vals) <= 10:  # the densest set that does not crowd the axis
            break
    ax.yaxis.set_major_locator(ticker.FixedLocator(vals))
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())


def plot_loss(stages: list[dict], path: Path) -> None:
    plt = _plt()
    from matplotlib import ticker

    n = len(stages)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5.2 * cols, 4 * math.ceil(n / cols)), squeeze=False)
    for ax, st in zip(axes.flat, stages):
        tr, val = st["train"], st["val"]
        if tr:
            x, y = [r["step"] for r in tr], [r["loss"] for r in tr]
            ax.plot(x, y, lw=0.7, alpha=0.35, color="tab:blue", label=f"train (last {y[-1]:.3f})")
            ax.plot(x, _smooth(y), lw=1.8, color="tab:blue", label="train, smoothed")
        if val:
            v = [r["val_loss"] for r in val]
            ax.plot([r["step"] for r in val], v, "o-", ms=4, lw=1.5, color="tab:orange",
                    label=f"validation (last {v[-1]:.3f})")
        probes = [(key, color, [r for r in val if key in r]) for key, color in (("copy", "tab:green"), ("icl", "tab:red"))]
        if any(rows for _, _, rows in probes):  # use of the context over training: where induction heads form
            ax2 = ax.twinx()  # these drop (copy ratio towards 0, the ICL score below 0)
            for key, color, rows in probes:
                if rows:
                    ax2.plot([r["step"] for r in rows], [r[key] for r in rows], "s--", ms=3, lw=1, color=color,
                             label={"copy": "copy: 2nd / 1st occurrence loss", "icl": "ICL: late - early loss"}[key])
            values = [r[key] for key, _, rows in probes for r in rows]
            ax2.set_ylim(min(0.0, min(values) * 1.05), max(1.1, max(values) * 1.05))
            ax2.set_ylabel("use of context (copy ratio; ICL score, nats)")
            ax2.legend(loc="lower left", fontsize="small")
        if tr or val:
            ax.set_yscale("log")
            _log_ticks(ax, ticker)
            ax.legend(loc="upper right")
        else:
            ax.text(0.5, 0.5, "no training records", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=st["name"], xlabel="step", ylabel="loss (nats/token)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def plot_tasks(stages: list[dict], path: Path) -> bool:
    """Grouped horizontal bars: each task's main score per stage, 95% CI, chance as a black tick."""
    evald = [st for st in stages if st["results"]]
    names = list(dict.fromkeys(t for st in evald for t in st["results"]["tasks"]))
    if not names:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 1.0 + 0.32 * len(names) * max(2, len(evald))))
    h = 0.8 / len(evald)
    for j, st in enumerate(evald):
        ys, xs, err = [], [], [[], []]
        for i, t in enumerate(names):
            s = st["results"]["tasks"].get(t)
            if _scored(s):
                ys.append(i - 0.4 + h * (j + 0.5))
                xs.append(100 * s["acc"])
                # never negative: results written before stats.wilson held 0 of n exactly had ci[0] ~ 1e-18
                err[0].append(100 * max(0.0, s["acc"] - s["ci"][0]))
                err[1].append(100 * max(0.0, s["ci"][1] - s["acc"]))
        ax.barh(ys, xs, height=h * 0.9, xerr=err, capsize=2, label=st["name"], error_kw={"lw": 1})
        for y, x, e in zip(ys, xs, err[1]):  # the value, past the interval (a 0% bar is invisible)
            ax.text(x + e + 1, y, f"{x:.0f}%", va="center", fontsize=9)
    for i, t in enumerate(names):
        ch = next((st["results"]["tasks"][t].get("chance") for st in evald
                   if st["results"]["tasks"].get(t, {}).get("chance") is not None), None)
        if ch is not None:
            ax.plot([100 * ch] * 2, [i - 0.45, i + 0.45], color="black", lw=2,
                    label="chance" if "chance" not in ax.get_legend_handles_labels()[1] else None)
    info = {t: s for st in reversed(evald) for t, s in st["results"]["tasks"].items()}
    ax.set_yticks(range(len(names)), [t + _qualifier(info[t]).replace(" (", "\n(") for t in names])
    ax.invert_yaxis()
    ax.set(xlim=(0, 110), xticks=range(0, 101, 20), xlabel="score (%), bars = 95% CI", title="tasks by stage")
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)
    return True


def plot_throughput(stages: list[dict], path: Path) -> bool:
    plotted = [st for st in stages if any("tok_per_s" in r for r in st["train"])]
    if not plotted:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(plotted), figsize=(5.2 * len(plotted), 3.6), squeeze=False)
    for ax, st in zip(axes.flat, plotted):
        recs = [r for r in st["train"] if "tok_per_s" in r]
        x, y = [r["step"] for r in recs], [r["tok_per_s"] for r in recs]
        ax.plot(x, y, lw=0.7, alpha=0.35, color="tab:green", label="per step")
        ax.plot(x, _smooth(y), lw=1.8, color="tab:green", label="smoothed")
        ax.axhline(statistics.median(y), ls="--", lw=1, color="gray", label=f"median {statistics.median(y):,.0f}")
        ax.set_ylim(bottom=0)
        ax.set(title=st["name"], xlabel="step", ylabel="tokens / s")
        ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, path)
    return True


# --- the report -------------------------------------------------------------------------------

HOW_TO_READ = (
    "**How to read this.** Each task cell is the score on the n items evaluated with its 95% "
    "Wilson interval in brackets (with a few dozen items the interval is wide: two stages whose "
    "intervals overlap may not differ at all; `lmstack eval --compare A B` runs the paired test). "
    "▲ marks a score above chance, and only when the interval's lower end is above the chance "
    "level. Slices (↳) break a task down by a field of its items. A stage with no eval results "
    f"shows {DASH}; so does a task it was not evaluated on (chat tasks are skipped for a base model). "
    "Bits per byte (lower is better) is on the text named in each stage's line; by default the pretraining "
    "data's validation split, for a chat model too (it shows how much plain-text modelling survived). Training "
    "FLOPs are 6·N·tokens plus attention (`GPT.flops_per_token`), over the tokens processed.")


def report(run, out=None) -> Path:
    """Write RUN's report card (report.md and its PNGs) to `out` (default RUN); return report.md."""
    t0 = time.time()
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run} does not exist")
    if not run.is_dir():
        raise UserError(f"{run} is not a folder (give a run folder or a model folder)")
    speedrun = read_json(run / "speedrun.json")
    speedrun = speedrun if isinstance(speedrun, dict) else None
    dirs = find_stages(run, speedrun)
    if not dirs:
        raise UserError(f"{run} is not a run or model folder: no model.safetensors + metrics.jsonl in it "
                        "or its subfolders")
    stages = [load_stage(d, speedrun) for d in dirs]
    out = Path(out) if out is not None else run
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    utc = "%Y-%m-%d %H:%M UTC"
    started = min((st["dir"] / "run.json").stat().st_mtime if (st["dir"] / "run.json").exists()
                  else st["dir"].stat().st_mtime for st in stages)  # run.json is written when training starts
    md = [f"# Report card: {run.resolve().name}", "",
          f"Run folder `{run}`, training started {datetime.fromtimestamp(started, timezone.utc):{utc}}; "
          f"report written {datetime.now(timezone.utc):{utc}}.", ""]
    if speedrun:
        ov = ", ".join(f"`{o}`" for o in speedrun.get("overrides") or []) or "none"
        md += [f"Speedrun preset **{speedrun.get('preset')}**, {speedrun.get('people')} people in the world, "
               f"overrides: {ov}.", ""]
        times = {k: v.get("seconds") for k, v in speedrun.get("stages", {}).items() if isinstance(v, dict)}
        total = sum(v for v in times.values() if v)
        md += [f"Total time **{_dur(total)}**: " + " · ".join(f"{k} {_dur(v)}" for k, v in times.items()), ""]
    else:
        md += [f"Total training time **{_dur(sum(st['seconds'] or 0 for st in stages))}** "
               f"over {len(stages)} stage(s): {', '.join(st['name'] for st in stages)}.", ""]

    plot_loss(stages, out / "loss.png")
    md += ["## Loss curves", "", "![training and validation loss per stage](loss.png)", ""]

    md += ["## Tasks", ""]
    scored = [st for st in stages if st["scored"]]
    trows = task_rows(scored)
    if trows:
        md += _table(["task", "chance", *[st["name"] for st in scored]], trows, "lr" + "r" * len(scored)) + [""]
    else:
        md += ["No stage has eval results yet.", ""]
    for st in stages:
        r = st["results"]
        if not st["scored"]:
            acc = (read_json(st["dir"] / "reward_eval.json") or {}).get("held_out") or {}
            md.append(f"- {st['name']}: a reward model" + (
                f"; held-out pairwise accuracy {100 * acc['accuracy']:.1f}% "
                f"[{100 * acc['ci'][0]:.1f}, {100 * acc['ci'][1]:.1f}] on {acc['n']} comparisons (chance 50%)"
                if "accuracy" in acc else ""))
            continue
        if r:
            lm = f"; bits per byte on {r['lm']['source']}" if "lm" in r else ""
            md.append(f"- {st['name']}: `{st['results_path']}` ({r.get('time', '?')}, {r.get('dtype', '?')}, "
                      f"limit {r.get('limit') or 'none'}{lm})")
        else:
            md.append(f"- {st['name']}: no eval results (run `lmstack eval --model {st['dir']}`)")
    md.append("")
    if plot_tasks(scored, out / "tasks.png"):
        md += ["![main score per task and stage, with 95% intervals and chance](tasks.png)", ""]
    else:
        (out / "tasks.png").unlink(missing_ok=True)  # a previous report's plot would contradict this one
    md += [HOW_TO_READ, ""]

    md += ["## Throughput and cost", ""]
    crows = []
    for st in stages:
        c = costs(st)
        crows.append([st["name"], _dur(st["seconds"]), f"{c['steps']:,}", _si(c["tokens"]),
                      _si(c["tok_per_s"]), DASH if c["mfu"] is None else f"{100 * c['mfu']:.1f}%",
                      _si(c["flops"], "FLOP"), _si(c["params"]), _si(c["params_ne"])])
    md += _table(["stage", "wall time", "steps", "tokens", "tokens/s (median)", "MFU (median)",
                  "training FLOPs", "params", "params (no embeddings)"], crows, "lrrrrrrrr") + [""]
    if plot_throughput(stages, out / "throughput.png"):
        md += ["![tokens per second during training](throughput.png)", ""]
    else:
        (out / "throughput.png").unlink(missing_ok=True)

    newest = max((st["results"] for st in stages if st["results"] and st["results"].get("environment")),
                 key=lambda r: r.get("time", ""), default=None)
    if newest:
        env, where = newest["environment"], f"as recorded by the newest eval ({newest.get('time', '?')})"
    else:
        env, where = environment(), "of the machine writing this report"
    md += ["## Environment", "", f"Environment {where}:", ""]
    md += [f"- {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in env.items()]
    md += ["", f"_Report generated in {time.time() - t0:.1f} s by `lmstack report`._", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    print(f"report -> {path}")
    return path
