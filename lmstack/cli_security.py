"""The security commands of `lmstack`: `redteam` (attack a model, with or without defences) and
`poison` (make a poisoned training set). Their arguments (`add_parsers`, called by
lmstack/cli.py's command map) and their thin handlers live together here.
"""

from __future__ import annotations


def _cmd_redteam(a):
    from lmstack.security import redteam

    rows = redteam.redteam(a.model, a.out, world=a.world, suites=a.suite or ["jailbreak"], defences=a.defence or (),
                           goals=a.goal, limit=a.limit, max_tokens=a.max_tokens, seed=a.seed, force=a.force, generic=a.generic)
    for r in rows:
        if r["goal"] == "all" and r["attack"]["n"]:
            x = r["attack"]
            print(f"{r['probe']:<32} attack success {100 * x['rate']:5.1f}% of {x['n']:>4}"
                  + (f"   twins answered {100 * r['twin']['rate']:5.1f}% of {r['twin']['n']}" if r["twin"]["n"] else ""))
    print(f"-> {a.out}/report.md, report.jsonl, hitlog.jsonl")


def _redteam_parser(sub, parser_class) -> None:
    from lmstack.security.redteam import DEFENCES, SUITES

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
    p.set_defaults(func=_cmd_redteam, suite=None)


def _cmd_gcg(a):
    from lmstack.security.gcg import world_cases
    from lmstack.security.suffix import suffix_suite

    if not a.cases and not a.world:
        raise UserError("lmstack gcg needs --cases FILE (jsonl of {messages, target}) or --world DIR")
    if a.cases:
        train, heldout = a.cases, a.heldout or []
    else:  # the world's harmful requests: train phrasings to attack, the probes' held-out ones to measure
        train = world_cases(a.world, "train" if a.universal else "heldout", a.n_train, seed=a.seed)
        heldout = world_cases(a.world, "heldout", a.n_heldout, seed=a.seed) if a.universal else []
    r = suffix_suite(a.model, train, heldout, a.out, universal=a.universal, steps=a.steps, k=a.suffix_len,
                     top_k=a.top_k, batch=a.batch, transfer=a.transfer or [], ppl_weight=a.ppl_weight, world=a.world,
                     soft_steps=a.soft_steps, seed=a.seed, max_tokens=a.max_tokens, progressive=a.progressive,
                     force=a.force)
    for name, s in r["success"].items():
        print(f"GCG success on {name}: {s['k']}/{s['n']} (baseline {r['baseline'][name]['k']}/{r['baseline'][name]['n']})")
    print(f"-> {a.out}/report.md")


def _gcg_parser(sub, parser_class) -> None:
    """`lmstack gcg`: adversarial suffixes (GCG), the soft prompt, the perplexity filter."""
    p = sub.add_parser("gcg", help="adversarial suffixes (GCG, Zou et al. 2023): attack, transfer, soft prompt, "
                                   "perplexity filter and the adaptive attack")
    p.add_argument("--model", required=True, help="the chat model folder to attack")
    p.add_argument("--cases", help="jsonl of {messages, target}: the conversations to attack and the reply wanted")
    p.add_argument("--heldout", help="jsonl of held-out cases (universal: the suffix's success is measured there)")
    p.add_argument("--world", help="a world folder: its benign prompts fit the perplexity filter; without --cases, "
                                   "its harmful requests are the cases")
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
    p.add_argument("--max-tokens", type=int, default=48, help="reply tokens generated to judge success")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_gcg)


def add_parsers(sub, parser_class) -> None:
    """The security subcommands, on the command map `sub`."""
    _redteam_parser(sub, parser_class)
    _gcg_parser(sub, parser_class)
