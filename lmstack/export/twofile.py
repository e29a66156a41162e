"""`lmstack export twofile`: a language model is two files, the parameters and the code that runs them.

    OUT/
      model.safetensors   the weights in float32; the safetensors metadata carries
                          {"format": "lmstack-twofile", "config": <config.json>, "tokenizer": <tokenizer.json>},
                          and for an imported model with a format of its own, "chat_format": <chat_format.json>
      run.py              lmstack/export/run.py, copied as is: one program, numpy its only
                          dependency, that reads the file above, tokenizes, runs and samples
                          (`python run.py model.safetensors "prompt"`, or `--chat`)

A tied output head is stored once (as `embed_tokens.weight`, like the model folder's own
weights); the config's `tie_embeddings` tells run.py to reuse it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from lmstack.export import run as standalone
from lmstack.modelio import load_model_and_tokenizer, save_safetensors
from lmstack.utils import UserError, atomic_output_dir, check_output_dir, current_umask

RUN_PY = Path(__file__).with_name("run.py")
FORMAT = "lmstack-twofile"


def export_twofile(model_dir: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> Path:
    """Write OUT/model.safetensors and OUT/run.py (and nothing else) from a model folder."""
    check_output_dir(out, force)  # fail before loading anything
    if not RUN_PY.is_file():
        raise UserError(f"{RUN_PY} is missing from this lmstack installation")
    model, tok = load_model_and_tokenizer(model_dir)
    # an imported model: its own tokenizer and chat format (chat_format.json) travel in the metadata
    fmt, tok_json = None if tok.own is None else dataclasses.asdict(tok.own), tok.to_str()
    cfg = model.cfg
    check_run_py_tokenizer(tok_json, fmt, tok.encode, model_dir)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    metadata = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(cfg)), "tokenizer": tok_json}
    if fmt is not None:
        metadata["chat_format"] = json.dumps(fmt, ensure_ascii=False)
    with atomic_output_dir(out, force) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata)
        shutil.copyfile(RUN_PY, tmp / "run.py")
        os.chmod(tmp / "run.py", 0o777 & ~current_umask())  # executable: it has a #! line
    out = Path(out)
    weights, code = out / "model.safetensors", out / "run.py"
    n_lines = len(code.read_text().splitlines())
    print(f"export twofile: {weights} ({weights.stat().st_size / 1e6:.1f} MB: "
          f"{sum(t.numel() for t in tensors.values()) / 1e6:.1f}M float32 parameters, config and tokenizer "
          f"in the metadata) + {code} ({code.stat().st_size / 1e3:.1f} kB, {n_lines} lines, needs only numpy)\n"
          f"run it: python {code} {weights} \"Once upon a time\"   (or --chat)")
    return out


# Encoded by run.py and by lmstack at export time: a tokenizer run.py would get wrong is refused here.
PROBE = "Hello, world! It's 2024: naïve café, 日本語 🙂\n\n  \t<|user|> don't  1234567 x "
PROBES = [PROBE, "I'LL go, we've they're 'S x'sy", "a  b\r\n\r\n  c\t\t\n", "١٢٣ ½ 3.14159 1,000,000",
          "Ελληνικά русский עברית 👨‍👩‍👧🇫🇷", "<|im_start|>user\nhi<|im_end|><|endoftext|> <|eot_id|>", "ſ 'ſ \u212a"]


def check_run_py_tokenizer(tok_json: str, fmt: dict | None, encode, model_dir) -> None:
    """run.py reimplements byte-level BPE with the common pre-tokenizers (lmstack's, GPT-2's,
    Llama 3's, Qwen2's, SmolLM's): refuse to export a tokenizer it does not reproduce on PROBES
    (encode: lmstack's reading of the same tokenizer), rather than write a run.py that tokenizes differently."""
    try:
        rtok = standalone.Tokenizer(tok_json, fmt)
        mismatch = next((p for p in PROBES if rtok.encode(p) != encode(p)), None)
    except standalone.Fail as e:
        raise UserError(f"{model_dir}: run.py cannot run this tokenizer: {e}") from None
    if mismatch is not None:
        raise UserError(f"{model_dir}: run.py's tokenizer does not reproduce this tokenizer.json (on {mismatch!r})")
