"""EleutherAI lm-evaluation-harness on an lmstack model folder.

    pip install 'lmstack[eval]'
    lmstack harness run --model lmstack --model_args model=runs/speedrun/chat \\
        --tasks hellaswag,arc_easy --batch_size 32

The harness downloads each task's data set from the Hugging Face hub on first use (this needs
the internet) and prints its results table; `--output_path DIR` also writes the JSON, `--limit N`
evaluates only N documents per task, `--include_path DIR` adds your own task YAMLs. Everything
after `lmstack harness` is lm_eval's own command line (`lmstack harness run --help` lists it);
from Python, `evaluate(model_dir, ["hellaswag"])` returns lm_eval's results dict.

How it works: `LmstackLM` is lm_eval's `LM` interface (registered as model "lmstack") over
`lmstack.eval.lm.ModelLM`, which does the batched work:
  loglikelihood(context, continuation) -> ModelLM.loglikelihood_ids on the pair split by
      ModelLM.split_pair (context and continuation tokenized as one string; BOS first);
  loglikelihood_rolling(text) -> ModelLM.rolling_ids on [BOS] + encode(text): every token
      scored once, with windows of the full context (lm_eval's rolling scheme);
  generate_until(context, gen_kwargs) -> the engine's batched decode, stopped at the `until`
      strings or any special token (EOS, <|end|>, ...), long prompts cut on the left.
`--batch_size` (or model_args batch_size, which wins) is the rows per forward pass; lm_eval's
CLI default is 1, so pass one. model_args: model (the folder), dtype (auto | fp32 | bf16 | int8 | int4),
device (auto | cpu | cuda | cuda:N), batch_size, max_gen_toks (default 256).

Chat templates (`--apply_chat_template`): lm_eval builds a prompt string from the messages, but
lmstack's chat format is special tokens that no string can spell (user text never encodes to
them). So `apply_chat_template` returns a marker string, CHAT_MARKER + the messages as JSON, and
the three methods turn it into ids with the model's chat format (`ChatFormat.render`). Text after the JSON,
and an unclosed last assistant message (lm_eval's gen_prefix), continue the assistant's turn.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import torch
from tqdm import tqdm

from lmstack.engine import generate_batch
from lmstack.eval.lm import ModelLM
from lmstack.utils import UserError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # the eval extra is not installed: main / evaluate / LmstackLM say so
    LM, HAVE_LM_EVAL = object, False

    def register_model(*names):
        return lambda cls: cls

log = logging.getLogger(__name__)

INSTALL = "lmstack harness needs the eval extra: pip install 'lmstack[eval]'"
USAGE = """\
usage: lmstack harness run --model lmstack --model_args model=MODEL_DIR --tasks TASKS [options]

EleutherAI lm-evaluation-harness on an lmstack model folder, e.g.

  lmstack harness run --model lmstack --model_args model=runs/speedrun/chat --tasks hellaswag,arc_easy --batch_size 32

model_args: model=DIR (required), dtype=auto|fp32|bf16|int8|int4, device=auto|cpu|cuda|cuda:N, batch_size=N, max_gen_toks=N
useful options: --limit N, --output_path DIR, --include_path DIR (your own task YAMLs),
  --num_fewshot K, --apply_chat_template, --device cpu
all of lm_eval's options: lmstack harness run --help    list tasks: lmstack harness ls tasks
(the harness downloads each task's data set from the Hugging Face hub on first use)
"""

# A prompt built by apply_chat_template starts with this; the JSON of the messages follows.
CHAT_MARKER = "<|lmstack_chat|>"
MODEL_ARGS = ("model", "dtype", "device", "batch_size", "max_gen_toks")
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _need_lm_eval():
    if not HAVE_LM_EVAL:
        raise UserError(INSTALL)


def _batch_size(value) -> int:
    # lm_eval's "auto" / "auto:N" means "find the largest that fits": we take our default.
    if value is None or str(value).startswith("auto"):
        return 32
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"batch_size must be a whole number or auto (got {value!r})") from None
    if n < 1:
        raise UserError(f"batch_size must be at least 1 (got {n})")
    return n


def _device(value) -> str:
    # lm_eval's CLI passes --device, default "cuda:0" even on a machine without a GPU: like its
    # HF model, fall back to the CPU then. Other values are checked by pick_device.
    d = str(value or "auto")
    if d.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s: no CUDA GPU here, using the CPU", d)
        return "cpu"
    return d


@register_model("lmstack")
class LmstackLM(LM):
    """lm_eval's LM over an lmstack model folder (see the module docstring)."""

    def __init__(self, model=None, dtype: str = "auto", device: str = "auto", batch_size=32,
                 max_gen_toks=256):
        _need_lm_eval()
        super().__init__()
        if not model:
            raise UserError("the lmstack model needs --model_args model=MODEL_DIR")
        self.model_dir = str(model)
        self.lm = ModelLM.load(self.model_dir, dtype=str(dtype), device=_device(device),
                               batch_size=_batch_size(batch_size))
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.lm.device
        self.stop_ids = tuple(sorted(self.lm.fmt.stop_ids))  # any token that ends a turn ends a reply

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm_eval adds its own --batch_size/--device to model_args; the base class would pass a
        # key twice when both set it (a TypeError), so model_args win. max_batch_size is ignored.
        unknown = set(arg_dict) - set(MODEL_ARGS) - {"trust_remote_code"}
        if unknown:
            raise UserError(f"unknown model_args for lmstack: {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(MODEL_ARGS)})")
        extra = {k: v for k, v in (additional_config or {}).items()
                 if k in ("batch_size", "device") and v is not None}
        args = {k: v for k, v in arg_dict.items() if k != "trust_remote_code"}
        return cls(**{**extra, **args})

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def max_length(self) -> int:
        return self.lm.ctx

    # --- chat templates -----------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"lmstack:{self.model_dir}"  # keys lm_eval's request cache

    def chat_template(self, chat_template=False) -> str:
        # lm_eval only records this string with the results: the format's Jinja twin.
        return self.lm.fmt.jinja

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        """Messages -> CHAT_MARKER + JSON; `_prompt` renders it with the model's chat format."""
        return CHAT_MARKER + json.dumps({"messages": list(chat_history),
                                         "add_generation_prompt": bool(add_generation_prompt)},
                                        ensure_ascii=False)

    def _prompt(self, context: str) -> tuple[list[int], str]:
        """A context -> (head ids, text that follows them). Plain text: ([BOS], text). A chat
        marker: the rendered conversation, and as text whatever continues the assistant's turn:
        an unclosed last assistant message (add_generation_prompt=False) and any text that
        lm_eval put after the JSON."""
        tok = self.lm.tok
        if not context.startswith(CHAT_MARKER):
            return tok.scoring_head, context
        chat, end = json.JSONDecoder().raw_decode(context, len(CHAT_MARKER))
        messages, text = chat["messages"], context[end:]
        if not chat["add_generation_prompt"] and messages and messages[-1]["role"] == "assistant":
            # The assistant's reply is open (lm_eval's gen_prefix): no <|end|> after it.
            text = (messages[-1].get("content") or "") + text
            messages = messages[:-1]
            ids = self.lm.fmt.prompt(messages)
        else:
            ids = self.lm.fmt.render(messages, add_generation_prompt=chat["add_generation_prompt"])[0]
        return ids, text

    # --- scoring ------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (log p(continuation | BOS + context), greedy?).
        An empty context conditions on BOS alone."""
        pairs = []
        for req in requests:
            context, continuation = req.args[:2]
            head, text = self._prompt(context)
            pairs.append(self.lm.split_pair(text, continuation, head=head))
        # An empty continuation has probability 1; the rest go longest first, so that each batch
        # holds similar lengths (less padding), one progress step per batch.
        out: list = [(0.0, True)] * len(pairs)
        order = sorted((i for i, (_, cont) in enumerate(pairs) if cont),
                       key=lambda i: -min(len(pairs[i][0]) + len(pairs[i][1]), self.lm.ctx + 1))
        bs = self.lm.batch_size
        for b in tqdm(range(0, len(order), bs), desc="loglikelihood", disable=disable_tqdm or not order):
            chunk = order[b:b + bs]
            for i, res in zip(chunk, self.lm.loglikelihood_ids([pairs[i] for i in chunk])):
                out[i] = res
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """(text,) -> log p(text | BOS), every token scored once, each with up to a full context."""
        docs = [self.lm.tok.scoring_head + self.lm.tok.encode(req.args[0]) for req in requests]
        out, bs = [], self.lm.batch_size
        for b in tqdm(range(0, len(docs), bs), desc="loglikelihood_rolling", disable=disable_tqdm or not docs):
            out += [lp for lp, _ in self.lm.rolling_ids(docs[b:b + bs])]
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return out

    # --- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """(context, gen_kwargs) -> the continuation, batched by equal gen_kwargs.

        gen_kwargs: until (a string or a list: the reply is cut before the first; a special
        token such as EOS or <|end|> also ends it), max_gen_toks (default: the model's
        max_gen_toks), and sampling as Hugging Face reads it: greedy unless do_sample is true
        and temperature (default 1.0) > 0; then temperature, top_k and top_p apply, with
        torch's global RNG (lm_eval seeds it). Other keys are ignored, with a warning. A prompt
        too long for the context loses its oldest tokens (BOS kept)."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1] or {}, sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not requests)
        for members in groups.values():
            kw = dict(requests[members[0]].args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if not all(isinstance(s, str) for s in until):
                raise ValueError(f"until must be a string or a list of strings (got {until!r})")
            max_tokens = int(kw.get("max_gen_toks") or self.max_gen_toks)
            temperature = float(kw.get("temperature", 1.0) or 0.0)
            sample = bool(kw.get("do_sample")) and temperature > 0
            if set(kw) - GEN_KWARGS:
                log.warning("lmstack ignores gen_kwargs %s", ", ".join(sorted(set(kw) - GEN_KWARGS)))
            prompts = {}
            for i in members:
                head, text = self._prompt(requests[i].args[0])
                prompts[i] = head + self.lm.tok.encode(text)
            members = sorted(members, key=lambda i: -len(prompts[i]))  # similar lengths per batch
            bs = self.lm.batch_size
            for b in range(0, len(members), bs):
                chunk = members[b:b + bs]
                results = generate_batch(
                    self.lm.model, [prompts[i] for i in chunk], max_tokens,
                    temperature=temperature if sample else 0.0,
                    top_k=kw.get("top_k") if sample else None, top_p=kw.get("top_p") if sample else None,
                    stop_strings=tuple(until), stop_ids=self.stop_ids, tokenizer=self.lm.tok, truncate="left")
                for i, c in zip(chunk, results):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
                bar.update(len(chunk))
        bar.close()
        return out


# --- entry points -----------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    """`lmstack harness ARGS`: lm_eval's own command line, with the "lmstack" model registered
    (importing this module did that)."""
    _need_lm_eval()
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    # cli_evaluate reads sys.argv (in every lm_eval version): lend it ours.
    saved = sys.argv
    sys.argv = ["lmstack harness"] + argv
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ConnectionError as e:  # datasets could not reach the hub
        raise UserError(f"{e} (the harness downloads each task's data set from the Hugging Face hub: "
                        "it needs the internet, or the data in the HF cache)") from None
    except ValueError as e:
        # Raised by lm_eval itself: its checks of what was asked (an unknown task, no --tasks,
        # --log_samples without --output_path, ...), worth one line rather than a traceback.
        if Path(traceback.extract_tb(e.__traceback__)[-1].filename).is_relative_to(Path(lm_eval.__file__).parent):
            raise UserError(f"lm_eval: {e}") from None
        raise
    finally:
        sys.argv = saved
    return 0


def evaluate(model_dir, tasks, limit=None, include_path=None, include_defaults: bool = True, **kw) -> dict:
    """lm_eval.simple_evaluate on an lmstack model folder (or an LmstackLM already loaded).
    tasks: names or a comma-separated string; include_path: a folder of your own task YAMLs
    (include_defaults=False skips indexing lm_eval's ~15k built-in tasks: faster). Keywords
    dtype, device, batch_size, max_gen_toks load the model; the others go to simple_evaluate
    (num_fewshot, apply_chat_template, log_samples, ...).
    Returns lm_eval's results dict ("results" holds the metrics per task)."""
    _need_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_kw = {k: kw.pop(k) for k in MODEL_ARGS if k in kw}
    if isinstance(model_dir, LmstackLM):
        if model_kw:
            raise ValueError(f"{', '.join(model_kw)}: the model is already loaded")
        lm = model_dir
    else:
        lm = LmstackLM(model=model_dir, **model_kw)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          **({} if include_defaults else {"include_defaults": False}))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, **kw)
