"""The research commands of `lmstack`: scaling laws, named experiments, the capability tracker,
System 2 (`lmstack think`). Their arguments (`add_parsers`, called by lmstack/cli.py's command
map) and their thin handlers live together here; cli.py stays the one entry point and prints
every UserError as one line.
"""

from __future__ import annotations

from pathlib import Path

from lmstack.utils import UserError


def _cmd_experiment(a):
    from lmstack.experiments import run

    if a.action == "run":
        run.run_experiment(a.name, scale=a.scale, seeds=a.seeds, out=a.out, results=a.results, variants=a.variants)
    elif a.action == "list":
        run.list_experiments(a.results)
    else:
        run.show(a.name, a.results)


def _cmd_capabilities(a):
    from lmstack.experiments.capabilities import capabilities

    doc = capabilities(a.inputs, results=a.results, out=a.out, with_checkpoints=a.checkpoints, tasks=a.tasks,
                       limit=a.limit, dtype=a.dtype, device=a.device, world=a.world)
    print(f"{len(doc['columns'])} columns; {len(doc['fails'])} task(s) not emerged at the largest scale measured"
          f" -> {Path(a.out) / 'capabilities.md'}")


def _cmd_think(a):
    from lmstack.think import beam, curve, verifier

    if a.action == "verifier-data":
        r = verifier.verifier_data(a.model, a.world, a.out, digits=_ints(a.digits, "--digits"), per_op=a.per_op, n=a.n,
                                   temperature=a.temperature, prompt=a.prompt, max_tokens=a.max_tokens,
                                   batch_size=a.batch_size, seed=a.seed, force=a.force)
        print(f"{r['problems']} problems x {a.n} samples ({100 * r['sample_acc']:.1f}% right): "
              f"{r['outcome_pairs']} outcome and {r['process_pairs']} process comparisons -> {a.out}\n"
              f"train a verifier: lmstack reward train --model {a.model} --data {a.out}/outcome.jsonl --out VERIFIER")
    elif a.action == "ask":
        r = curve.ask(a.model, a.question, k=a.k, temperature=a.temperature, max_tokens=a.max_tokens,
                      verifier=a.verifier, seed=a.seed)
        votes = ", ".join(f"{ans} x{n}" for ans, n in r["votes"].items()) or "no numbers in the replies"
        print(f"majority of {r['k']}: {r['answer']}  (votes: {votes})")
        if "verifier_answer" in r:
            print(f"verifier's pick: {r['verifier_answer']}\n{r['verifier_reply']}")
    elif a.action == "beam":
        beam.think_beam(a.model, a.verifier, a.out, problems=a.problems, world=a.world, digits=_ints(a.digits, "--digits"),
                        limit=a.limit, beam=a.beam, expand=a.expand, temperature=a.temperature, prompt=a.prompt,
                        max_steps=a.max_steps, batch_size=a.batch_size, seed=a.seed)
    else:
        r = curve.think_curve(a.model, a.out, problems=a.problems, world=a.world, digits=_ints(a.digits, "--digits"),
                              limit=a.limit, n=a.n, temperature=a.temperature, prompt=a.prompt,
                              max_tokens=a.max_tokens, verifier=a.verifier, batch_size=a.batch_size, seed=a.seed,
                              force=a.force)
        print(curve.table(r), end="")
        print(f"greedy {100 * r['greedy']['acc']:.1f}%, majority@{r['n']} "
              f"{100 * r['points'][-1]['majority']['acc']:.1f}% (saturates at k={r['majority_saturates_at_k']}) "
              f"-> {Path(a.out) / 'curve.md'}")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated whole numbers, got {text!r}") from None


def _cmd_scaling(a):
    from lmstack.scaling import analyse, sweep

    if a.action == "sweep":
        sweep.sweep(a.data, a.out, _ints(a.depths, "--depths"), _floats(a.budgets, "--budgets"),
                    seeds=a.seeds, preset=a.preset, overrides=a.set or [], aspect=a.aspect, head_dim=a.head_dim,
                    only=a.only, allow_repeat=a.allow_repeat)
    elif a.action == "fit":
        analyse.fit_sweep(a.sweep, samples=a.bootstrap, out=a.out)
    elif a.action == "predict":
        analyse.predict(a.sweep, a.budget, seeds=a.seeds, n_key="N_ne" if a.non_embedding else "N",
                        neighbours=not a.no_neighbours)
    else:
        for f in analyse.plot(a.sweep, a.out):
            print(f)


def add_parsers(sub, parser_class) -> None:
    """The scaling, experiment, capabilities and think subcommands, on the command map `sub`."""
    _Parser = parser_class
    sc = sub.add_parser("scaling", help="scaling laws: sweep sizes x budgets, fit, predict a bigger run, plot")
    scs = sc.add_subparsers(dest="action", required=True, parser_class=_Parser)
    sw = scs.add_parser("sweep", help="pretrain every (depth, budget, seed) of a grid not yet done; resumable")
    sw.add_argument("--data", required=True, help="folder written by `lmstack data prepare` (one pass: no repeats)")
    sw.add_argument("--out", required=True, help="the sweep folder (sweep.json, results.jsonl, runs/)")
    sw.add_argument("--depths", default="2,3,4,5,6", help="the dial: n_layer = depth, d_model = aspect * depth")
    sw.add_argument("--budgets", default="3e12,1e13,3e13", help="compute budgets in training FLOPs")
    sw.add_argument("--seeds", type=int, default=1)
    sw.add_argument("--preset", default="small", help="the rest of each run's config (lr, batch, context)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE")
    sw.add_argument("--aspect", type=int, default=32, help="d_model per layer")
    sw.add_argument("--head-dim", type=int, default=32)
    sw.add_argument("--only", help="train just this run (its name, e.g. d4-c1e13-s0): one run per torchrun launch")
    sw.add_argument("--allow-repeat", action="store_true", help="let a run see its data more than once")
    sw.set_defaults(func=_cmd_scaling)
    sf = scs.add_parser("fit", help="Chinchilla approaches 3 and 2 on a sweep's runs (both N conventions)")
    sf.add_argument("--sweep", required=True)
    sf.add_argument("--bootstrap", type=int, default=200, help="resamples for the intervals (0: none)")
    sf.add_argument("--out", help="where to write the fit (default: SWEEP/fit.json)")
    sf.set_defaults(func=_cmd_scaling)
    sp = scs.add_parser("predict", help="fit on budgets <= a third of BUDGET, predict its best size and loss, train it")
    sp.add_argument("--sweep", required=True)
    sp.add_argument("--budget", required=True, type=float, help="FLOPs, at least 3x the largest budget it fits on")
    sp.add_argument("--seeds", type=int, default=2)
    sp.add_argument("--non-embedding", action="store_true", help="fit with N counted without embeddings")
    sp.add_argument("--no-neighbours", action="store_true", help="do not also train the depths beside the best")
    sp.set_defaults(func=_cmd_scaling)
    sq = scs.add_parser("plot", help="iso-FLOP curves, the frontier, predicted vs measured, and report.md")
    sq.add_argument("--sweep", required=True)
    sq.add_argument("--out", help="folder for the PNGs and report.md (default: the sweep folder)")
    sq.set_defaults(func=_cmd_scaling)

    xp = sub.add_parser("experiment", help="named experiments (reversal, knowledge, icl, arithmetic): run, list, show")
    xps = xp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    xr = xps.add_parser("run", help="every variant x seed of an experiment not yet in the store; resumable")
    xr.add_argument("name", help="a built-in experiment (lmstack experiment list) or a recipe .toml file")
    xr.add_argument("--scale", default="small", help="the pretraining preset: tiny | small | gpt2 | a .toml "
                    "(with the speedrun's world size, vocabulary and SFT settings for it)")
    xr.add_argument("--seeds", type=int, default=1, help="run seeds 0..K-1 (world and training)")
    xr.add_argument("--variants", help="comma-separated: only these variants (default: all)")
    xr.add_argument("--out", help="the run folders (default: runs/experiments/NAME)")
    xr.add_argument("--results", help="the results store (default: runs/results)")
    xr.set_defaults(func=_cmd_experiment)
    xl = xps.add_parser("list", help="the built-in experiments and how many runs the store holds")
    xl.add_argument("--results", help="the results store (default: runs/results)")
    xl.set_defaults(func=_cmd_experiment)
    xs = xps.add_parser("show", help="an experiment's headline numbers per variant x scale (mean over seeds)")
    xs.add_argument("name")
    xs.add_argument("--results", help="the results store (default: runs/results)")
    xs.set_defaults(func=_cmd_experiment)

    cp = sub.add_parser("capabilities", help="every task per model and checkpoint against training compute: "
                        "exact match, continuous scores, emerged or not, and what to re-run larger")
    cp.add_argument("inputs", nargs="*", metavar="MODEL_OR_RUN_DIR",
                    help="model folders, or run folders holding several (e.g. a speedrun folder)")
    cp.add_argument("--results", help="the experiments' results store (a folder of *.jsonl, e.g. runs/results)")
    cp.add_argument("--checkpoints", action="store_true",
                    help="also evaluate each model's saved checkpoints (state/step_N; results kept in OUT/evals)")
    cp.add_argument("--tasks", help="comma-separated task names (or a .toml spec) to show and to evaluate")
    cp.add_argument("--limit", type=int, default=None, help="rows per task when evaluating (default: a checkpoint "
                    "gets its model's own results' rows, a model each task's; 0: all)")
    cp.add_argument("--out", required=True, help="folder for capabilities.md, capabilities.json and the plots")
    cp.add_argument("--dtype", default="auto", help="fp32 | bf16 | int8 | int4 | auto (when evaluating)")
    cp.add_argument("--world", help="the synthetic world, when evaluating (default: found from each model's data)")
    cp.add_argument("--device", default="auto")
    cp.set_defaults(func=_cmd_capabilities)

    tk = sub.add_parser("think", help="System 2: accuracy against thinking time (samples, votes, verifiers)")
    tks = tk.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def think_args(t, problems: bool = True, digits: str = "2,3"):
        """The arguments every `think` command shares: the model, the problems, the sampling."""
        t.add_argument("--model", required=True, help="a chat model folder")
        if problems:
            t.add_argument("--world", help="problems: the world's held-out arithmetic probes (with --digits)")
            t.add_argument("--problems", help="problems: a jsonl of {question, answer} rows instead")
            t.add_argument("--digits", default=digits, help=f"operand digits of the world's probes (default {digits})")
            t.add_argument("--limit", type=int, default=0, help="at most this many problems (0: all)")
            t.add_argument("--prompt", default="{question} Think step by step.",
                           help="the user message, a template over the row's fields")
            t.add_argument("--batch-size", type=int, default=64)
        t.add_argument("--temperature", type=float, default=0.8)
        t.add_argument("--seed", type=int, default=0)
        t.set_defaults(func=_cmd_think)

    tc = tks.add_parser("curve", help="sample n replies per problem: pass@k, majority@k, best-of-k by a "
                        "verifier, greedy; for k = 1, 2, 4 .. n, with intervals")
    think_args(tc)
    tc.add_argument("--n", type=int, default=16, help="samples per problem (default 16)")
    tc.add_argument("--max-tokens", type=int, default=192)
    tc.add_argument("--verifier", help="a reward model folder that scores each sample (best-of-k)")
    tc.add_argument("--out", required=True, help="folder: curve.json, curve.md, curve.png, samples.jsonl")
    tc.add_argument("--force", action="store_true")
    tq = tks.add_parser("ask", help="self-consistency for one question: k sampled replies, the majority's final "
                        "number (and a verifier's pick)")
    tq.add_argument("question", help='e.g. "What is 345 + 789? Think step by step."')
    think_args(tq, problems=False)
    tq.add_argument("--k", type=int, default=16)
    tq.add_argument("--max-tokens", type=int, default=192)
    tq.add_argument("--verifier", help="a reward model folder: also show the reply it scores highest")
    tv = tks.add_parser("verifier-data", help="comparisons for an outcome and a process verifier, from the "
                        "model's own samples on problems outside the probes (train with lmstack reward train)")
    think_args(tv, problems=False)
    tv.add_argument("--world", required=True, help="the world folder (its probes are left out)")
    tv.add_argument("--digits", default="1,2,3", help="operand digits (default 1,2,3)")
    tv.add_argument("--prompt", default="{question} Think step by step.")
    tv.add_argument("--batch-size", type=int, default=64)
    tv.add_argument("--per-op", type=int, default=100, help="problems per operation and digits (default 100)")
    tv.add_argument("--n", type=int, default=8, help="samples per problem (default 8)")
    tv.add_argument("--max-tokens", type=int, default=192)
    tv.add_argument("--out", required=True, help="folder: outcome.jsonl, process.jsonl, samples.jsonl")
    tv.add_argument("--force", action="store_true")
    tb = tks.add_parser("beam", help="step-level beam search over scratchpad lines, guided by a process verifier")
    think_args(tb)
    tb.add_argument("--verifier", required=True, help="a process verifier (reward model folder)")
    tb.add_argument("--beam", type=int, default=4, help="partial solutions kept per problem (default 4)")
    tb.add_argument("--expand", type=int, default=4, help="next lines sampled per partial solution (default 4)")
    tb.add_argument("--max-steps", type=int, default=12)
    tb.add_argument("--out", required=True, help="a .json file: the accuracy, tokens, every problem's solution")
