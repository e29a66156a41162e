"""Decode speed of the two-file model's run.py (numpy, fp32) against lmstack's engine.

    .venv/bin/python bench/twofile_decode.py [--model runs/small/chat] [--shape 14m gpt2]
        [--new-tokens 128] [--repeats 5] [--threads 1] [--json FILE]

The model folder is exported with `lmstack export twofile` into a temporary folder, and the
exported run.py is imported from there (its own code, numpy only). Both sides greedily continue
the same prompt (BOS + a short text) by the same number of new tokens, at batch 1, each with its
own KV cache: run.py's `generate` (fp32 numpy), and `lmstack.engine.generate` on the same weights
in fp32 and in the dtype `--dtype auto` picks (bf16 on a CPU with native bf16, else fp32), with
the engine's default oneDNN weight packing. No stop token, so every run makes exactly
--new-tokens tokens; tok/s counts them over the whole call (the short prompt's prefill
included, the same work on both sides). Runs alternate between the sides and the median of
--repeats is kept. The greedy tokens must agree with the engine's fp32 ones (checked, printed).
Each line also gives tokens per CPU-second of this process: with one thread, what the work cost
even when other jobs take the core away part of the time.

--shape 14m gpt2 adds models randomly initialised at those shapes (bench/decode_throughput.py's:
~14M = 6 x 384, GPT-2-small's 124M = 12 x 768 with a 50304 vocabulary), with the --model
folder's tokenizer: the larger the model, the more a step is the matrix products (memory
bandwidth) rather than the per-operation overhead of Python, numpy and torch. Also printed:
run.py's start-up (reading the file, building the tokenizer's regex) and the wall time of the
command line end to end.

With --threads 1 (the default) both sides use one core: torch.set_num_threads(1) and
OPENBLAS_NUM_THREADS=1 for numpy's BLAS (set before numpy is imported). A benchmark, not a
test: it prints figures and ratios and asserts only that the tokens agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit  # bench/common.py (scripts run from bench/)

PROMPT = "The capital of France is"


def load_run_py(path: Path):
    spec = importlib.util.spec_from_file_location("twofile_run", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHAPES = {  # as in bench/decode_throughput.py
    "14m": dict(n_layer=6, n_head=6, d_model=384, vocab_size=8192, max_seq_len=512),
    "gpt2": dict(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024),
}


def random_model(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """A model folder of a SHAPES shape with random weights and the given tokenizer."""
    import dataclasses
    import shutil

    import torch

    from lmstack.config import ModelConfig
    from lmstack.model import GPT
    from lmstack.modelio import save_weights
    from lmstack.utils import atomic_write_json

    torch.manual_seed(0)
    cfg = ModelConfig(**SHAPES[shape])
    model = GPT(cfg)
    out.mkdir(parents=True)
    save_weights(model, out / "model.safetensors")
    atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    shutil.copyfile(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    return out


def bench(model_dir: Path, name: str, new_tokens: int, repeats: int, work: Path) -> dict:
    import contextlib
    import io

    from lmstack.engine import for_inference, generate
    from lmstack.tokenizer import Tokenizer
    from lmstack.modelio import load_model
    from lmstack.export.twofile import export_twofile

    out = work / f"two-{name}"
    with contextlib.redirect_stdout(io.StringIO()):
        export_twofile(model_dir, out)
    run = load_run_py(out / "run.py")
    t0 = time.perf_counter()
    np_model, np_tok = run.load(str(out / "model.safetensors"))
    startup = time.perf_counter() - t0

    tok = Tokenizer.load(model_dir)
    ids = [tok.bos_id] + tok.encode(PROMPT)
    assert np_tok.encode(PROMPT) == ids[1:]
    n = min(new_tokens, np_model.ctx - len(ids))
    engines = {"engine fp32": for_inference(load_model(model_dir), "fp32")}
    auto = for_inference(load_model(model_dir), "auto")
    auto_dtype = str(auto.embed_tokens.weight.dtype).replace("torch.", "")
    if auto_dtype != "float32":
        engines[f"engine auto ({auto_dtype})"] = auto

    def run_py():
        np_model.cached = []  # a fresh cache: prefill the prompt again
        return list(run.generate(np_model, ids, n, temperature=0.0))

    sides = {"run.py (numpy fp32)": run_py}
    for label, m in engines.items():
        sides[label] = lambda m=m: generate(m, ids, n, temperature=0)
    tokens = {k: fn() for k, fn in sides.items()}  # warm-up, and the tokens to compare
    agree = tokens["run.py (numpy fp32)"] == tokens["engine fp32"]
    times, cpu = {k: [] for k in sides}, {k: [] for k in sides}
    for _ in range(repeats):
        for k, fn in sides.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    tok_s = {k: n / statistics.median(v) for k, v in times.items()}
    tok_cpu_s = {k: n / statistics.median(v) for k, v in cpu.items()}

    # The command line, end to end (start-up, prompt, n tokens, printing).
    t = time.perf_counter()
    subprocess.run([sys.executable, str(out / "run.py"), str(out / "model.safetensors"), PROMPT, "-n", str(n),
                    "--temperature", "0"], check=True, capture_output=True)
    cli = time.perf_counter() - t

    params = np_model.n_params
    ref = tok_s["run.py (numpy fp32)"]
    print(f"\n== {name}: {model_dir} ({params / 1e6:.1f}M params, context {np_model.ctx}), prompt {len(ids)} tokens, "
          f"{n} new tokens, median of {repeats}; greedy tokens {'AGREE' if agree else 'DIFFER'} with the engine's fp32")
    ref_cpu = tok_cpu_s["run.py (numpy fp32)"]
    for k, v in tok_s.items():
        ratio = "" if k.startswith("run.py") else f"   run.py / this = {ref / v:.2f}x"
        ratio_cpu = "" if k.startswith("run.py") else f" ({ref_cpu / tok_cpu_s[k]:.2f}x)"
        print(f"  {k:24s} {v:8.1f} tok/s{ratio:32s} | per CPU-second {tok_cpu_s[k]:8.1f}{ratio_cpu}")
    print(f"  run.py start-up (read weights, build tokenizer) {startup:.2f} s; "
          f"`python run.py ... -n {n}` end to end {cli:.2f} s")
    return dict(model=str(model_dir), name=name, params=params, new_tokens=n, prompt_tokens=len(ids),
                tok_s={k: round(v, 1) for k, v in tok_s.items()}, greedy_agree=agree,
                tok_per_cpu_s={k: round(v, 1) for k, v in tok_cpu_s.items()},
                ratio_vs_engine_fp32=round(ref / tok_s["engine fp32"], 2),
                startup_s=round(startup, 2), cli_s=round(cli, 2), loadavg=os.getloadavg()[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="runs/small/chat", help="an lmstack model folder")
    ap.add_argument("--shape", nargs="*", choices=list(SHAPES), default=["14m"],
                    help="also random models of these shapes (none: --shape with no value)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="threads for torch and numpy's BLAS (0 = their default)")
    ap.add_argument("--json", default="", help="append the results as one JSON line to this file")
    a = ap.parse_args()
    if a.threads:
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import numpy as np
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"numpy {np.__version__}, torch {torch.__version__}, threads {a.threads or 'default'}, "
          f"{os.cpu_count()} CPUs, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows.append(bench(Path(a.model), "model", a.new_tokens, a.repeats, work))
        for shape in a.shape:
            folder = random_model(shape, Path(a.model), work / f"random-{shape}")
            rows.append(bench(folder, f"{shape}-random", a.new_tokens, a.repeats, work))
    emit(dict(numpy=np.__version__, torch=torch.__version__, threads=a.threads, rows=rows), a.json)


if __name__ == "__main__":
    main()
