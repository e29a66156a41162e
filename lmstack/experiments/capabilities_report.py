"""The capability tracker's outputs (lmstack/scaling/capabilities.py gathers the columns): the
markdown table, what fails at the largest scale measured with the command that re-runs it larger,
and one plot per task of exact match and each continuous score against training compute and
against validation loss."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from lmstack.eval.run import BUILTIN

SCALES = ("tiny", "small", "gpt2")  # the presets (and the experiments' scales), smallest first
GPU_SCALE = "gpt2"  # the first that wants a GPU
CONTINUOUS = {"answer_logprob": "answer log-prob (nats)", "digit_acc": "per-digit accuracy"}
DASH = "—"


def slug(text: str) -> str:
    """A name safe as a file name."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "task"


def tasks_of(columns: list[dict]) -> list[str]:
    """Every task some column holds, in the order first seen."""
    return list(dict.fromkeys(t for c in columns for t in c["tasks"]))


# --- numbers as text ------------------------------------------------------------------------------

def _value(task: str, x: float) -> str:
    return f"{x:.3f}" if task in BUILTIN else f"{100 * x:.1f}%"  # a measure such as copying is a ratio


def _si(x) -> str:
    return DASH if x is None else f"{x:.3g}"


def cell_text(task: str, c: dict | None) -> str:
    """'13.1% [11.3–15.1] ▲ · lp -2.31 · digits 45.0% · prior 12.9%'; ▲ emerged, ▽ not, no mark: no bar."""
    if not c or not isinstance(c.get("acc"), (int, float)) or "ci" not in c:
        return DASH
    lo, hi = c["ci"]
    text = f"{_value(task, c['acc'])} [{_value(task, lo)}–{_value(task, hi)}]"
    text += {True: " ▲", False: " ▽"}.get(c.get("emerged"), "")
    if "answer_logprob" in c:
        text += f" · lp {c['answer_logprob']:.2f}"
    if "digit_acc" in c:
        text += f" · digits {100 * c['digit_acc']:.1f}%"
    if c.get("baseline") is not None:
        text += f" · prior {_value(task, c['baseline'])}"
    return text


def _row(cells) -> str:
    return "| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|", *[_row(r) for r in rows]]


# --- what fails, and the command that re-runs it larger -------------------------------------------

def _with_scale(command, scale: str) -> str | None:
    """A record's own command (`lmstack experiment run ...`) with another --scale: its seeds,
    variants and folders kept. None when it has no --scale to change."""
    try:
        args = shlex.split(command or "")
    except ValueError:
        return None
    if "--scale" not in args[:-1]:
        return None
    args[args.index("--scale") + 1] = scale
    return shlex.join(args)


def rerun_command(col: dict, out) -> str:
    """The one command that measures this column's run again at the next larger scale."""
    scale = col.get("scale")
    bigger = SCALES[SCALES.index(scale) + 1] if scale in SCALES[:-1] else None
    if col["kind"] == "record":
        store = Path(col["path"])
        store = store if store.is_dir() else store.parent
        target = bigger or "FILE"
        cmd = (_with_scale(col.get("command"), target)
               or f"lmstack experiment run {col['experiment']} --scale {target} --results {store}")
    else:
        target = bigger or (GPU_SCALE if scale is None else "FILE")
        cmd = (f"lmstack speedrun --preset {target} --out runs/{slug(target)} && "
               f"lmstack capabilities runs/{slug(target)} --out {out}")
    if target == GPU_SCALE:
        cmd += "  (gpt2 wants a GPU)"
    elif target == "FILE":
        cmd += f"  (FILE: a preset larger than {scale})"
    return cmd


def fails(columns: list[dict], out) -> list[dict]:
    """Each task not emerged in the column of the largest compute that measured it (a task with no
    bar is left out: nothing to clear), with the command that re-runs that column larger."""
    found = []
    for task in tasks_of(columns):
        have = [c for c in columns if task in c["tasks"]]
        top = max(have, key=lambda c: (c["flops"] is not None, c["flops"] or 0))
        s = top["tasks"][task]
        if s.get("emerged") is False:
            found.append({"task": task, "column": top["label"], "flops": top["flops"], "acc": s["acc"], "ci": s["ci"],
                          "bar": s["bar"], "better": s["better"], "cell": cell_text(task, s),
                          "command": rerun_command(top, out)})
    return found


# --- the report -----------------------------------------------------------------------------------

def write_report(doc: dict, out: Path) -> str:
    """capabilities.md's text; writes the plots (one PNG per task) into `out`."""
    columns = doc["columns"]
    tasks = tasks_of(columns)
    legend = (f"{len(columns)} columns, ordered by training compute; {len(tasks)} tasks. A cell: exact match with "
              "its 95% Wilson interval; **▲** emerged (the whole interval above the bar: the higher of chance and "
              "the answer's prior, the score with the subject swapped; below it for a lower-is-better measure), ▽ "
              "not (yet), no mark: no bar to clear; lp: the answer's mean log-probability (nats); digits: per-digit "
              "accuracy; prior: the subject-swapped score.")
    md = ["# Capabilities", "", legend, "", "## Columns", ""]
    md += _table(["column", "kind", "training FLOPs", "N (non-embedding)", "N (all)", "D (tokens)", "validation loss"],
                 [[c["label"], c["kind"], _si(c["flops"]), _si(c["N"]), _si(c["N_total"]), _si(c["D"]),
                   DASH if c["val_loss"] is None else f"{c['val_loss']:.4f} ({c['val_source']})"] for c in columns])
    md += ["", "## Tasks", ""]
    rows = []
    for task in tasks:
        first = next(c["tasks"][task] for c in columns if task in c["tasks"])
        chance = first.get("chance")
        rows.append([f"**{task}**" + (" (lower is better)" if first.get("better") == "lower" else ""),
                     DASH if chance is None else _value(task, chance),
                     *[cell_text(task, c["tasks"].get(task)) for c in columns]])
        for key in dict.fromkeys(k for c in columns for k in c["tasks"].get(task, {}).get("slices", {})):
            rows.append([f"&nbsp;&nbsp;↳ {key}", "",
                         *[cell_text(task, c["tasks"].get(task, {}).get("slices", {}).get(key)) for c in columns]])
    md += _table(["task", "chance", *[c["label"] for c in columns]], rows)
    md += ["", "## What fails at the largest scale measured", ""]
    if doc["fails"]:
        md += _table(["task", "largest scale measured", "score", "re-run at a larger scale"],
                     [[f["task"], f"{f['column']} ({_si(f['flops'])} FLOPs)", f["cell"], f"`{f['command']}`"]
                      for f in doc["fails"]])
    else:
        md.append("Every task with a bar has emerged at the largest scale that measured it.")
    md += ["", "## Plots", ""]
    for task in tasks:
        plot_task(task, columns, out / f"{slug(task)}.png")
        md.append(f"![{task}]({slug(task)}.png)")
    return "\n".join(md) + "\n"


# --- plots ----------------------------------------------------------------------------------------

AXES = (("flops", "training FLOPs"), ("val_loss", "validation loss (nats/token; better to the right)"))


def plot_task(task: str, columns: list[dict], path: Path) -> None:
    """Rows: exact match, then each continuous score the task has; columns: against training FLOPs,
    against validation loss. One line per series (a model and its checkpoints; an experiment's
    variant across scales); error bars: the 95% intervals; dashed: chance."""
    import matplotlib

    matplotlib.use("Agg")  # no display; before pyplot
    import matplotlib.pyplot as plt

    have = [c for c in columns if task in c["tasks"]]
    metrics = ["acc"] + [k for k in CONTINUOUS if any(k in c["tasks"][task] for c in have)]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.4 * len(metrics)), squeeze=False)
    series = list(dict.fromkeys(c["series"] for c in have))
    for (xkey, xlabel), col in zip(AXES, range(2)):
        for m, ax in zip(metrics, axes[:, col]):
            for name in series:
                pts = sorted((c for c in have if c["series"] == name and c[xkey] is not None
                              and c["tasks"][task].get(m) is not None), key=lambda c: c[xkey])
                if not pts:
                    continue
                xs, ys = [c[xkey] for c in pts], [c["tasks"][task][m] for c in pts]
                if m == "acc":
                    err = [[y - c["tasks"][task]["ci"][0] for y, c in zip(ys, pts)],
                           [c["tasks"][task]["ci"][1] - y for y, c in zip(ys, pts)]]
                    ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=name)
                else:
                    ax.plot(xs, ys, marker="o", ms=4, label=name)
            chance = {c["tasks"][task].get("chance") for c in have} - {None}
            if m == "acc" and len(chance) == 1:
                ax.axhline(chance.pop(), color="grey", ls="--", lw=1, label="chance")
            if xkey == "flops":
                ax.set_xscale("log")
            else:
                ax.invert_xaxis()
            ax.set(xlabel=xlabel, ylabel="exact match" if m == "acc" else CONTINUOUS[m])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(task)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
