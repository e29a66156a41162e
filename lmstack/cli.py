"""The one `lmstack` command. Each subcommand is a thin call into the module that does
the work; modules are imported lazily so `lmstack --help` stays instant.

A user mistake raises `UserError` anywhere below; it is printed here as one line with a
non-zero exit, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmstack import cli_align, cli_research, cli_security
from lmstack.utils import UserError


class _Parser(argparse.ArgumentParser):
    # argparse prints a usage block and then the error; we want one clear line.
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_world(a):
    from lmstack.world import generate, print_stats

    if a.action == "stats":
        return print_stats(a.dir)
    if a.out is None:
        raise UserError("lmstack world needs --out DIR (or: lmstack world stats DIR)")
    generate(
        a.out, people=a.people, seed=a.seed, bios_per_person=a.bios,
        arithmetic=a.arithmetic, stories=a.stories, heldout_fraction=a.heldout, qa_docs=a.qa_docs,
        copy_docs=a.copy_docs, permute=not a.no_permute, full_names=a.full_names, skill_people=a.skill_people,
        basic_skills=a.basic_skills, reading_docs=a.reading_docs,
        force=a.force, progress=not a.quiet,
    )


def _cmd_world_prompts(a):
    from lmstack.world.rl_prompts import arithmetic_prompts

    try:
        digits = tuple(int(x) for x in a.digits.split(","))
    except ValueError:
        raise UserError(f"--digits takes comma-separated whole numbers such as 1,2 (got {a.digits!r})") from None
    r = arithmetic_prompts(a.world, a.out, digits=digits, per_op=a.per_op, seed=a.seed)
    by = ", ".join(f"{d} digit{'s' * (d > 1)} {n}" for d, n in r["by_digits"].items())
    print(f"wrote {r['rows']} prompts ({r['problems']} problems: {by}) to {r['path']}")


def _cmd_tokenizer_train(a):
    from lmstack.tokenizer import train_tokenizer

    train_tokenizer(a.input, vocab_size=a.vocab_size, out=a.out, text_field=a.text_field, force=a.force,
                    digits_per_token=a.digits_per_token, conversations=a.conversations)


def _cmd_data_prepare(a):
    from lmstack.data import prepare

    prepare(a.input, tokenizer=a.tokenizer, out=a.out, text_field=a.text_field,
            val_fraction=a.val_fraction, workers=a.workers, force=a.force)


def _cmd_pretrain(a):
    from lmstack.train.pretrain import pretrain

    pretrain(preset=a.preset, data=a.data, out=a.out, overrides=a.set or [], resume=a.resume)


def _cmd_sample(a):
    from lmstack.chat import sample

    sample(a.model, a.prompt, max_tokens=a.max_tokens, temperature=a.temperature,
           top_k=a.top_k, top_p=a.top_p, seed=a.seed, num_samples=a.num_samples, dtype=a.dtype)


def _cmd_sft(a):
    from lmstack.train.sft import sft

    sft(a.model, a.data, a.out, overrides=a.set or [], resume=a.resume,
        mix_data=a.mix_data, mix_fraction=a.mix_fraction)


def _cmd_chat(a):
    from lmstack.chat import chat

    return chat(a.model, system=a.system, temperature=a.temperature, top_p=a.top_p,
                max_tokens=a.max_tokens, seed=a.seed, tools=not a.no_tools, dtype=a.dtype,
                memory=False if a.no_memory else (a.memory or True), guard=cli_security.guard(a))


def _cmd_assistant(a):
    from lmstack import assistant

    if a.action == "create":
        x = assistant.create(a.model, a.out, name=a.name, instructions=a.instructions, knowledge=a.knowledge,
                             tools=a.tools, retrieve=not a.no_retrieve, force=a.force)
        print(f"assistant {x.name} -> {a.out} (model {x.model}; tools: {', '.join(x.tools) or 'none'}; "
              f"knowledge: {'indexed, looked up before every reply' if x.retrieve else 'none'})")
    elif a.action == "show":
        x = assistant.load(a.folder)
        print(json.dumps({"name": x.name, "model": str(x.model), "tools": x.tools, "retrieve": x.retrieve,
                          "instructions": x.instructions,
                          "knowledge": assistant.knowledge_stats(x)},
                         indent=1))
    else:
        from lmstack.eval.assistant import assistant_eval

        r = assistant_eval(a.folder, a.questions, limit=a.limit)
        for k in ("bare_model", "assistant_acc"):
            s = r[k]
            print(f"{k:14s} {100 * s['acc']:5.1f}% [{100 * s['ci'][0]:.1f}, {100 * s['ci'][1]:.1f}] of {s['n']}")
        d = r["difference"]
        print(f"difference     {100 * d['diff']:+.1f} points [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}], "
              f"McNemar p = {d['p_value']:.2g}")

def _cmd_speedrun(a):
    from lmstack.speedrun import speedrun

    speedrun(out=a.out, preset=a.preset, people=a.people, overrides=a.set or [], force=a.force,
             align=not a.no_align)


def _cmd_eval(a):
    from lmstack.eval.run import compare_models, evaluate

    if a.limit is not None and a.limit < 0:
        raise UserError("--limit must be >= 0 (0 = every row)")
    if a.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    kw = dict(tasks=a.tasks, world=a.world, data=a.data, text=a.text, limit=a.limit, dtype=a.dtype,
              device=a.device, batch_size=a.batch_size)
    if a.compare:
        if a.model:
            raise UserError("give --model DIR or --compare A B, not both")
        return compare_models(*a.compare, out=a.out, **kw) and 0
    if not a.model:
        raise UserError("lmstack eval needs --model DIR (or --compare A B)")
    evaluate(a.model, out=a.out, **kw)


def _cmd_report(a):
    from lmstack.eval.report import report

    report(a.run, out=a.out)


def _cmd_harness(a):
    from lmstack.eval.harness import main as harness_main

    return harness_main(a.args)


def _cmd_serve(a):
    from lmstack.serve.protocol import Limits
    from lmstack.serve.server import serve

    if a.max_waiting < 1 or a.prefix_cache_mb < 0:
        raise UserError("--max-waiting must be >= 1 and --prefix-cache-mb >= 0")
    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, db_path=a.db, slots=a.slots, dtype=a.dtype,
          device=a.device, label_prompts=a.label_prompts, threads=a.threads, assistants=a.assistant or (),
          tools=a.tools, guard=cli_security.guard(a), prefix_cache_mb=a.prefix_cache_mb,
          limits=Limits(max_waiting=a.max_waiting))


def _cmd_search(a):
    from lmstack.tools import search

    if a.action == "index":
        search.index_folder(a.folder, a.index, progress=not a.quiet)
    else:
        search.print_search(a.index, a.query, a.k)


def _cmd_feedback_export(a):
    from lmstack.serve.db import export

    export(a.db, a.out)


def _cmd_export(a):
    if a.format == "twofile":
        from lmstack.export.twofile import export_twofile

        export_twofile(a.model, a.out, force=a.force)
    elif a.format == "hf":
        from lmstack.export.hf import export_hf

        export_hf(a.model, a.out, force=a.force)
    else:
        from lmstack.export.gguf import export_gguf

        export_gguf(a.model, a.out, dtype=a.dtype, force=a.force)


def _cmd_import(a):
    if (a.source is None) == (a.file is None):
        raise UserError("import takes one source: a path after the format, or --from PATH")
    if a.format == "gguf":
        from lmstack.export.gguf_import import import_gguf

        import_gguf(a.source or a.file, a.out, force=a.force)
        return
    from lmstack.export.hf import import_hf

    import_hf(a.source or a.file, a.out, force=a.force)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lmstack", description="The whole life of a language model, from scratch.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    w = sub.add_parser("world", help="generate the synthetic world (corpus + ground truth)",
                       description="Generate the synthetic world; or `lmstack world stats DIR`; or "
                                   "`lmstack world prompts arithmetic --world DIR --out FILE` (RL prompts).")
    w.add_argument("--people", type=int, default=1000, help="number of people (default 1000)")
    w.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    w.add_argument("--bios", type=int, default=5, help="biographies per person (default 5)")
    w.add_argument("--arithmetic", type=int, default=None,
                   help="arithmetic problems in pretrain.jsonl (default 2 x people)")
    w.add_argument("--stories", type=int, default=None, help="short stories (default people / 2)")
    w.add_argument("--heldout", type=float, default=0.3,
                   help="fraction of people whose facts appear only in prose (default 0.3)")
    w.add_argument("--qa-docs", type=int, default=0,
                   help="documents per train person holding their Q/A pairs as text (mixed training; default 0)")
    w.add_argument("--skill-people", type=int, default=1000,
                   help="size the skill conversations (arithmetic, tools, refusals) and the comparisons as for "
                        "at least this many people (default 1000; 0: by --people)")
    w.add_argument("--basic-skills", action="store_true",
                   help="leave out the thinking, python and search conversations (for very small models)")
    w.add_argument("--copy-docs", type=int, default=0,
                   help="documents that reward in-context copying: a random sequence, then again (default 0)")
    w.add_argument("--reading-docs", type=int, default=0,
                   help="documents that reward reading: the biography of a person found nowhere else in the "
                        "world, then questions about them answered from it (default 0)")
    w.add_argument("--no-permute", action="store_true", help="biography sentences in a fixed order")
    w.add_argument("--full-names", action="store_true", help="biographies name the person in every sentence")
    w.add_argument("--out", help="output folder")
    w.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    ws = w.add_subparsers(dest="action", parser_class=_Parser)
    st = ws.add_parser("stats", help="print counts, sizes and the split summary of a world")
    st.add_argument("dir")
    pr = ws.add_parser("prompts", help="RL training prompts from a world (never its held-out probes)")
    prs = pr.add_subparsers(dest="kind", metavar="KIND", required=True, parser_class=_Parser)
    pa = prs.add_parser("arithmetic", help="arithmetic problems in every question phrasing "
                                           "(for lmstack grpo --reward arithmetic)")
    pa.add_argument("--world", required=True, help="the world folder (its probes are left out)")
    pa.add_argument("--digits", default="1", help="comma-separated operand sizes, e.g. 1,2 (default 1)")
    pa.add_argument("--per-op", type=int, default=200,
                    help="problems per operation and size; smaller spaces are taken whole (default 200)")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--out", required=True, help="the jsonl file to write")
    pa.set_defaults(func=_cmd_world_prompts)
    w.set_defaults(func=_cmd_world)

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    ts = t.add_subparsers(dest="action", required=True, parser_class=_Parser)
    tt = ts.add_parser("train", help="train a tokenizer on text/jsonl files")
    tt.add_argument("--input", nargs="+", required=True, help="files, folders or globs")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.add_argument("--text-field", default="text", help="jsonl field holding the text")
    tt.add_argument("--conversations", nargs="+", default=[], metavar="JSONL",
                    help="conversation files (lmstack sft's data, {\"messages\": [...]} rows) whose text the "
                         "merges should also fit, e.g. a world's sft.jsonl")
    tt.add_argument("--digits-per-token", type=int, default=3, help="numbers split into groups of at most "
                    "this many digits (default 3, GPT-4's; 1: every digit its own token, as Llama 2 and Gemma)")
    tt.add_argument("--out", required=True)
    tt.add_argument("--force", action="store_true")
    tt.set_defaults(func=_cmd_tokenizer_train)

    d = sub.add_parser("data", help="prepare token shards from text")
    ds = d.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dp = ds.add_parser("prepare", help="tokenize files/folders/globs into token shards")
    dp.add_argument("--input", nargs="+", required=True,
                    help="files, folders (recursive), globs, or a Hugging Face dataset name (hf extra)")
    dp.add_argument("--tokenizer", required=True, help="a tokenizer or model folder")
    dp.add_argument("--out", required=True)
    dp.add_argument("--text-field", default="text", help="jsonl field / parquet column with the text")
    dp.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    dp.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = all cores)")
    dp.add_argument("--force", action="store_true")
    dp.set_defaults(func=_cmd_data_prepare)

    pt = sub.add_parser("pretrain", help="train a model from scratch (the one training loop)")
    pt.add_argument("--preset", default="tiny", help="tiny | small | gpt2 | path to a .toml")
    pt.add_argument("--data", required=True, help="folder written by `lmstack data prepare`")
    pt.add_argument("--out", required=True, help="model folder")
    pt.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    pt.add_argument("--resume", action="store_true", help="continue from OUT/state")
    pt.set_defaults(func=_cmd_pretrain)

    sa = sub.add_parser("sample", help="sample text from a model")
    sa.add_argument("--model", required=True)
    sa.add_argument("--prompt", default="")
    sa.add_argument("--max-tokens", type=int, default=100)
    sa.add_argument("--temperature", type=float, default=0.8)
    sa.add_argument("--top-k", type=int, default=None)
    sa.add_argument("--top-p", type=float, default=None)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--num-samples", type=int, default=1)
    sa.add_argument("--dtype", default=None, help="fp32 | bf16 | int8 | int4 | auto (default: the weights as saved)")
    sa.set_defaults(func=_cmd_sample)

    ft = sub.add_parser("sft", help="supervised fine-tuning on conversations (the same training loop)")
    ft.add_argument("--model", required=True, help="base model folder")
    ft.add_argument("--data", nargs="+", required=True,
                    help="jsonl files with `messages`, `prompt`/`completion` or `text` rows")
    ft.add_argument("--out", required=True, help="fine-tuned model folder")
    ft.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    ft.add_argument("--resume", action="store_true", help="continue from OUT/state")
    ft.add_argument("--mix-data", help="a prepared pretraining data folder to mix in")
    ft.add_argument("--mix-fraction", type=float, default=0.0,
                    help="fraction of training sequences drawn from --mix-data (default 0)")
    ft.set_defaults(func=_cmd_sft)

    ch = sub.add_parser("chat", help="talk to a model in the terminal")
    ch.add_argument("--model", required=True, help="a chat model folder, or an assistant folder (lmstack assistant create)")
    ch.add_argument("--system", default=None, help="a system prompt")
    ch.add_argument("--temperature", type=float, default=0.7)
    ch.add_argument("--top-p", type=float, default=0.95)
    ch.add_argument("--max-tokens", type=int, default=256)
    ch.add_argument("--seed", type=int, default=None)
    ch.add_argument("--no-tools", action="store_true", help="do not run tool calls (calculator)")
    ch.add_argument("--dtype", default="auto", help="fp32 | bf16 | int8 | int4 | auto (bf16 where native)")
    ch.add_argument("--memory", help="keep the turns that outgrow the context in this folder (recalled in a later "
                    "chat with the same folder; default: for this session only)")
    ch.add_argument("--no-memory", action="store_true", help="forget turns that outgrow the context")
    cli_security.guard_args(ch)
    ch.set_defaults(func=_cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a model: world tasks, your tasks, bits per byte; compare two")
    ev.add_argument("--model", help="model folder")
    ev.add_argument("--tasks", help="comma-separated: world task names, 'world' (all), 'lm', 'copy', 'copy_text', "
                                    "'icl', 'memory', or .toml spec files (default: the world's tasks + lm, copy, "
                                    "copy_text, icl)")
    ev.add_argument("--world", help="the synthetic world folder (default: found from the model's training data)")
    ev.add_argument("--data", help="prepared token shards to score (default: the model's own validation split)")
    ev.add_argument("--text", nargs="+", help="text/jsonl/parquet files or folders to score instead")
    ev.add_argument("--limit", type=int, default=None, help="at most N rows per task (0 = all; "
                                                           "default: each task's own limit)")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"),
                    help="two model folders or results files: side by side, with paired significance")
    ev.add_argument("--out", help="results JSON file (default: MODEL/eval/<time>.json)")
    ev.add_argument("--dtype", default="auto", help="fp32 | bf16 | int8 | int4 | auto (bf16 where native)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--batch-size", type=int, default=32, help="rows per forward pass / decode batch")
    ev.set_defaults(func=_cmd_eval)

    rp = sub.add_parser("report", help="write the report card of a run folder (report.md + plots)")
    rp.add_argument("run", help="a run folder (e.g. runs/speedrun) or a model folder")
    rp.add_argument("--out", help="where to write report.md and its plots (default: RUN)")
    rp.set_defaults(func=_cmd_report)

    hn = sub.add_parser("harness", help="EleutherAI lm-evaluation-harness on an lmstack model (needs the eval extra)",
                        add_help=False)
    hn.add_argument("args", nargs=argparse.REMAINDER, help="arguments for lm_eval (see lmstack harness --help)")
    hn.set_defaults(func=_cmd_harness)

    sv = sub.add_parser("serve", help="serve a model: OpenAI-compatible API + web app (chat, label, monitor)")
    sv.add_argument("--model", required=True, help="a chat model folder, or an assistant folder (lmstack assistant "
                    "create: served as its own model id, beside its model)")
    sv.add_argument("--assistant", action="append", metavar="DIR", help="an assistant folder on the same model, "
                    "served as its own model id (repeatable)")
    sv.add_argument("--tools", default=None, help="the tools the server may run, comma-separated: the web app's and "
                    "each assistant's (from calculator, python, search; default all; '' none)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or set LMSTACK_API_KEY)")
    sv.add_argument("--db", default="feedback.sqlite",
                    help="the feedback database (SQLite; created if missing; default ./feedback.sqlite in the "
                         "current folder, printed at start-up; '' for none)")
    sv.add_argument("--label-prompts", help="jsonl of prompts to queue for labelling ({prompt} or {messages})")
    sv.add_argument("--slots", type=int, default=16, help="requests decoded together (continuous batching)")
    sv.add_argument("--max-waiting", type=int, default=256,
                    help="generations that may wait for a slot; more are answered 503 (default 256)")
    sv.add_argument("--prefix-cache-mb", type=float, default=64,
                    help="memory for the keys/values of shared prompt prefixes (0: no prefix cache; default 64)")
    sv.add_argument("--dtype", default="auto", help="fp32 | bf16 | int8 | int4 | auto")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--threads", type=int, default=None, help="torch threads (default on a CPU: cores - 1)")
    cli_security.guard_args(sv)
    sv.set_defaults(func=_cmd_serve)

    se = sub.add_parser("search", help="retrieval over a folder of your files (BM25): index it, query it")
    ses = se.add_subparsers(dest="action", required=True, parser_class=_Parser)
    si = ses.add_parser("index", help="index (or update: new, changed and deleted files only) a folder's "
                                      ".txt/.md/.jsonl/.pdf files")
    si.add_argument("folder")
    si.add_argument("--index", required=True, help="the index file (SQLite; made if missing)")
    si.add_argument("--quiet", action="store_true", help="no progress bar")
    sq = ses.add_parser("query", help="the best passages for a query, with their source and BM25 score")
    sq.add_argument("query")
    sq.add_argument("--index", required=True, help="the index file")
    sq.add_argument("-k", type=int, default=5, help="how many passages (default 5)")
    se.set_defaults(func=_cmd_search)

    fb = sub.add_parser("feedback", help="the feedback database")
    fs = fb.add_subparsers(dest="action", required=True, parser_class=_Parser)
    fe = fs.add_parser("export", help="write sft.jsonl and comparisons.jsonl from the feedback database")
    fe.add_argument("--db", required=True)
    fe.add_argument("--out", required=True, help="output folder")
    fe.set_defaults(func=_cmd_feedback_export)

    ex = sub.add_parser("export", help="export a model: two files (run.py + weights), Hugging Face, GGUF")
    ex.add_argument("format", choices=["twofile", "hf", "gguf"])
    ex.add_argument("--model", required=True, help="model folder")
    ex.add_argument("--out", required=True, help="output folder (twofile, hf) or .gguf file (gguf)")
    ex.add_argument("--dtype", default="f32", help="gguf: f32 | f16 | bf16 | q8_0 | q4_0 (default f32)")
    ex.add_argument("--force", action="store_true", help="replace an existing output")
    ex.set_defaults(func=_cmd_export)

    im = sub.add_parser("import", help="import a model from elsewhere into an lmstack model folder")
    im.add_argument("format", choices=["hf", "gguf"])
    im.add_argument("file", nargs="?", help="the source: a Hugging Face folder (hf) or a .gguf file (gguf)")
    im.add_argument("--from", dest="source", help="the source, as a flag: a local Hugging Face Llama-family "
                    "folder (hf) or a llama.cpp .gguf file (gguf)")
    im.add_argument("--out", required=True, help="the lmstack model folder to write")
    im.add_argument("--force", action="store_true", help="replace an existing output")
    im.set_defaults(func=_cmd_import)

    cli_align.add_parsers(sub, _Parser)  # reward, dpo, judge, ppo, grpo, winrate
    cli_research.add_parsers(sub, _Parser)  # scaling, experiment, capabilities, think
    cli_security.add_parsers(sub, _Parser)  # redteam, poison

    asp = sub.add_parser("assistant", help="assistants: a chat model + instructions + knowledge files + tools, "
                         "run by chat, serve and the web app")
    asps = asp.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ac = asps.add_parser("create", help="write an assistant folder (its knowledge copied and indexed)")
    ac.add_argument("--model", required=True, help="a chat model folder")
    ac.add_argument("--out", required=True, help="the assistant folder")
    ac.add_argument("--name", help="its name and model id when served (default: the folder's name)")
    ac.add_argument("--instructions", help="a text file: the system message")
    ac.add_argument("--knowledge", help="a folder of .txt/.md/.jsonl/.pdf files it can search")
    ac.add_argument("--tools", default="calculator,search", help="from calculator, python, search "
                    "(default calculator,search)")
    ac.add_argument("--no-retrieve", action="store_true", help="do not look up every user message in the "
                    "knowledge (the model must call search itself)")
    ac.add_argument("--force", action="store_true")
    ac.set_defaults(func=_cmd_assistant)
    ash = asps.add_parser("show", help="an assistant's settings and its knowledge index")
    ash.add_argument("folder", type=Path)
    ash.set_defaults(func=_cmd_assistant)
    ae = asps.add_parser("eval", help="the same questions to the bare model and to the assistant: accuracy of each")
    ae.add_argument("folder", type=Path)
    ae.add_argument("--questions", required=True, help="jsonl rows {question, answer, aliases?}")
    ae.add_argument("--limit", type=int, default=0)
    ae.set_defaults(func=_cmd_assistant)

    sr = sub.add_parser("speedrun", help="the whole pipeline on the synthetic world")
    sr.add_argument("--out", default="runs/speedrun")
    sr.add_argument("--preset", default="small")
    sr.add_argument("--people", type=int, default=None, help="world size (default: from the preset)")
    sr.add_argument("--set", action="append", metavar="KEY=VALUE")
    sr.add_argument("--force", action="store_true", help="replace an existing run folder")
    sr.add_argument("--no-align", action="store_true",
                    help="stop after SFT: no reward model, DPO, PPO, GRPO (nor their evals and win rates)")
    sr.set_defaults(func=_cmd_speedrun)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:
        # Everything after `harness` is lm_eval's own command line, flags included (argparse's
        # REMAINDER would take `--help` and other leading flags as ours).
        args = argparse.Namespace(func=_cmd_harness, args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"lmstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmstack ... | head`
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
