"""`export twofile` of an imported model: run.py with the model's own tokenizer and chat format.

- run.py's tokenizer (numpy only) against Hugging Face's on the tricky-strings table, for the
  foreign byte-level pre-tokenizers (Llama 3's split with ignore_merges, SmolLM's digits + GPT-2,
  GPT-2's, Qwen2's), with plain added tokens and ChatML specials;
- the twofile of an imported ChatML model (no BOS): the chat format travels in the metadata; a
  plain prompt gets no BOS and stops at EOS; --chat renders the model's own template with jinja2,
  to the ids transformers' apply_chat_template gives, except that special-token text inside a
  message stays text; the reply stops at <|im_end|>; without jinja2, --chat says so in one line.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lmstack.engine import generate
from lmstack.export import run as runpy_module
from lmstack.export.twofile import export_twofile
from lmstack.modelio import load_model
from lmstack.utils import UserError
from test_gguf_import import (CHATML, FOREIGN, TABLE, TEXT, encode, foreign_folder, foreign_tokenizer,  # noqa: E402
                              unknown_pre_tokenizer_folder)

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = TEXT * 30 + "\n".join(t for t in TABLE if "\x00" not in t) * 5
FMT = {"template": CHATML, "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
       "add_bos": False, "stop_tokens": ["<|im_end|>", "<|endoftext|>"]}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_run_py_tokenizes_like_hugging_face(name):
    hf = foreign_tokenizer(name, CORPUS)
    tok = runpy_module.Tokenizer(hf.to_str(), FMT)
    for text in TABLE:
        assert tok.encode(text) == encode(hf, text), (name, text)
        assert tok.encode(text, special=True) == encode(hf, text, special=True), (name, text)
        assert tok.decode(encode(hf, text)) == text
    ids = encode(hf, "<|im_start|>x<|im_end|>", special=True)
    assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True) == "x"


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    """(HF tokenizer, imported folder, twofile folder) for a ChatML model with SmolLM's pre-tokenizer."""
    hf = foreign_tokenizer("smollm", CORPUS)
    root = tmp_path_factory.mktemp("own")
    d = foreign_folder(root / "m", hf, train_steps=100)
    return hf, d, export_twofile(d, root / "two")


def apply_chat_template(hf, messages):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>")
    t.chat_template = CHATML
    r = t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(r["input_ids"] if hasattr(r, "keys") else r)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café 1234?"},
     {"role": "assistant", "content": "Oui. [[note]]"}, {"role": "user", "content": " spaces  \n\n"}],
]


def test_chat_format_travels_and_renders_as_transformers(chatml):
    pytest.importorskip("jinja2")
    hf, d, two = chatml
    model, tok = runpy_module.load(str(two / "model.safetensors"))
    assert tok.fmt == {"source": None, **json.loads((d / "chat_format.json").read_text())}  # OwnFormat's fields
    assert tok.prompt_head == [] and tok.text_stops == {hf.token_to_id("<|endoftext|>")}
    assert tok.chat_stops == {hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>")}
    template = runpy_module.jinja_template(CHATML)
    for messages in CONVERSATIONS:
        assert runpy_module.render_own(tok, template, messages) == apply_chat_template(hf, messages)
    # special-token text typed in a message stays text (transformers would make it the token)
    typed = [{"role": "user", "content": "a<|im_end|>b"}]
    want = (encode(hf, "<|im_start|>", special=True) + encode(hf, "user\na<|im_end|>b")
            + encode(hf, "<|im_end|>\n<|im_start|>assistant\n", special=True))
    assert runpy_module.render_own(tok, template, typed) == want != apply_chat_template(hf, typed)
    # a template that changes the content cannot be mapped: then it is transformers' tokenization
    trimmed = runpy_module.jinja_template(CHATML.replace("message['content']", "message['content'] | trim"))
    spaced = [{"role": "user", "content": "  hi  "}]
    assert runpy_module.render_own(tok, trimmed, spaced) == encode(
        hf, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", special=True)
    # and the model is the folder's: the same greedy tokens as the engine
    ids = encode(hf, "The calculator says")
    ours = generate(load_model(d), ids, max_tokens=12, temperature=0.0)
    assert list(runpy_module.generate(model, ids, 12, 0.0, stop_ids=tok.text_stops)) == ours


def test_a_reply_stops_at_the_models_end_of_turn(chatml, capsys):
    pytest.importorskip("jinja2")
    hf, d, two = chatml
    _, tok = runpy_module.load(str(two / "model.safetensors"))
    script = encode(hf, "Hello there.") + [hf.token_to_id("<|im_end|>"), 5, 6]

    class Scripted:
        ctx, prompts = 256, []

        def __init__(self):
            self.left = iter(script)

        def prefill(self, ids):
            self.prompts.append(list(ids))
            return self.decode(None)

        def decode(self, token):
            logits = np.zeros(hf.get_vocab_size() + 5, np.float32)
            logits[next(self.left)] = 1.0
            return logits

    model = Scripted()
    history = [{"role": "user", "content": "Hi"}]
    opts = argparse.Namespace(n=50, temperature=0.0, top_k=None, top_p=None)
    template = runpy_module.jinja_template(CHATML)
    new = runpy_module.assistant_turn(model, tok, history, opts, np.random.default_rng(0), template)
    assert new == [{"role": "assistant", "content": "Hello there."}]
    assert capsys.readouterr().out == "Hello there.\n"
    assert model.prompts == [apply_chat_template(hf, history)]


def run_numpy_only(numpy_only, args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=str(numpy_only), PYTHONIOENCODING="utf-8", OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-S", *map(str, args)], input="hi\n", capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=numpy_only, timeout=120)


def test_without_jinja2_chat_says_so_and_plain_prompts_work(chatml, numpy_only):
    hf, d, two = chatml
    r = run_numpy_only(numpy_only, [two / "run.py", two / "model.safetensors", "--chat"])
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "jinja2" in r.stderr, r.stderr
    r = run_numpy_only(numpy_only, [two / "run.py", two / "model.safetensors", "The calculator says", "--ids",
                                    "-n", "8", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == encode(hf, "The calculator says")  # no BOS: add_bos is false
    assert out["ids"] == generate(load_model(d), out["prompt_ids"], max_tokens=8, temperature=0.0)


def test_a_pre_tokenizer_run_py_does_not_know_is_refused(tmp_path):
    d = unknown_pre_tokenizer_folder(tmp_path / "m", CORPUS)
    with pytest.raises(UserError, match="run.py cannot run this tokenizer.*Whitespace"):
        export_twofile(d, tmp_path / "two")
    assert not (tmp_path / "two").exists()
