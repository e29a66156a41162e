"""Models in and out of lmstack's model folder.

    hf.py       `lmstack export hf` / `lmstack import hf`: a Hugging Face Llama folder, both ways
    gguf.py     `lmstack export gguf`: one .gguf file for llama.cpp, Ollama, LM Studio
    twofile.py  `lmstack export twofile`: model.safetensors + run.py, a model as two files
    run.py      that run.py: numpy only, imports nothing from lmstack (copied as it is)
"""

from lmstack.utils import UserError


def require_llama(cfg, fmt: str) -> None:
    """A model with smeared keys (model.smear_keys) is not a Llama: a clear error for the formats
    that only hold Llamas (Hugging Face, GGUF); lmstack's own folder and `twofile` run it."""
    if cfg.smear_keys:
        raise UserError(f"this model has smeared keys (model.smear_keys), which {fmt} has no place for; "
                        "use `lmstack export twofile` or the model folder itself")
