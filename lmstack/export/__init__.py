"""Models in and out of lmstack's model folder.

    hf.py       `lmstack export hf` / `lmstack import hf`: a Hugging Face Llama folder, both ways
    gguf.py     `lmstack export gguf`: one .gguf file for llama.cpp, Ollama, LM Studio
    twofile.py  `lmstack export twofile`: model.safetensors + run.py, a model as two files
    run.py      that run.py: numpy only, imports nothing from lmstack (copied as it is)
"""
