"""The alignment subcommands of `lmstack` (reward, dpo, judge, ppo, grpo, winrate): thin calls into
lmstack/align and lmstack/eval/winrate.py, imported lazily (lmstack/cli.py holds the rest)."""

from __future__ import annotations

from pathlib import Path

from lmstack.utils import UserError


def _cmd_reward(a):
    from lmstack.align import reward

    if a.action == "train":
        reward.reward_train(a.model, a.data, a.out, overrides=a.set or [], resume=a.resume)
    else:
        reward.reward_score(a.model, a.data, out=a.out)


def _cmd_dpo(a):
    from lmstack.align.dpo import dpo

    dpo(a.model, a.data, a.out, overrides=a.set or [], resume=a.resume)


def _cmd_judge(a):
    from lmstack.align.judge import judge

    judge(a.model, a.prompts, a.out, judge_model=a.judge, constitution=a.constitution, seed=a.seed,
          limit=a.limit, use_labeller=a.labeller)


def _cmd_ppo(a):
    from lmstack.align.rl import ppo

    ppo(a.policy, a.reward, a.prompts, a.out, overrides=a.set or [], resume=a.resume)


def _cmd_grpo(a):
    from lmstack.align.rl import grpo

    tools = [f"rl.tools={a.tools}"] if a.tools is not None else []  # a shorthand for --set rl.tools=...
    grpo(a.model, a.prompts, a.reward, a.out, overrides=tools + (a.set or []), resume=a.resume)


def _cmd_winrate(a):
    from lmstack.eval.winrate import win_rate
    from lmstack.modelio import lineage, read_config

    if a.n < 1:
        raise UserError(f"--n must be >= 1 (got {a.n})")
    for flag, d in (("--a", a.a), ("--b", a.b)):  # fail before any prompt is read or model loaded
        try:
            read_config(d)
        except UserError as e:
            raise UserError(f"{flag}: {e}") from None
    world = a.world or lineage(a.a)["world"]
    if world is None:
        raise UserError(f"no world found in the lineage of {a.a} (pass --world DIR)")
    out = a.out or Path(a.a) / "winrate" / f"vs_{Path(a.b).resolve().name}.json"
    win_rate(a.a, a.b, world, n=a.n, seed=a.seed, max_tokens=a.max_tokens, exclude=a.exclude, out=out)
    print(f"wrote {out}")


def add_parsers(sub, parser_class) -> None:
    """The alignment subcommands, on the command map `sub`."""
    _Parser = parser_class
    rw = sub.add_parser("reward", help="reward model: train on comparisons, score answers")
    rws = rw.add_subparsers(dest="action", required=True, parser_class=_Parser)
    rt = rws.add_parser("train", help="a scalar head on the final token, Bradley-Terry loss")
    rt.add_argument("--model", required=True, help="the SFT model folder to start from")
    rt.add_argument("--data", required=True, nargs="+", help="comparisons jsonl ({prompt, chosen, rejected})")
    rt.add_argument("--out", required=True)
    rt.add_argument("--set", action="append", metavar="KEY=VALUE")
    rt.add_argument("--resume", action="store_true")
    rt.set_defaults(func=_cmd_reward)
    rs = rws.add_parser("score", help="score (prompt, answer) pairs with a reward model")
    rs.add_argument("--model", required=True, help="a reward model folder")
    rs.add_argument("--data", required=True, help="jsonl of {prompt, answer} (or {prompt, chosen, rejected})")
    rs.add_argument("--out", help="write the rows with their scores here (default: print)")
    rs.set_defaults(func=_cmd_reward)

    dp = sub.add_parser("dpo", help="direct preference optimisation on comparisons (frozen reference)")
    dp.add_argument("--model", required=True, help="the SFT model folder (policy and reference)")
    dp.add_argument("--data", required=True, nargs="+", help="comparisons jsonl")
    dp.add_argument("--out", required=True)
    dp.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. pref.beta=0.1")
    dp.add_argument("--resume", action="store_true")
    dp.set_defaults(func=_cmd_dpo)

    jd = sub.add_parser("judge", help="RLAIF: sample two answers per prompt and let a model judge them "
                                      "(or the world's labeller: --labeller)")
    jd.add_argument("--model", required=True, help="the model whose answers are compared")
    jd.add_argument("--prompts", required=True, help="jsonl of {prompt} or {messages}")
    jd.add_argument("--out", required=True, help="comparisons.jsonl to write")
    jd.add_argument("--judge", help="the judging model (default: --model)")
    jd.add_argument("--constitution", help="a text file of principles (default: lmstack's)")
    jd.add_argument("--labeller", action="store_true",
                    help="the world's simulated labeller judges with the ground truth (world probes or "
                         "comparisons as prompts): people's feedback on the model's own answers")
    jd.add_argument("--seed", type=int, default=0)
    jd.add_argument("--limit", type=int, default=0, help="at most N prompts (0 = all)")
    jd.set_defaults(func=_cmd_judge)

    pp = sub.add_parser("ppo", help="RLHF with PPO against a reward model (KL to the frozen SFT model)")
    pp.add_argument("--policy", required=True, help="the SFT model folder")
    pp.add_argument("--reward", required=True, nargs="+",
                    help="the reward model folder, or several: an ensemble (rl.ensemble=min | mean)")
    pp.add_argument("--prompts", required=True, help="jsonl of {prompt} or {messages}")
    pp.add_argument("--out", required=True)
    pp.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. rl.kl_coef=0.05")
    pp.add_argument("--resume", action="store_true")
    pp.set_defaults(func=_cmd_ppo)

    gr = sub.add_parser("grpo", help="RL on a checkable reward (group-relative advantages)")
    gr.add_argument("--model", required=True)
    gr.add_argument("--prompts", required=True, help="jsonl of {prompt, answer, ...} rows the reward reads")
    gr.add_argument("--reward", required=True, help="arithmetic | world | python:MODULE:FUNCTION")
    gr.add_argument("--out", required=True)
    gr.add_argument("--tools", metavar="NAMES", help="comma-separated tools the rollouts may call, e.g. "
                                                     "calculator (= --set rl.tools=NAMES)")
    gr.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. rl.group_size=8, rl.method=rloo")
    gr.add_argument("--resume", action="store_true")
    gr.set_defaults(func=_cmd_grpo)

    wr = sub.add_parser("winrate", help="ground-truth win rate of model A against model B (the world's labeller)")
    wr.add_argument("--a", required=True, help="model folder A")
    wr.add_argument("--b", required=True, help="model folder B")
    wr.add_argument("--world", help="the world folder (default: found from model A's training data)")
    wr.add_argument("--n", type=int, default=200, help="prompts, split over the prompt types (default 200)")
    wr.add_argument("--seed", type=int, default=0)
    wr.add_argument("--max-tokens", type=int, default=64, help="greedy answer length at most")
    wr.add_argument("--exclude", nargs="+", metavar="FILE", help="comparisons jsonl whose prompts are left out")
    wr.add_argument("--out", help="results JSON (default: A/winrate/vs_<name of B>.json)")
    wr.set_defaults(func=_cmd_winrate)
