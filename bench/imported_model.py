"""Does an imported instruct model behave in lmstack as with its own tooling? lmstack against
`transformers` (apply_chat_template + generate) on the same model, in the same run.

    .venv/bin/python bench/imported_model.py [--src DIR] [--json FILE] [--threads 1] [--keep DIR]

1. The model (built here, seeded, offline, in a temporary folder): a byte-level BPE tokenizer
   trained with `tokenizers` (specials <|endoftext|>, <|im_start|>, <|im_end|>; no BOS added;
   SmolLM2-Instruct's ChatML template, its default system prompt included) and a small
   `transformers.LlamaForCausalLM` (tied embeddings) taught a QA set of synthetic facts about
   made-up people ("What is the favourite colour of Kalo Miren?" -> "Blue.") rendered with ITS
   OWN template by apply_chat_template, loss on the assistant's tokens and its <|im_end|>, until
   teacher-forced decoding gets every answer token of most questions right. Saved with
   save_pretrained: weights, tokenizer with its chat template, generation_config (eos <|im_end|>).
2. The peer: transformers greedy `generate` on apply_chat_template(add_generation_prompt=True)
   with eos_token_id = <|im_end|>: accuracy (the answer appears in the reply as a whole word,
   the rule of lmstack's `contains` check) on every question.
3. lmstack, from this checkout or the tree given with --src (on PYTHONPATH, in a subprocess run
   from a temporary folder; e.g. `git worktree add /tmp/before 0775f27`, the import before
   models kept their own chat format): `lmstack import hf --from HF --out DIR`; then a probe (the
   prompt ids lmstack renders for one conversation against transformers', and the largest
   |logit difference| of lmstack's model and transformers' on transformers' prompt ids);
   `lmstack eval --tasks SPEC.toml` with a chat generate task over a jsonl of {question, answer}
   (check = "contains"), in fp32 (transformers' precision) and with the default dtype (auto:
   bf16 where the CPU does it natively); and `lmstack serve` asked a few questions through the
   official `openai` client (finish_reason, text).

Printed: accuracy of each side and the ratio, how many replies ended at the model's end of turn
(lmstack's `closed`; the API's finish_reason "stop"), how many of lmstack's replies equal
transformers' word for word, and sample replies. A measurement, not a test: it asserts nothing.
About 3-4 minutes on 2 shared cores (training the model is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit, load, running_server  # bench/common.py (this script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-Instruct's chat template, verbatim (tokenizer_config.json of HuggingFaceTB/SmolLM2-*-Instruct).
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SYLLABLES = ["ka", "lo", "mi", "ren", "to", "va", "zu", "pe", "ri", "sa", "no", "bel", "dor", "fi", "gu", "tam"]
ATTRIBUTES = [  # (question, reply, the answers)
    ("What is the favourite colour of {name}?", "{a}.",
     ["Blue", "Red", "Green", "Yellow", "Purple", "Orange", "White", "Black"]),
    ("What is the favourite fruit of {name}?", "{a}.",
     ["Apple", "Mango", "Pear", "Plum", "Cherry", "Lemon", "Peach", "Grape"]),
    ("Which pet does {name} have?", "A {a}.",
     ["cat", "dog", "parrot", "rabbit", "horse", "turtle", "goat", "hamster"]),
]
MAX_NEW = 16  # tokens per reply, both sides (an answer is 2-5 tokens and <|im_end|>)


def contains(reply: str, answer: str) -> bool:
    """lmstack's `contains` check: the answer as a whole word, case-insensitive."""
    return re.search(r"(?<!\w)" + re.escape(answer.casefold()) + r"(?!\w)", reply.casefold()) is not None


# --- 1. the model, as a Hugging Face folder ----------------------------------------------------

def make_facts(n_people: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = set()
    while len(names) < n_people:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2)))).capitalize()
        names.add(f"{first} {last}")
    facts = []
    for name in sorted(names):
        for question, reply, answers in ATTRIBUTES:
            a = rng.choice(answers)
            facts.append({"question": question.format(name=name), "reply": reply.format(a=a), "answer": a})
    return facts


def build_hf_model(folder: Path, facts: list[dict], seed: int, max_steps: int, target: float) -> dict:
    import transformers
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    raw.decoder = decoders.ByteLevel()
    corpus = [f["question"] + " " + f["reply"] for f in facts] + [
        "system user assistant You are a helpful AI assistant named SmolLM, trained by Hugging Face"] * 5
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=640, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", pad_token="<|im_end|>",
                                               unk_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    im_start, im_end = raw.token_to_id("<|im_start|>"), raw.token_to_id("<|im_end|>")
    cfg = transformers.LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=128, intermediate_size=384,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                   bos_token_id=im_start, eos_token_id=im_end, pad_token_id=im_end)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)

    # Each conversation rendered by transformers with the model's own template; the loss covers
    # what follows the generation prompt up to and including <|im_end|> (not the "\n" after it).
    seqs, labels = [], []
    for f in facts:
        user = [{"role": "user", "content": f["question"]}]
        head = chat_ids(tok, user, add_generation_prompt=True)
        full = chat_ids(tok, user + [{"role": "assistant", "content": f["reply"]}])
        assert full[:len(head)] == head, "the template's generation prompt is not a prefix of the conversation"
        end = full.index(im_end, len(head)) + 1
        seqs.append(full[:end])
        labels.append([-100] * len(head) + full[len(head):end])
    T = max(map(len, seqs))
    x = torch.tensor([s + [im_end] * (T - len(s)) for s in seqs])  # right padding: causal, so harmless
    y = torch.tensor([lab + [-100] * (T - len(lab)) for lab in labels])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.98))
    t0, step, acc = time.time(), 0, 0.0
    model.train()
    while step < max_steps:
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 30)
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            acc = teacher_forced_accuracy(model, x, y)
            if acc >= target:
                break
    model.eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=im_start, eos_token_id=im_end,
                                                            pad_token_id=im_end)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny ChatML instruct model (synthetic)\n")
    n_params = sum(p.numel() for p in model.parameters())
    return {"vocab": raw.get_vocab_size(), "params": n_params, "train_steps": step,
            "train_seconds": round(time.time() - t0, 1), "train_loss": round(loss.item(), 4),
            "teacher_forced_acc": round(acc, 3), "seq_len": T}


def chat_ids(tok, messages, **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


@torch.no_grad()
def teacher_forced_accuracy(model, x, y) -> float:
    """Share of conversations whose every assistant token is the argmax (= greedy decoding's reply)."""
    model.eval()
    pred = model(input_ids=x).logits[:, :-1].argmax(-1)
    model.train()
    tgt = y[:, 1:]
    ok = ((pred == tgt) | (tgt == -100)).all(dim=1)
    return float(ok.float().mean())


# --- 2. the peer: transformers ------------------------------------------------------------------

@torch.no_grad()
def transformers_answers(hf_dir: Path, facts: list[dict]) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    t0 = time.time()
    replies, closed = [], 0
    for f in facts:
        ids = chat_ids(tok, [{"role": "user", "content": f["question"]}], add_generation_prompt=True)
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
        new = out[0, len(ids):].tolist()
        closed += im_end in new
        replies.append(tok.decode(new, skip_special_tokens=True))
    hits = [contains(r, f["answer"]) for r, f in zip(replies, facts)]
    return {"acc": sum(hits) / len(hits), "hits": sum(hits), "n": len(hits), "closed": closed / len(hits),
            "replies": replies, "seconds": round(time.time() - t0, 1)}


# --- 3. lmstack (this checkout or --src) ----------------------------------------------------------

def lmstack_env(src: Path, threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}


def run_lmstack(args: list[str], src: Path, threads: int, cwd: Path, timeout: float = 300) -> tuple[int, str, float]:
    """`python -m lmstack ARGS` from a temporary folder (so no checkout in the working folder
    shadows --src) -> (return code, its output, seconds)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "lmstack", *args], cwd=cwd, env=lmstack_env(src, threads),
                       capture_output=True, text=True, timeout=timeout, check=False)
    return p.returncode, (p.stdout + p.stderr).strip(), round(time.time() - t0, 1)


PROBE = r"""
import json, sys, torch
from lmstack.chatformat import chat_format
from lmstack.modelio import load_model_and_tokenizer
model_dir, path = sys.argv[1], sys.argv[2]
job = json.load(open(path))
model, tok = load_model_and_tokenizer(model_dir)
fmt = chat_format(tok)
ids = [[int(i) for i in fmt.render(m, add_generation_prompt=True)[0]] for m in job["conversations"]]
with torch.inference_mode():
    logits = model.float()(torch.tensor([job["hf_ids"]]))[0]
torch.save(logits, path + ".pt")
json.dump({"ids": ids, "text": [tok.decode(i) for i in ids], "vocab": tok.vocab_size}, open(path, "w"))
"""


def probe_conversations(facts: list[dict]) -> list[list[dict]]:
    """The conversations whose prompt ids are compared: one question (the first is also the one
    whose logits are compared), a system prompt, two turns, and text with accents, CJK, an
    emoji, a tab and trailing spaces (no text that spells a special token: transformers turns
    it into the token, lmstack keeps it text, a documented difference)."""
    q = [f["question"] for f in facts]
    return [[{"role": "user", "content": q[0]}],
            [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": q[1]}],
            [{"role": "user", "content": q[2]}, {"role": "assistant", "content": facts[2]["reply"]},
             {"role": "user", "content": q[3]}],
            [{"role": "user", "content": "Zoë from Łódź, 東京 🙂 don't\ttab  \n"}]]


def probe(model_dir: Path, hf_dir: Path, facts: list[dict], src: Path, threads: int, tmp: Path) -> dict:
    """lmstack's prompt ids against transformers' apply_chat_template(add_generation_prompt=True)
    on a few conversations; lmstack's logits on transformers' ids of the first against
    transformers' (the first `vocab` columns: the old import appended 16 tokens after the
    model's own)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    convs = probe_conversations(facts)
    hf_ids = [chat_ids(tok, m, add_generation_prompt=True) for m in convs]
    job = tmp / "probe.json"
    job.write_text(json.dumps({"conversations": convs, "hf_ids": hf_ids[0]}))
    p = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), str(job)], cwd=tmp,
                       env=lmstack_env(src, threads), capture_output=True, text=True, timeout=120, check=False)
    if p.returncode != 0:
        return {"probe_error": (p.stdout + p.stderr).strip().splitlines()[-1]}
    got = json.loads(job.read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([hf_ids[0]])).logits[0]
    ours = torch.load(str(job) + ".pt")
    V = ref.shape[-1]
    equal = [a == b for a, b in zip(got["ids"], hf_ids)]
    return {"ids_equal": sum(equal), "conversations": len(convs), "lmstack_prompt": got["text"][0],
            "transformers_prompt": tok.decode(hf_ids[0]),
            "differ": [i for i, e in enumerate(equal) if not e], "lmstack_vocab": got["vocab"], "hf_vocab": V,
            "max_logit_diff": float((ours[:, :V] - ref).abs().max())}


def lmstack_eval(model_dir: Path, facts_file: Path, dtype: str, src: Path, threads: int, tmp: Path,
                 hf_replies: list[str]) -> dict:
    spec = tmp / "facts.toml"
    spec.write_text(f'[[task]]\nname = "facts"\ndata = "{facts_file}"\nkind = "generate"\nformat = "chat"\n'
                    f'prompt = "{{question}}"\nanswer = "answer"\ncheck = "contains"\nmax_tokens = {MAX_NEW}\n')
    out = tmp / f"eval-{dtype}.json"
    rc, log, secs = run_lmstack(["eval", "--model", str(model_dir), "--tasks", str(spec), "--out", str(out),
                                 "--dtype", dtype], src, threads, tmp)
    if rc != 0:
        return {"error": log.splitlines()[-1] if log else f"exit code {rc}", "log": log[-2000:]}
    r = json.loads(out.read_text())
    task = r["tasks"]["facts"]
    replies = {it["line"]: it.get("reply", "") for it in task["items"]}
    same = sum(replies.get(i, "").strip() == h.strip() for i, h in enumerate(hf_replies))
    closed = task.get("closed")
    return {"acc": task["acc"], "n": task["n"], "hits": sum(it["hit"] for it in task["items"]),
            "closed": closed["acc"] if isinstance(closed, dict) else closed, "same_as_transformers": same,
            "dtype": r.get("dtype"), "seconds": secs, "sample": replies.get(0)}


def lmstack_serve(model_dir: Path, facts: list[dict], src: Path, threads: int) -> dict:
    import openai

    out = []
    with running_server(model_dir, args=["--dtype", "fp32", "--threads", str(threads)], src=str(src),
                        env={"OMP_NUM_THREADS": str(threads)}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        name = client.models.list().data[0].id
        for f in facts:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": f["question"]}],
                                               max_tokens=MAX_NEW, temperature=0)
            c = r.choices[0]
            out.append({"question": f["question"], "finish_reason": c.finish_reason, "text": c.message.content,
                        "hit": contains(c.message.content or "", f["answer"])})
    return {"n": len(out), "stop": sum(o["finish_reason"] == "stop" for o in out), "hits": sum(o["hit"] for o in out),
            "finish_reasons": sorted({o["finish_reason"] for o in out}), "replies": out}


# --- the run --------------------------------------------------------------------------------------

def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="the lmstack checkout to measure (default: this one)")
    ap.add_argument("--people", type=int, default=27, help="made-up people, 3 facts each (default 27: 81 facts)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=600, help="training steps at most (full batch)")
    ap.add_argument("--target", type=float, default=0.95, help="stop training at this teacher-forced accuracy")
    ap.add_argument("--serve-questions", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on every side")
    ap.add_argument("--keep", help="also copy the Hugging Face model folder here")
    ap.add_argument("--json", help="append the result line to this file")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    src = Path(a.src).resolve() if a.src else REPO
    t_start = time.time()
    result = {"src": str(src), "load_start": load()}
    with tempfile.TemporaryDirectory(prefix="lmstack-imported-") as tmp:
        tmp = Path(tmp)
        facts = make_facts(a.people, a.seed)
        hf_dir = tmp / "hf"
        built = build_hf_model(hf_dir, facts, a.seed, a.max_steps, a.target)
        if a.keep:
            shutil.copytree(hf_dir, a.keep, dirs_exist_ok=True)
        print(f"model: {built['params']:,} params, vocab {built['vocab']}, {len(facts)} facts, "
              f"{built['train_steps']} steps in {built['train_seconds']} s (loss {built['train_loss']}, "
              f"teacher-forced {pct(built['teacher_forced_acc'])}), load {load()}", flush=True)
        result["model"] = built

        peer = transformers_answers(hf_dir, facts)
        print(f"transformers: {peer['hits']}/{peer['n']} = {pct(peer['acc'])}, ended by <|im_end|> "
              f"{pct(peer['closed'])}, {peer['seconds']} s, load {load()}", flush=True)
        result["transformers"] = {k: v for k, v in peer.items() if k != "replies"}
        result["transformers"]["sample"] = peer["replies"][0]

        facts_file = tmp / "facts.jsonl"
        facts_file.write_text("".join(json.dumps({"question": f["question"], "answer": f["answer"]}) + "\n"
                                      for f in facts))
        imp = tmp / "imported"
        rc, log, secs = run_lmstack(["import", "hf", "--from", str(hf_dir), "--out", str(imp)], src, a.threads, tmp)
        result["import"] = {"ok": rc == 0, "seconds": secs, "said": log.splitlines()[-1] if log else ""}
        print(f"lmstack import hf ({src}): exit {rc} in {secs} s: {result['import']['said']}", flush=True)
        if rc == 0:
            fmt_file = imp / "chat_format.json"
            result["import"]["chat_format_json"] = fmt_file.is_file()
            result["probe"] = probe(imp, hf_dir, facts, src, a.threads, tmp)
            print(f"probe: {json.dumps(result['probe'])}", flush=True)
            for dtype in ("fp32", "auto"):
                r = lmstack_eval(imp, facts_file, dtype, src, a.threads, tmp, peer["replies"])
                result[f"eval_{dtype}"] = r
                if "error" in r:
                    print(f"lmstack eval --dtype {dtype}: FAILED: {r['error']}\n{r['log']}", flush=True)
                else:
                    print(f"lmstack eval --dtype {dtype} ({r['dtype']}): {r['hits']}/{r['n']} = {pct(r['acc'])} "
                          f"(x{r['acc'] / peer['acc']:.2f} of transformers), closed {pct(r['closed'])}, "
                          f"same reply as transformers {r['same_as_transformers']}/{r['n']}, {r['seconds']} s "
                          f"(load and all), sample {r['sample']!r}, load {load()}", flush=True)
            try:
                step = max(1, len(facts) // a.serve_questions)  # spread over the people
                s = lmstack_serve(imp, facts[::step][:a.serve_questions], src, a.threads)
            except Exception as e:  # the old server may not start or answer: a figure, not a crash
                s = {"error": f"{type(e).__name__}: {e}"}
            result["serve"] = s
            if "error" in s:
                print(f"lmstack serve + openai: FAILED: {s['error']}", flush=True)
            else:
                print(f"lmstack serve + openai: finish_reason stop {s['stop']}/{s['n']} "
                      f"({', '.join(map(str, s['finish_reasons']))}), correct {s['hits']}/{s['n']}; "
                      f"{s['replies'][0]['question']!r} -> {s['replies'][0]['text']!r}", flush=True)
    result.update(seconds=round(time.time() - t_start, 1), load_end=load())
    print_table(result)
    emit(result, a.json)


def print_table(r: dict) -> None:
    """The figures as markdown rows: figure | transformers | lmstack | lmstack / transformers."""
    peer = r["transformers"]
    rows = []
    for dtype in ("fp32", "auto"):
        e = r.get(f"eval_{dtype}")
        if e is None:
            continue
        if "error" in e:
            rows.append((f"accuracy, lmstack eval --dtype {dtype}", f"{peer['hits']}/{peer['n']}",
                         f"error: {e['error']}", "-"))
            continue
        rows.append((f"accuracy, lmstack eval --dtype {dtype} ({e['dtype']})", f"{peer['hits']}/{peer['n']}",
                     f"{e['hits']}/{e['n']}", f"{e['acc'] / peer['acc']:.2f}x" if peer["acc"] else "-"))
        rows.append((f"replies ended at the end of turn ({dtype})", f"{round(peer['closed'] * peer['n'])}/{peer['n']}",
                     f"{round((e['closed'] or 0) * e['n'])}/{e['n']}", ""))
        rows.append((f"replies equal to transformers' ({dtype})", "", f"{e['same_as_transformers']}/{e['n']}", ""))
    s = r.get("serve")
    if s and "error" not in s:
        rows.append(("serve + openai: finish_reason stop", "", f"{s['stop']}/{s['n']}", ""))
        rows.append(("serve + openai: correct", "", f"{s['hits']}/{s['n']}", ""))
        rows.append(("serve + openai: sample reply", "", f"{s['replies'][0]['text']!r}", ""))
    elif s:
        rows.append(("serve + openai", "", f"error: {s['error']}", ""))
    p = r.get("probe", {})
    if "ids_equal" in p:
        same = f"{p['ids_equal']}/{p['conversations']} conversations"
        rows.append(("prompt ids equal to apply_chat_template's", "", same if p["ids_equal"] == p["conversations"]
                     else f"{same}; lmstack's first: {p['lmstack_prompt'][:60]!r}", ""))
        rows.append(("max abs logit difference (transformers' ids)", "", f"{p['max_logit_diff']:.1e}", ""))
    elif p:
        rows.append(("probe", "", f"error: {p['probe_error']}", ""))
    if not r["import"]["ok"]:
        rows.append(("lmstack import hf", "", f"error: {r['import']['said']}", ""))
    print(f"\n| figure ({r['src']}) | transformers | lmstack | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(x.replace("|", "\\|").replace("\n", "\\n") for x in row) + " |")
    print(f"({r['seconds']} s, load {r['load_start']} -> {r['load_end']})\n", flush=True)


if __name__ == "__main__":
    main()
