"""Hugging Face interop: export a model folder as a `transformers` Llama, import one back.

    lmstack export hf --model runs/speedrun/chat --out runs/hf/chat
    lmstack import hf --from ~/models/SmolLM2-135M --out runs/smollm

Export is a rename (DESIGN.md: the model is Llama-shaped): our weight names are HF's minus the
`model.` prefix. The folder holds config.json (LlamaForCausalLM), model.safetensors (sharded
with an index past `max_shard_bytes`), generation_config.json, tokenizer.json (BOS added by its
post-processor, as HF users expect), tokenizer_config.json with the chat format as Jinja, and
a README model card. One difference stays: in `transformers`, text that spells a special token
("<|user|>") becomes that token, as with every HF tokenizer (the chat template needs it);
lmstack never lets user text become a special token.

Import takes a local Llama-family checkpoint (Llama, SmolLM, Mistral/Qwen2-style shapes when
they match: no biases, SiLU MLP, plain RoPE) with a byte-level BPE tokenizer. The tokenizer
gains lmstack's 16 special tokens after its own vocabulary when it lacks them (their
embeddings start at the mean embedding; fine-tuning teaches them), so the chat template, SFT,
eval, chat and serve work unchanged. What does not match is named in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as HFTokenizer

from lmstack.chatformat import ChatFormatError, chat_format
from lmstack.config import ModelConfig
from lmstack.export import require_llama
from lmstack.modelio import (
    imported_model,
    lineage,
    load_model_and_tokenizer,
    save_imported,
    save_safetensors,
)
from lmstack.tokenizer import SPECIAL_TOKENS, OwnFormat, Tokenizer
from lmstack.utils import (
    UserError,
    atomic_output_dir,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    read_json,
)

MAX_SHARD_BYTES = 2 * 1024 ** 3


def _hf_config(cfg, tok) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_model // cfg.n_head,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        # transformers 5 reads RoPE from rope_parameters; 4.x from rope_theta: write both
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "initializer_range": cfg.init_std, "use_cache": True, "torch_dtype": "float32", **_token_ids(tok),
    }


def _token_ids(tok) -> dict:
    """BOS, PAD, and what ends generation: EOS, or the end of the assistant's turn (an imported
    model's own stop tokens, its end of turn first)."""
    fmt = chat_format(tok)
    stops = [fmt.end_id] + sorted(fmt.stop_ids - {fmt.end_id})
    if tok.own is None:
        stops = [tok.eos_id, fmt.end_id]
    elif tok.eos_id is not None and tok.eos_id not in stops:
        stops.append(tok.eos_id)
    return {"bos_token_id": tok.bos_id, "eos_token_id": stops, "pad_token_id": tok.pad_id}


def _special_tokens(tok) -> dict:
    """bos_token / eos_token / pad_token by name (those the model has)."""
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    return {k: tok.id_to_token(i) for k, i in names.items() if i is not None}


def _hf_tokenizer_files(tok, ctx: int) -> tuple[str, dict]:
    """(tokenizer.json text with a BOS post-processor when the model adds BOS, tokenizer_config.json)."""
    hf = HFTokenizer.from_str(tok.to_str())
    if tok.add_bos:
        bos = tok.id_to_token(tok.bos_id)
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tok.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens(tok), "model_max_length": ctx,
              "clean_up_tokenization_spaces": False, "chat_template": chat_format(tok).jinja}
    return hf.to_str(pretty=True), config


def _state_for_hf(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue  # tied: transformers ties it to model.embed_tokens.weight
        out[name if name.startswith("lm_head.") else "model." + name] = t.detach().to(torch.float32).contiguous()
    return out


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_safetensors(tensors, folder / "model.safetensors")
        return
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + n
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, folder / fname)
        weight_map.update({k: fname for k in shard})
    atomic_write_json(folder / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def export_hf(model_dir, out, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a folder `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` open."""
    model_dir = Path(model_dir)
    check_output_dir(out, force)
    model, tok = load_model_and_tokenizer(model_dir)
    cfg = model.cfg
    require_llama(cfg, "a Hugging Face Llama")
    tok_json, tok_config = _hf_tokenizer_files(tok, cfg.max_seq_len)
    with atomic_output_dir(out, force) as tmp:
        atomic_write_json(tmp / "config.json", _hf_config(cfg, tok))
        _write_weights(_state_for_hf(model), tmp, max_shard_bytes)
        atomic_write_json(tmp / "generation_config.json", {**_token_ids(tok), "max_length": cfg.max_seq_len})
        atomic_write_text(tmp / "tokenizer.json", tok_json)
        atomic_write_json(tmp / "tokenizer_config.json", tok_config)
        atomic_write_json(tmp / "special_tokens_map.json", _special_tokens(tok))
        atomic_write_text(tmp / "README.md", model_card(model_dir, model, tok))
    print(f"exported {model_dir} as a Hugging Face Llama -> {out} "
          f"(AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return Path(out)


def model_card(model_dir: Path, model, tok) -> str:
    """README.md with YAML front matter: how the model was trained and its eval results."""
    info = lineage(model_dir)
    run = read_json(model_dir / "run.json") or {}
    sft = read_json(model_dir / "sft.json")
    imported = info["imported"]  # the root's imported.json: this model or the one it was trained from
    datasets = ["lmstack synthetic world"] if info.get("world") else []
    base = (imported or {}).get("hub_id")  # the card's base_model must be a hub id, not a local path
    # An imported model keeps its licence (unknown: "other", and the card says to check the source).
    licence = ((imported or {}).get("license") or "other") if imported else "mit"
    front = ["---", f"license: {licence}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "  - lmstack", "  - llama"]
    if datasets:
        front += ["datasets:"] + [f"  - {d}" for d in datasets]
    if base:
        front.append(f"base_model: {json.dumps(str(base))}")
    front.append("---")
    cfg = model.cfg
    if imported:
        steps = "; then ".join(f"{s['stage']}" + (f" on {', '.join(s['data'])}" if s["data"] else "")
                               for s in reversed(info["steps"]))
        about = (f"`{imported.get('name') or imported.get('source')}` ({imported.get('model_type')}), imported "
                 f"into lmstack from `{imported.get('source')}`"
                 + (f", then trained with lmstack: {steps}" if steps else ", with its weights unchanged")
                 + ", and exported with `lmstack export hf`. Its licence is the source model's"
                 + ("" if imported.get("license") else " (not stated in the source: check it)") + ".")
    else:
        about = ("A Llama-shaped causal language model trained with lmstack (from scratch, on "
                 "PyTorch) and exported with `lmstack export hf`.")
    lines = front + ["", f"# {model_dir.resolve().name}", "", about, "",
                     "| | |", "| --- | --- |",
                     f"| parameters | {model.num_params():,} "
                     f"({model.num_params(include_embeddings=False):,} without embeddings) |",
                     f"| layers / width / heads (kv) | {cfg.n_layer} / {cfg.d_model} / {cfg.n_head} "
                     f"({cfg.n_kv_head}) |",
                     f"| context | {cfg.max_seq_len} tokens |", f"| vocabulary | {tok.vocab_size} (byte-level BPE) |"]
    train = run.get("train") or {}
    if sft:
        lines.append(f"| training | supervised fine-tuning of `{sft.get('base')}` on "
                     f"{', '.join(sft.get('data', []))} |")
    elif imported:
        lines.append(f"| origin | imported from `{imported.get('source')}` |")
    if tok.own is not None and tok.own.template is not None:
        lines.append("| chat format | the source model's own template and special tokens |")
    elif train:
        lines.append(f"| training | pretraining, {train.get('max_steps')} steps of "
                     f"{train.get('batch_tokens')} tokens |")
    if info.get("world"):
        lines.append(f"| data | the lmstack synthetic world (`{info['world']}`) |")
    metrics = _last_metrics(model_dir)
    if metrics.get("val_loss") is not None:
        lines.append(f"| validation loss | {metrics['val_loss']:.4f} nats/token"
                     + (f", {metrics['val_bpb']:.4f} bits/byte |" if metrics.get("val_bpb") else " |"))
    results = sorted((model_dir / "eval").glob("*.json")) if (model_dir / "eval").is_dir() else []
    res = read_json(results[-1]) if results else None
    if res and res.get("tasks"):
        lines += ["", "## Evaluation (`lmstack eval`)", "", "| task | score | 95% CI | chance |",
                  "| --- | --- | --- | --- |"]
        for name, t in res["tasks"].items():
            chance = f"{t['chance']:.1%}" if t.get("chance") is not None else "-"
            lines.append(f"| {name} ({t.get('metric', 'accuracy')}) | {t['acc']:.1%} | "
                         f"{t['ci'][0]:.1%} - {t['ci'][1]:.1%} | {chance} |")
        if res.get("lm"):
            lines.append(f"| bits per byte ({res['lm']['source']}) | {res['lm']['bpb']:.4f} | | |")
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
              'ids = tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True, '
              'return_tensors="pt")',
              "print(tok.decode(model.generate(ids, max_new_tokens=40)[0]))", "```", "",
              ("The chat format is the source model's own (tokenizer_config.json's chat_template); generation "
               f"ends at {', '.join(f'`{tok.id_to_token(i)}`' for i in sorted(chat_format(tok).stop_ids))}."
               if tok.own is not None and tok.own.template is not None else
               "The chat format: `<|bos|><|user|>...<|end|><|assistant|>...<|end|>`; generation ends at `<|end|>`."),
              ""]
    return "\n".join(lines)


def _last_metrics(model_dir: Path) -> dict:
    last = {}
    try:
        for line in open(model_dir / "metrics.jsonl"):
            rec = json.loads(line)
            if "val_loss" in rec:
                last = rec
    except (OSError, ValueError):
        pass
    return last


# --- import -----------------------------------------------------------------------------------

SUPPORTED = ("llama", "mistral", "qwen2")


def _check_config(c: dict, src: Path) -> None:
    """Name the first thing lmstack's model cannot represent."""
    def bad(msg):
        raise UserError(f"{src}: cannot import: {msg}")

    mt = c.get("model_type")
    if mt not in SUPPORTED:
        bad(f"model_type {mt!r} is not Llama-family (lmstack imports {', '.join(SUPPORTED)} shapes)")
    if c.get("hidden_act", "silu") != "silu":
        bad(f"hidden_act {c.get('hidden_act')!r}: lmstack's MLP is SwiGLU (silu)")
    if c.get("attention_bias") or mt == "qwen2":  # Qwen2 always has q/k/v biases
        bad("attention has biases (q/k/v_proj.bias): lmstack's attention has none")
    if c.get("mlp_bias"):
        bad("mlp_bias is true: lmstack's MLP has no biases")
    for key in ("rope_scaling", "rope_parameters"):  # transformers 4.x / 5.x names
        scaling = c.get(key) or {}
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in (None, "default"):
            bad(f"{key} {kind!r}: lmstack has plain RoPE")
    if c.get("sliding_window") and c.get("use_sliding_window", mt == "mistral"):
        if c["sliding_window"] < c.get("max_position_embeddings", 0):
            bad(f"sliding-window attention ({c['sliding_window']}): lmstack attends to the whole context")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads) or c["hidden_size"] % heads:
        bad(f"head_dim {c.get('head_dim')} != hidden_size / num_attention_heads")


def rope_theta(c: dict) -> float:
    """RoPE's base from an HF config (transformers 5: rope_parameters; 4.x: rope_theta)."""
    return float((c.get("rope_parameters") or {}).get("rope_theta") or c.get("rope_theta") or 10000.0)


def _read_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{src}: no model.safetensors (or index); only safetensors checkpoints are imported "
                        "(never pickles)")
    out = {}
    for f in files:
        try:
            out.update(load_file(src / f))
        except Exception as e:
            raise UserError(f"{src / f} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    return out


def _token_text(x) -> str | None:
    """A token as tokenizer_config.json names it: a string, or {"content": ...} (older files)."""
    if isinstance(x, dict):
        x = x.get("content")
    return x if isinstance(x, str) and x else None


def _source_license(src: Path) -> str | None:
    """The licence in the source's model card (README.md's YAML front matter), if it says one."""
    try:
        text = (src / "README.md").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        if line.startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


def _own_format(src: Path, hf_tok: HFTokenizer) -> OwnFormat:
    """The source's own chat format and special tokens, as transformers would use them: the chat
    template (tokenizer_config.json, chat_template.jinja or chat_template.json), BOS/EOS/PAD, whether
    a prompt starts with BOS (add_bos_token, or a post-processor that adds it), and the tokens that
    end a reply (EOS and generation_config.json's eos_token_id; those the template writes first)."""
    tc = read_json(src / "tokenizer_config.json") or {}
    tc = tc if isinstance(tc, dict) else {}
    template = tc.get("chat_template")
    if (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance((read_json(src / "chat_template.json") or {}), dict):
        template = (read_json(src / "chat_template.json") or {}).get("chat_template", template)
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    bos, eos, pad = (_token_text(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
    post = json.loads(hf_tok.to_str()).get("post_processor") or {}
    first = ((post.get("single") or [{}])[0] or {}).get("SpecialToken", {}).get("id") \
        if post.get("type") == "TemplateProcessing" else None
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = first is not None and first == bos
    if first is not None and bos is None:
        bos = first
    gen = read_json(src / "generation_config.json") or {}
    gen_eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
    stops = []
    for t in [eos] + [hf_tok.id_to_token(i) for i in gen_eos if isinstance(i, int)]:
        if t and t not in stops and hf_tok.token_to_id(t) is not None:
            stops.append(t)
    if isinstance(template, str):  # the end-of-turn token (the one the template writes) first
        stops.sort(key=lambda t: t not in template)
    return OwnFormat(template=template if isinstance(template, str) and template.strip() else None,
                     bos_token=bos if bos and hf_tok.token_to_id(bos) is not None else None,
                     eos_token=eos if eos and hf_tok.token_to_id(eos) is not None else None,
                     pad_token=pad if pad and hf_tok.token_to_id(pad) is not None else None,
                     add_bos=bool(add_bos), stop_tokens=stops, source=str(src.resolve()))


def import_hf(src, out, force: bool = False) -> Path:
    """A local Hugging Face Llama-family folder -> an lmstack model folder, keeping the model's own
    tokenizer, special tokens, BOS policy, stop tokens and chat template (chat_format.json). A
    model with no chat template gains lmstack's special tokens and chat format instead."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} is not a Hugging Face model folder (no config.json)")
    check_output_dir(out, force)
    c = read_json(src / "config.json")
    if not isinstance(c, dict):
        raise UserError(f"{src / 'config.json'} is not valid JSON")
    _check_config(c, src)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src}: no tokenizer.json (a fast, byte-level BPE tokenizer is needed)")
    hf_tok = HFTokenizer.from_file(str(src / "tokenizer.json"))
    tj = json.loads(hf_tok.to_str())
    if (tj.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(tj.get("decoder")):
        raise UserError(f"{src}: the tokenizer is not a byte-level BPE (SentencePiece tokenizers such as "
                        "Llama 2's are not supported)")
    own = _own_format(src, hf_tok)
    try:
        if own.template is not None:
            chat_format(Tokenizer.from_str(hf_tok.to_str(), own))  # compiles the template: fail now, not later
    except ChatFormatError as e:
        raise UserError(f"{src}: {e}") from None
    missing = [] if own.template is not None else [t for t in SPECIAL_TOKENS if hf_tok.token_to_id(t) is None]
    if missing:  # no chat format of its own: lmstack's, with its special tokens appended
        hf_tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    hf_tok.post_processor = None  # lmstack adds BOS itself, where the model's policy puts it
    tok = Tokenizer(HFTokenizer.from_str(hf_tok.to_str()), own)

    weights = _read_weights(src)
    vocab = max(c["vocab_size"], tok.vocab_size)
    cfg = ModelConfig(vocab_size=vocab, n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"],
                      n_kv_head=c.get("num_key_value_heads") or c["num_attention_heads"], d_model=c["hidden_size"],
                      ffn_hidden=c["intermediate_size"], max_seq_len=c.get("max_position_embeddings", 2048),
                      rope_theta=rope_theta(c), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)))
    state = {}
    for name, t in weights.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        key = name[len("model."):] if name.startswith("model.") else name
        state[key] = t.to(torch.float32)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    try:
        model = imported_model(cfg, state)  # lmstack's specials' rows too, when they were appended
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{src}: the weights do not match a {c['model_type']} of this config "
                        f"({str(e).splitlines()[0]})") from None
    name = c.get("_name_or_path") or ""
    hub_id = name if name.count("/") == 1 and not Path(name).exists() else None
    with atomic_output_dir(out, force) as tmp:
        save_imported(tmp, model, tok, {"source": str(src.resolve()), "model_type": c["model_type"], "hub_id": hub_id,
                                        "name": hub_id or src.resolve().name, "license": _source_license(src),
                                        "added_special_tokens": missing, "hf_vocab_size": c["vocab_size"]})
    how = (f"its own chat template, stops at {', '.join(own.stop_tokens) or 'nothing'}, "
           f"{'adds ' + own.bos_token if tok.add_bos else 'no BOS'}" if own.template is not None
           else f"no chat template of its own: lmstack's chat format, {len(missing)} lmstack special tokens added")
    print(f"imported {src} ({c['model_type']}, {model.num_params():,} params; {how}) -> {out}")
    return Path(out)
