"""Where a burst's time to first token goes in the server's scheduler (no HTTP).

    PYTHONPATH=. .venv/bin/python bench/serve_ttft_profile.py --model /work/runs/sr3/chat [--workload chat]
        [--bursts 4] [--threads 1]

The model is loaded as `lmstack serve` loads it (`--dtype auto`); a `Batcher` (serve/batcher.py)
runs in this process. Each round sends one request alone (its TTFT: the lone figure), then
bench/serve_throughput.py's 16 prompts of the workload at once (chat, completions, or assistant:
chat after a shared long system prompt), and prints when their first tokens came (p50 and the
last) and the scheduler thread's CPU time (`time.thread_time`) in each of its methods until the
last first token: admission (with the prefix cache's copies), prefill (`_prefill_group`: its
forwards, within `_prefill`), promotion, sampling, text (the decode step itself ends after the
first tokens are out, so it is not in these sums). Then one forward of each prompt shape,
alone and batched, timed directly, and the sampling of 16 rows, the old way and the new. The
first round warms up (and fills the prefix cache). A benchmark: it prints, asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time

import torch

from common import load  # bench/common.py (this script's folder is on sys.path)
from serve_throughput import CHAT_PROMPTS, TEXT_PROMPTS, messages


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", choices=["chat", "completions", "assistant"], default="chat")
    ap.add_argument("--bursts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmstack.chatformat import chat_format
    from lmstack.engine import for_inference
    from lmstack.modelio import load_model_and_tokenizer
    from lmstack.serve import batcher as B

    net, tok = load_model_and_tokenizer(args.model, "cpu")
    net = for_inference(net, args.dtype)
    if args.workload == "completions":
        ids = [[tok.bos_id] + tok.encode(p) for p in TEXT_PROMPTS]
    else:
        fmt = chat_format(tok)
        ids = [fmt.render(messages(args.workload, p), add_generation_prompt=True)[0] for p in CHAT_PROMPTS]

    spent = collections.Counter()  # scheduler-thread CPU per method
    for name in ["_admit", "_prefill", "_prefill_group", "_promote", "_step", "_sample", "_push"]:
        def timed(self, *a, _f=getattr(B.Batcher, name), _name=name, **k):
            t = time.thread_time()
            try:
                return _f(self, *a, **k)
            finally:
                spent[_name] += time.thread_time() - t
        setattr(B.Batcher, name, timed)

    b = B.Batcher(net, tok, 16).start()

    def burst(prompts):
        first, snap, done = {}, {}, [threading.Event() for _ in prompts]
        spent.clear()
        forwards = b.stats["prefill_forwards"]
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            def on_event(e, i=i):
                if i not in first:
                    first[i] = time.perf_counter() - t0
                    if len(first) == len(prompts):
                        snap.update(spent)
                if getattr(e, "finish_reason", None) or isinstance(e, tuple):
                    done[i].set()
            b.submit(B.GenRequest(prompt=p, max_tokens=64, temperature=1.0, seed=1000 + i, on_event=on_event))
        for d in done:
            d.wait()
        return sorted(first.values()), snap, b.stats["prefill_forwards"] - forwards

    print(f"{args.model}, {args.workload}: {len(ids)} prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"{torch.get_num_threads()} thread(s), {next(net.parameters()).dtype} | load {load()}")
    try:
        for r in range(args.bursts + 1):
            lone, lone_cpu, _ = burst([ids[3]])
            f, cpu, forwards = burst(ids)
            if r == 0:
                continue  # warm-up
            print(f"round {r}: lone TTFT {lone[0] * 1e3:.1f} ms (scheduler CPU {sum(lone_cpu.get(k, 0) for k in ('_admit', '_prefill', '_sample')) * 1e3:.1f} ms) | "
                  f"16 at once: TTFT p50 {f[len(f) // 2] * 1e3:.1f}, last {f[-1] * 1e3:.1f} ms, {forwards} prefill forwards; "
                  "scheduler CPU until the last first token: "
                  + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in cpu.items()) + f" ms | load {load()}", flush=True)
    finally:
        b.close()

    # One forward of the prompts' shapes, timed directly (CPU ms): what a prefill costs alone and batched.
    T = round(sum(map(len, ids)) / len(ids))
    net.setup_cache(len(ids), net.cfg.max_seq_len)
    with torch.inference_mode():
        for shape in [(1, T), (len(ids), T), (1, len(ids) * T), (len(ids), 1)]:
            if shape[1] > net.cfg.max_seq_len:
                continue  # all the prompts as one sequence: past the context
            x = torch.randint(5, net.cfg.vocab_size, shape)
            for _ in range(3):
                net.hidden(x, start_pos=0)
            c = time.process_time()
            for _ in range(10):
                net.hidden(x, start_pos=0)
            print(f"forward {list(shape)}: {(time.process_time() - c) / 10 * 1e3:.1f} ms CPU")

    # Sampling 16 rows: each alone with engine.sample_logits (the batcher before) against
    # serve/sampling.py's sample_rows, seeded rows and unseeded ones.
    from lmstack.engine import sample_logits
    from lmstack.serve.sampling import sample_rows

    logits = torch.randn(len(ids), net.cfg.vocab_size).to(next(net.parameters()).dtype)
    for seeded in (True, False):
        gens = [torch.Generator().manual_seed(i) if seeded else None for i in range(len(ids))]
        runs = {"sample_logits row by row": lambda: [sample_logits(logits[b][None], 1.0, None, None,
                                                                   None if g is None else [g])
                                                     for b, g in enumerate(gens)],
                "sample_rows": lambda: sample_rows(logits, [(1.0, None, None)] * len(ids), gens)}
        for name, run in runs.items():
            for _ in range(20):
                run()
            c = time.process_time()
            for _ in range(200):
                run()
            print(f"sampling {len(ids)} {'seeded' if seeded else 'unseeded'} rows, {name}: "
                  f"{(time.process_time() - c) / 200 * 1e3:.2f} ms CPU")


if __name__ == "__main__":
    main()
