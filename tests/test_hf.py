"""Hugging Face export/import: a random lmstack model exported and loaded in `transformers`
gives the same logits and greedy tokens; its tokenizer encodes identically and
apply_chat_template renders THE chat template identically; a random `transformers` Llama saved
locally, imported and exported again, round-trips; a foreign tokenizer gains lmstack's special
tokens; what cannot be imported is named in one line."""

import dataclasses
import json
import os
import stat

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.config import ModelConfig  # noqa: E402
from lmstack.engine import generate  # noqa: E402
from lmstack.export.hf import export_hf, import_hf, rope_theta  # noqa: E402
from lmstack.model import GPT  # noqa: E402
from lmstack.chatformat import render_chat  # noqa: E402
from lmstack.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from lmstack.modelio import lineage, load_model, save_weights  # noqa: E402
from lmstack.utils import UserError, atomic_write_json  # noqa: E402
from tiny import run_cli  # noqa: E402  (tests/ is on sys.path under pytest)

TEXT = ("Ana was born in Paris on 3 May 1990. Bo works at Acme in Rome; he's 41. "
        "Zoë lives in Łódź — naïve café! 12345 + 678 = 13023.\n\n  indented\tline\r\n") * 20
TRICKY = ["Hello world", "  leading and trailing  ", "tabs\tand\r\nnew\n\n\nlines", "1234567 + 89",
          "Zoë, Łódź, 東京, مرحبا, 🙂👍", "don't I'LL we've", "a...b!!!?? (x)", "e\u0301 combining", ""]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model_dir(d, tok, **kw):
    cfg = ModelConfig(**{**dict(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                ffn_hidden=64, max_seq_len=64), **kw})
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():  # larger weights than the init: logits far from uniform, greedy not degenerate
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(d)
    save_weights(model, d / "model.safetensors")
    atomic_write_json(d / "config.json", dataclasses.asdict(cfg))
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text(TEXT)
    return train_tokenizer([d / "a.txt"], vocab_size=400, out=d / "tok", progress=False)


@pytest.mark.parametrize("tie", [True, False])
def test_export_loads_in_transformers_with_the_same_logits_and_tokens(tmp_path, tok, tie):
    src = make_model_dir(tmp_path / "m", tok, tie_embeddings=tie, rope_theta=500.0)  # not the default
    export_hf(src, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = load_model(src)
    ids = [tok.bos_id] + tok.encode("Ana was born in Paris. Bo works")
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours(torch.tensor([ids])), rtol=1e-5, atol=1e-5)
    want = generate(ours, ids, 20, temperature=0.0)
    got = hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert got == want
    card = (tmp_path / "hf" / "README.md").read_text()
    front = card.split("---")[1]
    assert "license:" in front and "library_name: transformers" in front and "pipeline_tag: text-generation" in front


def test_tokenizer_and_chat_template_are_identical(tmp_path, tok):
    export_hf(make_model_dir(tmp_path / "m", tok), tmp_path / "hf")
    t = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert isinstance(t, transformers.PreTrainedTokenizerFast)
    for text in TRICKY:
        assert t(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
        assert t.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert t("hi")["input_ids"] == [tok.bos_id] + tok.encode("hi")  # BOS first, as lmstack's model expects
    convs = [
        [{"role": "user", "content": "Where was Ana born?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Zoë? 東京 🙂"},
         {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Bo?"}],
        [{"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]},
         {"role": "tool", "content": "5"}, {"role": "assistant", "content": "2 + 3 = 5."}],
        [{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 * 3"}'}}]}],
    ]
    for msgs in convs:
        for gen in (False, True):
            got = t.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=True)["input_ids"]
            assert list(got) == render_chat(tok, msgs, add_generation_prompt=gen)[0], (msgs, gen)


def test_sharded_export_loads(tmp_path, tok):
    export_hf(make_model_dir(tmp_path / "m", tok, tie_embeddings=False), tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours = load_model(tmp_path / "m")
    x = torch.tensor([[0, 5, 9, 33]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-5, atol=1e-5)


def random_hf_llama(path, vocab, tie, **kw):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rms_norm_eps=1e-5, **kw)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def test_transformers_llama_round_trips_through_import_and_export(tmp_path, tok):
    # A Llama with lmstack's tokenizer (e.g. one exported earlier): import, export: the same.
    export_hf(make_model_dir(tmp_path / "m", tok), tmp_path / "tokfiles")  # for its tokenizer files
    hf = random_hf_llama(tmp_path / "orig", tok.vocab_size, tie=False, rope_theta=50000.0)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "orig" / f).write_bytes((tmp_path / "tokfiles" / f).read_bytes())
    import_hf(tmp_path / "orig", tmp_path / "imported")
    export_hf(tmp_path / "imported", tmp_path / "again")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    a, b = hf.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    c0, c1 = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("orig", "again"))
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert c0[k] == c1[k], k
    assert rope_theta(c0) == rope_theta(c1) == 50000.0
    # lmstack's own model on the imported folder gives transformers' logits.
    ids = torch.tensor([[tok.bos_id] + tok.encode("Bo works at Acme in Rome")])
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "imported")(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_weights_files_are_normal_files(tmp_path, tok):
    """Written, exported and imported weights follow the umask like every other file (safetensors'
    own writer makes them 0600: unreadable to the group that shares a runs folder)."""
    old = os.umask(0o022)
    try:
        src = make_model_dir(tmp_path / "m", tok)  # modelio.save_weights
        export_hf(src, tmp_path / "hf")
        import_hf(tmp_path / "hf", tmp_path / "imported")
    finally:
        os.umask(old)
    for d in (src, tmp_path / "hf", tmp_path / "imported"):
        assert stat.S_IMODE((d / "model.safetensors").stat().st_mode) == 0o644, d


def test_a_malformed_stage_record_is_one_line(tmp_path, tok):
    """lineage (the model card's, the win rate's) follows sft.json / stage.json to the base model:
    one that is not what lmstack writes is named in one line, not a traceback."""
    src = make_model_dir(tmp_path / "m", tok)
    for name, rec, why in [("sft.json", ["a"], "not a JSON object"), ("sft.json", {"base": 5}, '"base"'),
                           ("sft.json", {"base": "b", "data": "w/sft.jsonl"}, '"data"'),
                           ("stage.json", ["a"], "not a JSON object"), ("stage.json", {"base": ["b"]}, '"base"')]:
        (src / name).write_text(json.dumps(rec))
        with pytest.raises(UserError, match=f"{name} is malformed: .*{why}"):
            lineage(src)
        with pytest.raises(UserError, match=f"{name} is malformed"):
            export_hf(src, tmp_path / "hf")
        (src / name).unlink()
    assert not (tmp_path / "hf").exists()
    (src / "sft.json").write_text(json.dumps({"data": [str(tmp_path / "w" / "sft.jsonl")]}))  # no base: stops there
    assert lineage(src) == {"chat": True, "data": None, "world": None, "imported": None,
                            "steps": [{"stage": "sft", "data": [str(tmp_path / "w" / "sft.jsonl")], "base": None}]}


@pytest.mark.slow
def test_import_of_a_foreign_tokenizer_adds_lmstack_specials(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = HFTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=350, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "smol"
    hf = random_hf_llama(src, raw.get_vocab_size(), tie=True)
    raw.save(str(src / "tokenizer.json"))
    import_hf(src, tmp_path / "imported")
    tok = Tokenizer.load(tmp_path / "imported")
    V = raw.get_vocab_size()
    assert tok.vocab_size == V + 16 and min(tok.special_ids.values()) == V
    info = json.loads((tmp_path / "imported" / "imported.json").read_text())
    assert len(info["added_special_tokens"]) == 16
    model = load_model(tmp_path / "imported")
    ids = tok.encode("Ana was born in Paris.")
    assert ids == raw.encode("Ana was born in Paris.").ids  # the original tokenizer, untouched
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids]))[..., :V], hf(torch.tensor([ids])).logits,
                                   rtol=1e-5, atol=1e-5)
    # The chat template works on it, and lmstack sft trains it.
    render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Where was Ana born? {i}"},
                                                     {"role": "assistant", "content": "Paris."}]}) + "\n"
                            for i in range(40)))
    proc = run_cli("sft", "--model", str(tmp_path / "imported"), "--data",
                           str(rows), "--out", str(tmp_path / "sft"), "--set", "train.max_steps=2",
                           "--set", "train.batch_tokens=256", "--set", "train.micro_batch_size=4",
                           "--set", "train.seq_len=32", "--set", "train.eval_every=0", "--set", "train.dtype=fp32",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "sft" / "model.safetensors").is_file()


@pytest.mark.slow
def test_what_cannot_be_imported_is_named(tmp_path, tok):
    export_hf(make_model_dir(tmp_path / "m", tok), tmp_path / "tokfiles")
    cases = [({"model_type": "qwen2"}, "biases"), ({"model_type": "gpt2"}, "not Llama-family"),
             ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
             ({"hidden_act": "gelu"}, "hidden_act"), ({"mlp_bias": True}, "mlp_bias")]
    base = json.loads((tmp_path / "tokfiles" / "config.json").read_text())
    for i, (change, msg) in enumerate(cases):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        for f in ("tokenizer.json", "model.safetensors"):
            (d / f).write_bytes((tmp_path / "tokfiles" / f).read_bytes())
        (d / "config.json").write_text(json.dumps({**base, **change}))
        with pytest.raises(UserError, match=msg):
            import_hf(d, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    # A pickle-only checkpoint is refused (never unpickled); so is a missing folder, via the CLI.
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(base))
    (d / "tokenizer.json").write_bytes((tmp_path / "tokfiles" / "tokenizer.json").read_bytes())
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(UserError, match="safetensors"):
        import_hf(d, tmp_path / "outp")
    for args in (["import", "hf", "--from", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                 ["export", "hf", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]):
        proc = run_cli(*args)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
