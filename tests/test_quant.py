"""Weight-only int8 / int4 (lmstack/quant.py): the rounding is bounded, the layers compute what their
dequantised weights do, a quantized model decodes close to fp32, and it refuses to train or save."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from lmstack.chat import sample
from lmstack.config import ModelConfig
from lmstack.chatformat import chat_format, render_chat
from lmstack.engine import for_inference, generate, generate_batch
from lmstack.eval.lm import ModelLM
from lmstack.model import GPT
from lmstack.modelio import load_model, save_weights
from lmstack.serve.server import build
from lmstack.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantized_kind
from lmstack.utils import UserError

from tiny import LiveServer, fit_sequences, random_gpt, save_model_dir, tokenizer_on


needs_int4 = pytest.mark.skipif(not Int4Linear.available(), reason="torch < 2.6: no int4 CPU kernel")


def cfg(**kw) -> ModelConfig:
    # widths that int4's kernel takes (multiples of 32 in, 16 out); vocab 97 does not (its head falls back to int8)
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, ffn_hidden=128, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def test_int8_rounding_is_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different sizes
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() == 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_int4_rounding_is_half_a_step_per_group():  # the rounding is ours: no kernel needed
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    q, s, z = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape == (32, 4)
    deq = ((q.float().view(32, 4, 32) - 8) * s[..., None] + z[..., None]).view(32, 128)
    assert ((deq - w).abs().view(32, 4, 32) <= s[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8", pytest.param("int4", marks=needs_int4)])
def test_layers_compute_their_dequantised_weight(kind):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    x = torch.randn(2, 3, 128)
    if kind == "int8":
        q, s = quantize_int8(lin.weight)
        deq, layer = q.float() * s[:, None], Int8Linear(lin)
    else:
        q, s, z = quantize_int4(lin.weight, 32)
        deq = ((q.float().view(48, 4, 32) - 8) * s[..., None] + z[..., None]).view(48, 128)
        layer = Int4Linear(lin)
    y = layer(x.bfloat16())
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    ref = x @ deq.t()
    torch.testing.assert_close(y.float(), ref, atol=0.03 * ref.abs().max().item(), rtol=0)
    if kind == "int8":  # the GPU's formula, run here on the CPU: the same numbers as the CPU kernel
        torch.testing.assert_close(layer.dequantised_matmul(x.bfloat16()).float(), y.float(),
                                   atol=0.02 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind", ["int8", pytest.param("int4", marks=needs_int4)])
def test_a_quantized_model_decodes_close_to_fp32(kind):
    torch.manual_seed(0)
    ref = for_inference(GPT(cfg()), "fp32", pack=False)
    torch.manual_seed(0)
    m = for_inference(GPT(cfg()), kind)
    assert quantized_kind(m) == kind and quantized_kind(ref) is None
    layer = Int4Linear if kind == "int4" else Int8Linear
    assert not any(type(x) is torch.nn.Linear for x in m.modules())  # every product quantized
    assert sum(isinstance(x, layer) for x in m.layers[1].modules()) >= 3  # attention's and the MLP's (fused or not)
    assert isinstance(m.lm_head, Int8Linear)  # 97 rows: int4's kernel wants multiples of 16, so int8
    assert m.embed_tokens.weight.dtype == torch.bfloat16  # the lookup keeps a bf16 table
    assert m.num_params() == ref.num_params()
    x = torch.randint(0, 97, (2, 20))
    with torch.inference_mode():
        a, b = ref(x), m(x).float()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    outs = generate_batch(m, prompts, max_tokens=8, temperature=0)
    assert [len(c.ids) for c in outs] == [8, 8]
    # a padded batch row computes what it computes alone
    assert [c.ids for c in outs] == [generate_batch(m, [p], max_tokens=8, temperature=0)[0].ids for p in prompts]


def test_a_quantized_model_is_inference_only(tmp_path):
    m = for_inference(GPT(cfg()), "int8")
    with pytest.raises(UserError, match="inference only"):
        m.train()
    with pytest.raises(UserError, match="cannot be trained or saved"):
        save_weights(m, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    m.eval()  # still allowed


def test_unknown_dtype_names_the_choices():
    with pytest.raises(UserError, match="int8 | int4"):
        for_inference(GPT(cfg()), "int3")


def test_sample_and_eval_take_int8(tmp_path, capsys):
    tok = tokenizer_on(tmp_path, "the cat sat on the mat. " * 50, vocab_size=300)
    d = save_model_dir(tmp_path / "m", random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64,
                                                  max_seq_len=32), tok)
    texts = sample(str(d), "the cat", max_tokens=5, temperature=0, dtype="int8")
    assert len(texts) == 1 and texts[0].startswith("the cat")
    assert ModelLM.load(d, dtype="int8", device="cpu").dtype == "int8"
    assert ModelLM.load(d, dtype="fp32", device="cpu").dtype == "float32"


def test_the_server_batches_an_int8_model(tmp_path):
    """Several requests at once through the batcher (slot moves, padding) on an int8 model."""
    tok = tokenizer_on(tmp_path, "Ana was born in Paris. Hi there. " * 50, vocab_size=300)
    model = random_gpt(tok, n_layer=1, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    seqs = [render_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": "Ana was born in Paris."}])[0]
            for q in ("Hi", "Where was Ana born?")]
    d = save_model_dir(tmp_path / "m", fit_sequences(model, seqs, steps=100), tok)  # replies of a few words
    app = build(d, api_key=None, db_path=None, slots=3, dtype="int8", device="cpu", name="m")
    assert quantized_kind(app.state.server.batcher.model) == "int8"
    with LiveServer(app) as s, ThreadPoolExecutor(3) as pool:
        def ask(q):
            return httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
                "model": "m", "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0})
        replies = list(pool.map(ask, ["Hi", "Where was Ana born?", "Hi there, who is Ana?"]))
    assert [r.status_code for r in replies] == [200, 200, 200]
    # each batched reply is what the int8 engine says to that prompt alone
    alone = for_inference(load_model(d), "int8")
    for q, r in zip(["Hi", "Where was Ana born?", "Hi there, who is Ana?"], replies):
        ids = render_chat(tok, [{"role": "user", "content": q}], add_generation_prompt=True)[0]
        new = generate(alone, ids, max_tokens=6, temperature=0, stop_ids=chat_format(tok).stop_ids)
        text = r.json()["choices"][0]["message"]["content"]
        assert text and text == chat_format(tok).parse(new).text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int8_on_a_gpu_matches_the_cpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    cpu = Int8Linear(lin)
    gpu = Int8Linear(lin).cuda()
    torch.testing.assert_close(gpu(x.cuda()).cpu().float(), cpu(x).float(), atol=0.05, rtol=0.02)
    torch.manual_seed(0)
    m = for_inference(GPT(cfg()).cuda(), "int8")
    assert m.lm_head.packed.device.type == "cuda"
    assert len(generate_batch(m, [[1, 2, 3]], max_tokens=4, temperature=0)[0].ids) == 4
