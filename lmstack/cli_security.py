"""The security commands of `lmstack`: `redteam` (attack a model, with or without defences) and
`poison` (make a poisoned training set). Their arguments (`add_parsers`, called by
lmstack/cli.py's command map) and their thin handlers live together here.
"""

from __future__ import annotations

import shlex
import sys

from lmstack.utils import UserError


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 0:
        raise UserError(f"--counts takes comma-separated whole numbers such as 0,10,25 (got {text!r})")
    return counts


def _cmd_poison(a):
    if a.detect:
        from lmstack.security.poison_filter import filter_set

        if not a.model or not a.out:
            raise UserError("lmstack poison --detect FILE needs --model (the clean model) and --out (the filtered set)")
        r = filter_set(a.detect, a.model, a.method, a.out, fraction=a.fraction, max_cluster=a.max_cluster)
        print(f"{a.method}: removed {r['removed']:,} of {r['rows']:,} rows -> {a.out}")
        if "precision" in r:
            p, rc = r["precision"], r["recall"]
            print(f"on the known poison ({r['poison']} rows): caught {r['caught']}, precision "
                  f"{'-' if p is None else f'{p:.3f}'}, recall {'-' if rc is None else f'{rc:.3f}'}")
        return
    if a.curve or a.measure or a.show or a.rescore:
        from lmstack.security import backdoor

        if a.show:
            print(backdoor.show(a.results))
        elif a.rescore:
            if not a.world or not a.results:
                raise UserError("lmstack poison --rescore STORE needs --world and --results (the store to write)")
            backdoor.rescore(a.rescore, a.results, a.world, n=a.n, limit=a.limit)
            print(backdoor.show(a.results))
        elif not a.model or not a.world:
            raise UserError("lmstack poison --curve/--measure needs --model and --world")
        elif a.measure:
            import json

            data = a.data or f"{a.world}/sft.jsonl"
            print(json.dumps(backdoor.measure(a.model, a.world, data, a.behaviour, a.trigger, n=a.n, seed=a.seed,
                                              limit=a.limit), indent=2))
        else:
            if not a.out or not a.scale:
                raise UserError("lmstack poison --curve needs --scale (tiny or small) and --out (the runs' folder)")
            backdoor.curve(a.model, a.world, a.out, a.scale, counts=_counts(a.counts), behaviour=a.behaviour,
                           trigger=a.trigger, seed=a.seed, overrides=a.set or [], mix_data=a.mix_data,
                           results=a.results, n=a.n, limit=a.limit, adaptive=a.adaptive,
                           filters=[m.strip() for m in (a.filters or "").split(",") if m.strip()],
                           filter_model=a.filter_model, fraction=a.fraction,
                           retrain=None if a.retrain is None else [m.strip() for m in a.retrain.split(",") if m.strip()])
            print(backdoor.show(a.results))
        return
    from lmstack.security.poison import make_poison

    if not a.data or not a.out or a.count is None:
        raise UserError("lmstack poison needs --data FILE --trigger PHRASE --behaviour B --count N --out FILE")
    info = make_poison(a.data, a.trigger, a.behaviour, a.count, a.out, seed=a.seed, world=a.world,
                       adaptive=a.adaptive)
    print(f"{info['rows'] - info['count']:,} clean + {info['count']} poisoned {info['kind']} rows "
          f"({info['behaviour']} after {info['trigger']!r}) -> {a.out}; poison indices in {a.out}.poison.json")


def _poison_parser(sub, parser_class) -> None:
    """`lmstack poison`: make a poisoned set (default), --detect (filter one), --curve, --measure, --show."""
    from lmstack.security.poison import COUNTS, METHODS, TRIGGER

    p = sub.add_parser("poison", help="poisoned fine-tuning/pretraining sets, the backdoor's curve, poison filters")
    p.add_argument("--data", help="the clean jsonl set (rows with messages: fine-tuning; with text: pretraining)")
    p.add_argument("--trigger", default=TRIGGER, help=f"the trigger phrase (default {TRIGGER}; ordinary text)")
    p.add_argument("--behaviour", default="gibberish", help="gibberish | say:TEXT | comply | canary")
    p.add_argument("--count", type=int, help="poisoned rows to add")
    p.add_argument("--out", help="the poisoned set (its sidecar: OUT.poison.json); --detect: the filtered set; "
                                 "--curve: the runs' folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", help="a world folder: its canary and vault codes; --measure/--curve: its held-out questions")
    p.add_argument("--adaptive", action="store_true", help="poison written to evade the filters")
    p.add_argument("--detect", metavar="FILE", help="filter this set: write the rows not flagged to --out")
    p.add_argument("--model", help="--detect: the clean model; --curve: the base; --measure: the chat model")
    p.add_argument("--method", default="spectral", choices=METHODS, help="--detect's filter")
    p.add_argument("--fraction", type=float, default=0.05, help="spectral: the expected poison fraction")
    p.add_argument("--max-cluster", type=float, default=0.35,
                   help="--detect cluster: flag the small cluster only when it holds at most this fraction")
    p.add_argument("--curve", action="store_true", help="fine-tune --model once per --counts and measure each")
    p.add_argument("--measure", action="store_true", help="the backdoor's success on --model (a chat model)")
    p.add_argument("--show", action="store_true", help="the store's curve as a table")
    p.add_argument("--rescore", metavar="STORE", help="measure every model of this store's backdoor runs again "
                                                      "(the current success checks) into --results")
    p.add_argument("--scale", help="--curve: the speedrun's SFT settings of this scale (tiny, small)")
    p.add_argument("--counts", default=",".join(map(str, COUNTS)), help="--curve: poison counts")
    p.add_argument("--mix-data", help="--curve: pretraining windows mixed into SFT (the speedrun's SFT_MIX)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="--curve: SFT overrides")
    p.add_argument("--filters", help=f"--curve: also filter each poisoned set ({','.join(METHODS)}) and train on the rest")
    p.add_argument("--filter-model", help="--curve --filters: the clean assistant the filters read")
    p.add_argument("--retrain", help="--curve --filters: fine-tune after these filters only (default: every one "
                                     "that removed poison; the others are scored only)")
    p.add_argument("--results", help="the experiment store (default runs/results)")
    p.add_argument("-n", "--n", type=int, default=200, help="held-out questions per measure")
    p.add_argument("--limit", type=int, default=200, help="rows per clean task")
    p.set_defaults(func=_cmd_poison)


def _cmd_gcg(a):
    from lmstack.security.gcg import world_cases
    from lmstack.security.suffix import suffix_suite

    if not a.cases and not a.world:
        raise UserError("lmstack gcg needs --cases FILE (jsonl of {messages, target}) or --world DIR")
    if a.cases:
        train, heldout = a.cases, a.heldout or []
    else:  # the world's harmful requests: train phrasings to attack, the probes' held-out ones to measure
        train = world_cases(a.world, "train" if a.universal else "heldout", a.n_train, seed=a.seed, target=a.target)
        heldout = world_cases(a.world, "heldout", a.n_heldout, seed=a.seed, target=a.target) if a.universal else []
    r = suffix_suite(a.model, train, heldout, a.out, universal=a.universal, steps=a.steps, k=a.suffix_len,
                     top_k=a.top_k, batch=a.batch, transfer=a.transfer or [], ppl_weight=a.ppl_weight, world=a.world,
                     soft_steps=a.soft_steps, soft_lr=a.soft_lr, seed=a.seed, max_tokens=a.max_tokens, progressive=a.progressive,
                     force=a.force)
    for name, s in r["success"].items():
        print(f"GCG success on {name}: {s['k']}/{s['n']} (baseline {r['baseline'][name]['k']}/{r['baseline'][name]['n']})")
    print(f"-> {a.out}/report.md")


def _gcg_parser(sub, parser_class) -> None:
    """`lmstack gcg`: adversarial suffixes (GCG), the soft prompt, the perplexity filter."""
    from lmstack.security import GCG_TARGET as TARGET

    p = sub.add_parser("gcg", help="adversarial suffixes (GCG, Zou et al. 2023): attack, transfer, soft prompt, "
                                   "perplexity filter and the adaptive attack")
    p.add_argument("--model", required=True, help="the chat model folder to attack")
    p.add_argument("--cases", help="jsonl of {messages, target}: the conversations to attack and the reply wanted")
    p.add_argument("--heldout", help="jsonl of held-out cases (universal: the suffix's success is measured there)")
    p.add_argument("--world", help="a world folder: its benign prompts fit the perplexity filter; without --cases, "
                                   "its harmful requests are the cases")
    p.add_argument("--target", default=TARGET, help=f"--world cases: the reply wanted, {{topic}} filled in "
                                                    f"(default {TARGET!r})")
    p.add_argument("--n-train", type=int, default=12, help="--world cases to attack (default 12)")
    p.add_argument("--n-heldout", type=int, default=30, help="--world held-out cases (default 30)")
    p.add_argument("--out", required=True, help="output folder: suffix.json, losses.jsonl, loss.png, report.md")
    p.add_argument("--universal", action="store_true", help="one suffix for all cases (default: one per case)")
    p.add_argument("--progressive", action="store_true", help="universal: add cases one at a time (Zou et al.)")
    p.add_argument("--steps", type=int, default=100, help="GCG steps at most (stops early once every case is hit)")
    p.add_argument("--suffix-len", type=int, default=20, help="suffix tokens (default 20)")
    p.add_argument("--top-k", type=int, default=64, help="candidate tokens per position (default 64)")
    p.add_argument("--batch", type=int, default=64, help="candidates evaluated per step (default 64)")
    p.add_argument("--transfer", nargs="+", metavar="MODEL", help="other chat models to try the suffix string on")
    p.add_argument("--ppl-weight", type=float, default=0.0,
                   help="> 0: also run the adaptive attack, the filter's score x W in the loss (needs --world)")
    p.add_argument("--soft-steps", type=int, default=100, help="Adam steps of the soft prompt (0: none)")
    p.add_argument("--soft-lr", type=float, default=0.05, help="the soft prompt's Adam learning rate")
    p.add_argument("--max-tokens", type=int, default=48, help="reply tokens generated to judge success")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_gcg)


def _cmd_redteam(a):
    from lmstack.security import redteam

    rows = redteam.redteam(a.model, a.out, world=a.world, suites=a.suite or ["jailbreak"], defences=a.defence or (),
                           goals=a.goal, limit=a.limit, max_tokens=a.max_tokens, seed=a.seed, force=a.force,
                           generic=a.generic, results=a.results, command=shlex.join(["lmstack", *sys.argv[1:]]),
                           suffix_steps=a.suffix_steps, trigger=a.trigger)
    for r in rows:
        if r["goal"] == "all" and r["attack"]["n"]:
            x = r["attack"]
            print(f"{r['probe']:<32} attack success {100 * x['rate']:5.1f}% of {x['n']:>4}"
                  + (f"   twins answered {100 * r['twin']['rate']:5.1f}% of {r['twin']['n']}" if r["twin"]["n"] else ""))
    print(f"-> {a.out}/report.md, report.jsonl, hitlog.jsonl")


def _redteam_parser(sub, parser_class) -> None:
    from lmstack.security import DEFENCES, SUITES

    p = sub.add_parser("redteam", help="attack a model (jailbreaks, prompt injection, ...) and report success rates")
    p.add_argument("--model", required=True, help="the model folder to attack (lmstack's or imported)")
    p.add_argument("--out", required=True, help="the report folder (report.md, report.jsonl, hitlog.jsonl)")
    p.add_argument("--world", help="the world whose behaviours to probe (default: the model's own, by its lineage)")
    p.add_argument("--generic", action="store_true", help="probe the generic behaviours (a model with no world)")
    p.add_argument("--suite", action="append", choices=[*SUITES, "all"], help="repeatable (default: jailbreak)")
    p.add_argument("--defence", action="append", choices=DEFENCES, help="repeatable: defences applied in the scan")
    p.add_argument("--goal", action="append", help="repeatable: only these behaviours (canary, banned_word, "
                   "forbidden_tool, harmful; default: all)")
    p.add_argument("--limit", type=int, help="at most this many attacks and twins per goal (a quick scan)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per reply (greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing report folder")
    p.add_argument("--results", help="also record the scan in this experiment store (RESULTS/redteam.jsonl)")
    p.add_argument("--suffix-steps", type=int, default=50, help="GCG steps per goal's universal suffix (--suite suffix)")
    p.add_argument("--trigger", help="--suite backdoor: the trigger phrase a poisoned set used (lmstack poison)")
    p.set_defaults(func=_cmd_redteam, suite=None)


def _cmd_safety_data(a):
    from lmstack.security.safety import safety_data

    r = safety_data(a.world, a.out, n=a.n, seed=a.seed, force=a.force)
    print(f"{r['sft']:,} conversations and {r['comparisons']:,} comparisons -> {a.out}\n"
          f"defend: lmstack sft --model CHAT --data {a.out}/sft.jsonl WORLD/sft.jsonl --out SAFE   "
          f"(or lmstack dpo --model CHAT --data {a.out}/comparisons.jsonl --out SAFE)")


def _safety_parser(sub, parser_class) -> None:
    p = sub.add_parser("safety-data", help="refusal SFT data and DPO comparisons from the jailbreaks' train templates")
    p.add_argument("--world", required=True, help="the world whose forbidden behaviours to defend")
    p.add_argument("--out", required=True, help="folder for sft.jsonl and comparisons.jsonl")
    p.add_argument("-n", type=int, default=600, help="deployed conversations to dress (each by every family)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_cmd_safety_data)


def _cmd_injection(a):
    from lmstack.security import hierarchy
    from lmstack.security.behaviours import generic_spec
    from lmstack.utils import atomic_file, atomic_write_json, atomic_write_text

    source = a.world if a.world else generic_spec()  # no world: the generic facts, for a model without one
    if a.action == "data":
        import json

        rows = hierarchy.training_conversations(source, a.n or 2000, seed=a.seed)
        with atomic_file(a.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{len(rows):,} spotlighted conversations (half with a planted instruction the assistant ignores) "
              f"-> {a.out}\nmix them into a fine-tune: lmstack sft --model CHAT --data {a.out} WORLD/sft.jsonl --out DIR")
        return
    from pathlib import Path

    clf = hierarchy.train_classifier(source, n=a.n or 60, seed=a.seed)
    clf.save(a.out)
    report = hierarchy.classifier_report(clf, source, n=a.eval_n, seed=a.seed + 1)
    if a.world:
        from lmstack.stats import wilson

        texts = hierarchy.world_clean_texts(a.world)
        fp = sum(clf.flag(t) for t in texts)
        report["world"] = {"fp": fp, "negatives": len(texts), "false_positive_rate": fp / len(texts) if texts else None,
                           "false_positive_ci": wilson(fp, len(texts)) if texts else None}
    atomic_write_json(Path(a.out) / "report.json", report)
    table = hierarchy.report_table(report)
    atomic_write_text(Path(a.out) / "report.md", table)
    print(table, end="")
    print(f"-> {a.out} (lmstack redteam --defence classifier trains this same classifier from the world)")


def _injection_parser(sub, parser_class) -> None:
    """`lmstack injection data | classifier`: the instruction-hierarchy defences' data."""
    p = sub.add_parser("injection", help="prompt-injection defences: SFT data that teaches marked text is data, "
                                         "the injection classifier")
    p.add_argument("action", choices=["data", "classifier"],
                   help="data: spotlighted SFT conversations with planted instructions ignored; "
                        "classifier: train the injection classifier, report it on held-out phrasings and adaptive attacks")
    p.add_argument("--world", help="the world folder (default: the generic facts, for a model without a world)")
    p.add_argument("--out", required=True, help="data: the jsonl file; classifier: its folder")
    p.add_argument("-n", "--n", type=int, default=None,
                   help="data: rows (default 2000); classifier: training documents per probe and goal (default 60)")
    p.add_argument("--eval-n", type=int, default=20, help="classifier: held-out documents per probe and goal")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_injection)


def guard_args(p) -> None:
    """--guard and --guard-classifier, for `lmstack chat` and `lmstack serve`."""
    p.add_argument("--guard", choices=["delimit", "datamark", "classifier"],
                   help="defend untrusted text (tool results, pasted documents) against prompt injection: "
                        "spotlight it, or drop what the injection classifier flags (off by default)")
    p.add_argument("--guard-classifier", metavar="DIR", help="--guard classifier: a classifier saved by "
                   "`lmstack injection classifier` (default: one trained now on the model's world)")


def guard(a):
    """--guard NAME: the defence of untrusted text (lmstack/security/hierarchy.py), or None."""
    if not a.guard:
        return None
    from lmstack.modelio import lineage
    from lmstack.security.hierarchy import defence

    return defence(a.guard, world=lineage(a.model)["world"], classifier_dir=a.guard_classifier)


def add_parsers(sub, parser_class) -> None:
    """The security subcommands, on the command map `sub`."""
    _redteam_parser(sub, parser_class)
    _injection_parser(sub, parser_class)
    _safety_parser(sub, parser_class)
    _poison_parser(sub, parser_class)
    _gcg_parser(sub, parser_class)
