"""The model: shapes, parameter counts, KV-cache decoding == full forward, GQA, the engine,
and the config schema (presets, --set, type and value errors)."""

import pytest
import torch

from lmstack.config import ModelConfig, available_presets, load_config
from lmstack.engine import generate, sample_logits
from lmstack.model import GPT
from lmstack.utils import UserError

pytestmark = pytest.mark.usefixtures("two_threads")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_forward_shapes_and_weight_names():
    model = GPT(tiny())
    logits = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97)
    names = set(model.state_dict())
    # Hugging Face Llama names minus the "model." prefix: export is a pure rename.
    for n in ["embed_tokens.weight", "norm.weight", "lm_head.weight",
              "layers.1.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight",
              "layers.1.self_attn.v_proj.weight", "layers.1.self_attn.o_proj.weight",
              "layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight",
              "layers.1.mlp.down_proj.weight", "layers.1.input_layernorm.weight",
              "layers.1.post_attention_layernorm.weight"]:
        assert n in names
    assert not any("bias" in n or "rope" in n for n in names)


@pytest.mark.parametrize("tie", [True, False])
def test_param_counts(tie):
    c = tiny(tie_embeddings=tie)
    model = GPT(c)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    # Counted by hand: a layer is q 32x32 + k, v 32x16 each + o 32x32 + SwiGLU 3x32x64 + two norms
    # of 32 = 9,280; two layers and the final norm: 18,592; the embedding 97 x 32 = 3,104.
    assert model.num_params(include_embeddings=False) == 18_592
    assert model.num_params() == (21_696 if tie else 24_800)
    # FLOPs per token: 6 x (18,592 + the head's 3,104, tied or not) + attention 12 x 2 layers x 32 x 64
    assert model.flops_per_token(64) == 6 * 21_696 + 49_152 == 179_328


def test_defaults_resolve():
    c = ModelConfig(vocab_size=10, d_model=256, n_head=4)
    GPT(c)
    assert c.n_kv_head == 4 and c.ffn_hidden == 704  # 8/3 * 256 = 682.7 -> 704


def test_scaled_residual_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=128, ffn_hidden=256))
    std_q = model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(std_q - 0.02) < 0.002 and abs(std_o - 0.02 / 4) < 0.001


@pytest.mark.parametrize("n_kv_head,smear", [(4, False), (2, False), (1, False), (2, True), (1, True)])
def test_kv_cache_matches_full_forward(n_kv_head, smear):
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=n_kv_head, smear_keys=smear)).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(idx)
        model.setup_cache(batch_size=2, max_len=32)
        # prefill 7 tokens, then one at a time, then a chunk of 5 at a nonzero position
        parts = [model(idx[:, :7], start_pos=0)]
        for p in range(7, 15):
            parts.append(model(idx[:, p:p + 1], start_pos=p))
        parts.append(model(idx[:, 15:20], start_pos=15))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_head,smear", [(4, False), (2, False), (2, True)])
def test_per_row_positions_and_slots_match_full_forward(n_kv_head, smear):
    """Continuous batching: rows prefilled alone into their own cache slots at different times,
    then decoded together each at its own position, give each sequence's full-forward logits;
    moving a row to another slot keeps it intact."""
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=n_kv_head, smear_keys=smear)).eval()
    seqs = [torch.randint(0, 97, (1, n)) for n in (12, 5, 9)]
    with torch.no_grad():
        full = [model(s)[0] for s in seqs]
        model.setup_cache(batch_size=3, max_len=32)
        lens = [7, 2, 4]  # prompt lengths: the rest is decoded
        got = [[model(s[:, :n], start_pos=0, slot=i)[0]] for i, (s, n) in enumerate(zip(seqs, lens))]
        pos = list(lens)
        rows = [0, 1, 2]  # which sequence sits in each slot
        while rows:
            p = torch.tensor([pos[r] for r in rows])
            mask = (torch.arange(int(p.max()) + 1)[None, :] <= p[:, None])[:, None, None, :]  # keys up to the furthest row
            tok = torch.stack([seqs[r][0, pos[r]] for r in rows])[:, None]
            logits = model(tok, start_pos=p, attn_mask=mask)
            for b, r in enumerate(rows):
                got[r].append(logits[b])
                pos[r] += 1
            done = [b for b, r in enumerate(rows) if pos[r] == seqs[r].shape[1]]
            for b in reversed(done):  # finished: the last live row takes its slot
                last = len(rows) - 1
                if b != last:
                    model.move_cache_row(last, b)
                    rows[b] = rows[last]
                rows.pop()
        model.clear_cache()
    for f, g in zip(full, got):
        torch.testing.assert_close(torch.cat(g), f, rtol=1e-5, atol=1e-5)


def test_gqa_is_real_grouping():
    # n_kv_head=1 (multi-query) has fewer k/v weights and still trains a step.
    model = GPT(tiny(n_kv_head=1))
    assert model.layers[0].self_attn.k_proj.weight.shape == (8, 32)  # 1 head x head_dim 8
    loss = model(torch.randint(0, 97, (2, 9))).logsumexp(-1).mean()
    loss.backward()
    assert model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0


def test_cache_misuse_and_too_long():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="setup_cache"):
        model(torch.zeros(1, 3, dtype=torch.long), start_pos=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_greedy_with_cache_equals_without():
    torch.manual_seed(1)
    model = GPT(tiny())
    prompt = [1, 5, 9, 13]
    a = generate(model, prompt, max_tokens=30, temperature=0)
    b = generate(model, prompt, max_tokens=30, temperature=0, use_cache=False)
    assert a == b and len(a) == 30
    # context limit: never runs past max_seq_len
    assert len(generate(model, prompt, max_tokens=500, temperature=0)) == 64 - len(prompt)


def test_sampling_seed_stop_topk_topp():
    torch.manual_seed(2)
    model = GPT(tiny())
    s1 = generate(model, [1, 2], max_tokens=20, temperature=1.0, seed=7)
    s2 = generate(model, [1, 2], max_tokens=20, temperature=1.0, seed=7)
    assert s1 == s2
    stop = s1[3]
    s3 = generate(model, [1, 2], max_tokens=20, temperature=1.0, seed=7, stop_ids={stop})
    assert s3 == s1[:s1.index(stop) + 1]
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_logits(logits, 1.0, top_k=1, generator=g)) for _ in range(20)} == {3}
    # p = [.03, .09, .24, .64]: top_p=0.5 keeps token 3 alone, top_p=0.85 keeps {2, 3}
    assert {int(sample_logits(logits, 1.0, top_p=0.5, generator=g)) for _ in range(20)} == {3}
    assert {int(sample_logits(logits, 1.0, top_p=0.85, generator=g)) for _ in range(200)} == {2, 3}


# --- config -----------------------------------------------------------------------------

def test_presets_load_and_overrides():
    assert {"tiny", "small", "gpt2"} <= set(available_presets())
    for name in ["tiny", "small", "gpt2"]:
        cfg = load_config(name, [], vocab_size=4096)
        assert cfg.model.vocab_size == 4096
        assert load_config(name, []).model.vocab_size == 0  # filled from the data later
    with pytest.raises(UserError, match="vocab_size"):
        GPT(load_config("tiny", []).model)
    assert load_config("tiny", ["model.vocab_size=5000"], vocab_size=4096).model.vocab_size == 5000
    cfg = load_config("tiny", ["optim.lr=1e-4", "model.tie_embeddings=false", "train.dtype=bf16",
                               "model.n_layer=3", "train.batch_tokens=4096"], vocab_size=100)
    assert cfg.optim.lr == 1e-4 and cfg.model.tie_embeddings is False and cfg.train.dtype == "bf16"
    assert cfg.model.n_layer == 3 and cfg.train.batch_tokens == 4096
    d = cfg.to_dict()
    assert d["model"]["n_kv_head"] == 2 and d["model"]["ffn_hidden"] > 0  # resolved


@pytest.mark.parametrize("overrides, needle", [
    (["model.n_layers=3"], "model.n_layers"),
    (["nosection.x=1"], "nosection.x"),
    (["model.n_layer=three"], "model.n_layer must be int"),
    (["optim.lr=fast"], "optim.lr must be float"),
    (["train.compile=maybe"], "train.compile must be bool"),
    (["optim.schedule=linear"], "optim.schedule must be one of"),
    (["model.n_head=3"], "model.d_model"),
    (["train.seq_len=1024"], "train.seq_len"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["train.batch_tokens=1000"], "train.batch_tokens"),
    (["model.n_layer"], "KEY=VALUE"),
    (["data.copy_text_share=1.5"], "data.copy_text_share"),
    (["data.copy_text_share=0.5"], "set data.copy_fraction too"),
    (["data.copy_steps=100"], "set data.copy_fraction too"),
    (["data.copy_fraction=0.5", "data.copy_steps=-1"], "data.copy_steps must be >= 0"),
    (["data.copy_fraction=0.5", "data.copy_fraction_after=0.1"], "set that too"),
    (["data.copy_fraction=0.5", "data.copy_steps=9", "data.copy_fraction_after=1"], "data.copy_fraction_after"),
    (["model.smear_keys=sometimes"], "model.smear_keys must be bool"),
])
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config("tiny", overrides, vocab_size=100)


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        load_config("huge", [], vocab_size=10)
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nn_layer = "two"\n')
    with pytest.raises(UserError, match="model.n_layer must be int"):
        load_config(str(bad), [], vocab_size=10)
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_config(str(bad), [], vocab_size=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_written_out_formula_bit_for_bit(dtype):
    """RMSNorm through F.rms_norm equals HF Llama's fp32 normalise, cast back, then scale."""
    from lmstack.model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, 1e-5).to(dtype)
    norm.weight.data = torch.randn(48).to(dtype)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    xf = x.float()
    want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x)
    assert torch.equal(norm(x), want)
