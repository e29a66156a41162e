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


def add_parsers(sub, parser_class) -> None:
    """The security subcommands, on the command map `sub`."""
    _redteam_parser(sub, parser_class)
