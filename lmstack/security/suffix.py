"""The adversarial-suffix suite (`lmstack gcg`, and `lmstack redteam --suite suffix`): GCG
(individual or universal), its success on held-out cases and its transfer to other models, the
soft-prompt upper bound, the perplexity filter before/after, and the adaptive attack against it.

`suffix_suite` writes to `out`: suffix.json (the suffixes and every number), losses.jsonl (each
step's loss of every run), loss.png (the curves) and report.md (success with n and a Wilson
interval per set). The attacks themselves live in gcg.py, the filter in perplexity.py.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from lmstack.modelio import load_model_and_tokenizer
from lmstack.security import gcg as G
from lmstack.security import perplexity as P
from lmstack.stats import wilson
from lmstack.utils import UserError, atomic_output_dir, check_output_dir, read_jsonl


def benign_prompts(world_dir, n_fit: int = 400, n_test: int = 400, seed: int = 0) -> tuple[list[str], list[str]]:
    """Benign user prompts of a world: the threshold is fitted on the first user message of SFT
    conversations, its false positives counted on the probes' questions (phrasings and people
    SFT held out): other benign prompts."""
    world_dir = Path(world_dir)
    fit = []
    for _, row in read_jsonl(world_dir / "sft.jsonl", "world SFT data"):
        user = next((m.get("content") for m in row.get("messages", []) if m.get("role") == "user"), None)
        if isinstance(user, str) and user.strip():
            fit.append(user)
    test = []
    for name in ("benign", "facts", "nonexistent", "inverse"):
        f = world_dir / "probes" / f"{name}.jsonl"
        if f.is_file():
            test += [r["question"] for _, r in read_jsonl(f, "probes") if isinstance(r.get("question"), str)]
    rng = random.Random(seed)
    rng.shuffle(fit)
    rng.shuffle(test)
    return fit[:n_fit], test[:n_test]


def _cases(x) -> list[G.Case]:
    return G.read_cases(x) if isinstance(x, (str, Path)) else list(x or [])


def _rate(r: dict) -> dict:
    return {k: r[k] for k in ("n", "k", "rate", "ci")}


def suffix_suite(model_dir, cases_train, cases_heldout, out, *, universal: bool = True, steps: int = 100,
                 k: int = 20, top_k: int = 64, batch: int = 64, transfer=(), ppl_weight: float = 0.0,
                 world=None, soft_steps: int = 100, soft_lr: float = 0.05, seed: int = 0, max_tokens: int = 48,
                 detector=G.contains_target, progressive: bool = False, force: bool = False, log=print) -> dict:
    """Run the suite (see the module's docstring). cases_*: a cases file or a list of Case.
    Individual mode (universal False): every train case gets its own suffix and soft prompt,
    measured on its own case; held-out cases are then unused. world: a world folder whose
    benign prompts fit the perplexity filter (no world: no filter)."""
    check_output_dir(out, force)
    train, heldout = _cases(cases_train), _cases(cases_heldout)
    if not train:
        raise UserError("no cases to attack")
    for t in transfer:
        if not (Path(t) / "config.json").is_file():
            raise UserError(f"transfer model {t} not found (no config.json)")
    model, tok = load_model_and_tokenizer(model_dir, kind="chat")
    say = log or (lambda *_: None)
    curves, res = [], {"model": str(model_dir), "universal": universal, "settings": {
        "steps": steps, "suffix_len": k, "top_k": top_k, "batch": batch, "soft_steps": soft_steps, "soft_lr": soft_lr,
        "seed": seed, "max_tokens": max_tokens, "ppl_weight": ppl_weight, "progressive": progressive}}
    t0 = time.time()

    def run_gcg(name, cases, **kw):
        def note(row):
            curves.append({"run": name, **row})
            if row["step"] % 10 == 0 or row["hit"]:
                say(f"[{name}] step {row['step']} loss {row['loss']:.3f}{' HIT' if row['hit'] else ''} "
                    f"{row['suffix']!r} ({row['seconds']:.0f}s)")
        r = G.gcg(model, tok, cases, steps=steps, k=k, top_k=top_k, batch=batch, seed=seed, log=note, **kw)
        return {kk: v for kk, v in r.items() if kk != "steps"} | {"n_steps": len(r["steps"])}

    res["cache_speedup"] = G.cache_speedup(model, tok, train[0], k=k, batch=batch)
    sets = {"train": train, "heldout": heldout} if universal else {"train": train}
    res["baseline"] = {s: _rate(G.success(model, tok, c, "", detector, max_tokens)) for s, c in sets.items() if c}

    # GCG: one suffix for all train cases, or one per case.
    if universal:
        res["gcg"] = run_gcg("gcg", train, progressive=progressive)
        suffixes = {s: res["gcg"]["suffix"] for s in sets}
    else:
        res["gcg"] = [run_gcg(f"gcg-{i}", [c]) for i, c in enumerate(train)]
        suffixes = {"train": [r["suffix"] for r in res["gcg"]]}
    runs = {s: G.success(model, tok, sets[s], suffixes[s], detector, max_tokens) for s in sets if sets[s]}
    res["success"] = {s: _rate(r) for s, r in runs.items()}
    res["replies"] = {s: r["rows"] for s, r in runs.items()}

    # Transfer: the same strings to other models (their own tokenizer and chat format).
    res["transfer"] = {}
    measure_set = "heldout" if universal and heldout else "train"
    for t in transfer:
        m2, tok2 = load_model_and_tokenizer(t, kind="chat")
        res["transfer"][str(t)] = {
            "set": measure_set,
            "baseline": _rate(G.success(m2, tok2, sets[measure_set], "", detector, max_tokens)),
            "success": _rate(G.success(m2, tok2, sets[measure_set], suffixes[measure_set], detector, max_tokens))}
        del m2

    # The soft prompt: the white-box upper bound in embedding space.
    if soft_steps > 0:
        def soft(name, cases):
            r = G.soft_prompt(model, tok, cases, k=k, steps=soft_steps, lr=soft_lr,
                              log=lambda row: curves.append({"run": name, **row}))
            say(f"[{name}] loss {r['steps'][0]['loss']:.3f} -> {r['steps'][-1]['loss']:.3f} ({r['seconds']:.0f}s)")
            return r
        if universal:
            sp = soft("soft", train)
            got = {s: G.soft_success(model, tok, c, sp["embeds"], detector, max_tokens) for s, c in sets.items() if c}
            res["soft"] = {s: _rate(r) for s, r in got.items()}
            res["replies"].update({f"soft_{s}": r["rows"] for s, r in got.items()})
            res["soft"]["final_loss"] = sp["steps"][-1]["loss"]
        else:
            hits = []
            for i, c in enumerate(train):
                sp = soft(f"soft-{i}", [c])
                hits += G.soft_success(model, tok, [c], sp["embeds"], detector, max_tokens)["rows"]
            res["replies"]["soft_train"] = hits
            kk = sum(h["hit"] for h in hits)
            res["soft"] = {"train": {"n": len(hits), "k": kk, "rate": kk / len(hits), "ci": list(wilson(kk, len(hits)))}}

    # The perplexity filter, fitted on the world's benign prompts; and the adaptive attack.
    if world is not None:
        fit, test = benign_prompts(world)
        filt = P.fit_filter(model, tok, fit)
        fp = P.flags(model, tok, test, filt)
        res["filter"] = {**filt, "n_test": len(test),
                         "fpr_whole": sum(f["flag_whole"] for f in fp) / len(fp),
                         "fpr_windowed": sum(f["flag_windowed"] for f in fp) / len(fp)}
        s_eval = measure_set
        plain_prompts = [c.messages[-1]["content"] for c in sets[s_eval]]
        res["filter"]["plain_flagged"] = _flag_rates(P.flags(model, tok, plain_prompts, filt))
        res["filter"]["gcg"] = _through(model, tok, filt, runs[s_eval]["rows"])
        if ppl_weight > 0:
            if universal:
                res["adaptive"] = run_gcg("adaptive", train, progressive=progressive, ppl_weight=ppl_weight,
                                          ppl_window=filt["window"], ppl_threshold=filt["windowed"])
                adaptive_suffix = {s: res["adaptive"]["suffix"] for s in sets}
            else:
                res["adaptive"] = [run_gcg(f"adaptive-{i}", [c], ppl_weight=ppl_weight, ppl_window=filt["window"],
                                           ppl_threshold=filt["windowed"]) for i, c in enumerate(train)]
                adaptive_suffix = {"train": [r["suffix"] for r in res["adaptive"]]}
            ra = G.success(model, tok, sets[s_eval], adaptive_suffix[s_eval], detector, max_tokens)
            res["filter"]["adaptive"] = {"success": _rate(ra), **_through(model, tok, filt, ra["rows"])}
            res["replies"]["adaptive"] = ra["rows"]
    res["seconds"] = round(time.time() - t0, 1)

    out = Path(out)
    with atomic_output_dir(out, force) as tmp:
        (tmp / "suffix.json").write_text(json.dumps(res, indent=1) + "\n")
        (tmp / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curves))
        plot_losses(curves, tmp / "loss.png")
        (tmp / "report.md").write_text(report(res))
    return res


def _flag_rates(fl: list[dict]) -> dict:
    n = len(fl)
    return {"n": n, "whole": sum(f["flag_whole"] for f in fl) / max(n, 1),
            "windowed": sum(f["flag_windowed"] for f in fl) / max(n, 1)}


def _through(model, tok, filt: dict, rows: list[dict]) -> dict:
    """The suffixed prompts the filter flags, and the attack's success through it (a hit whose
    prompt the windowed filter lets pass)."""
    fl = P.flags(model, tok, [r["prompt"] for r in rows], filt)
    k = sum(r["hit"] and not f["flag_windowed"] for r, f in zip(rows, fl))
    n = len(rows)
    return {"flagged": _flag_rates(fl), "through_filter": {"n": n, "k": k, "rate": k / max(n, 1),
                                                           "ci": list(wilson(k, n))}}


def plot_losses(curves: list[dict], path) -> None:
    """Each run's loss per step (GCG: the chosen candidate's target loss; soft: Adam's loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    runs: dict[str, list] = {}
    for r in curves:
        runs.setdefault(r["run"], []).append((r["step"], r["loss"]))
    for name, pts in runs.items():
        kind = name.split("-")[0]
        style, color = {"gcg": ("-", "C0"), "adaptive": ("--", "C1"), "soft": (":", "C2")}.get(kind, ("-", "C3"))
        label = kind if "-" not in name or name.endswith("-0") else None  # one legend entry per kind
        ax.plot(*zip(*pts), style, color=color, label=label, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("target cross-entropy (nats/token)")
    ax.set_title("adversarial suffix: loss per step")
    if runs:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(r: dict | None) -> str:
    if not r:
        return "-"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.0f}% ({r['k']}/{r['n']}, {100 * lo:.0f}-{100 * hi:.0f})"


def _speedup_line(c: dict | None) -> str:
    if not c:
        return ""
    return (f"Prefix KV cache: {c['batch']} candidates x ({c['prefix_tokens']} prefix + {c['rest_tokens']} "
            f"tokens) in {c['cached_s']:.2f} s cached, {c['uncached_s']:.2f} s recomputed ({c['speedup']:.2f}x).")


def report(res: dict) -> str:
    """The markdown report: success per set with n and a 95% Wilson interval."""
    mode = "universal" if res["universal"] else "individual"
    s = res["settings"]
    lines = [f"# Adversarial suffixes on {res['model']}", "",
             f"GCG ({mode}): {s['steps']} steps max, suffix {s['suffix_len']} tokens, top-k {s['top_k']}, "
             f"batch {s['batch']}; greedy replies of up to {s['max_tokens']} tokens; {res['seconds']:.0f} s.", "",
             _speedup_line(res.get("cache_speedup")), "",
             "| attack | set | success (k/n, 95% CI) |", "|---|---|---|"]
    for name, r in res["baseline"].items():
        lines.append(f"| no suffix | {name} | {_cell(r)} |")
    for name, r in res["success"].items():
        lines.append(f"| GCG suffix | {name} | {_cell(r)} |")
    for t, r in res["transfer"].items():
        lines.append(f"| no suffix, transfer model {t} | {r['set']} | {_cell(r['baseline'])} |")
        lines.append(f"| GCG suffix -> {t} | {r['set']} | {_cell(r['success'])} |")
    for name, r in (res.get("soft") or {}).items():
        if isinstance(r, dict):
            lines.append(f"| soft prompt (embeddings) | {name} | {_cell(r)} |")
    f = res.get("filter")
    if f:
        lines += ["", f"Perplexity filter (window {f['window']} tokens), thresholds fitted to pass "
                      f"{100 * f['quantile']:.0f}% of {f['n_fit']} benign prompts: whole {f['whole']:.2f}, "
                      f"windowed {f['windowed']:.2f} nats/token. False positives on {f['n_test']} other benign "
                      f"prompts: whole {100 * f['fpr_whole']:.1f}%, windowed {100 * f['fpr_windowed']:.1f}%; "
                      f"plain requests flagged (windowed): {100 * f['plain_flagged']['windowed']:.0f}%.", "",
                  "| attack | prompts flagged (whole / windowed) | success through the windowed filter |",
                  "|---|---|---|"]
        g = f["gcg"]
        lines.append(f"| GCG | {100 * g['flagged']['whole']:.0f}% / {100 * g['flagged']['windowed']:.0f}% | "
                     f"{_cell(g['through_filter'])} |")
        if "adaptive" in f:
            a = f["adaptive"]
            lines.append(f"| adaptive GCG (+{s['ppl_weight']} x filter score), before the filter | - | {_cell(a['success'])} |")
            lines.append(f"| adaptive GCG | {100 * a['flagged']['whole']:.0f}% / {100 * a['flagged']['windowed']:.0f}% | "
                         f"{_cell(a['through_filter'])} |")
    g = res["gcg"]
    suffixes = [g] if isinstance(g, dict) else g
    lines += ["", "Suffixes (as typed after the request):", ""]
    lines += [f"- `{x['suffix']!r}` (loss {x['loss']:.3f}, {x['n_steps']} steps, {'hit' if x['hit'] else 'no hit'})"
              for x in suffixes]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)
