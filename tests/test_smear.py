"""Smeared keys (model.smear_keys): the mix reads only the key of a position the token may see
(packed documents and left padding never leak into it), every cached path (chunks, per-row
decoding, prefix caching) computes the full forward's function, the two-file runner runs such a
model as the engine does, and the Llama-only formats refuse it with one clear line."""

import numpy as np
import pytest
import torch

from lmstack.export.gguf import export_gguf
from lmstack.export.hf import export_hf
from lmstack.export.twofile import RUN_PY, export_twofile
from lmstack.model import doc_causal_mask
from lmstack.serve.prefix_cache import PrefixCache
from lmstack.utils import UserError
from tiny import random_gpt, save_model_dir, tokenizer_on

pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer_on(tmp_path_factory.mktemp("tok"), "Ana was born in Paris and Bo works at Acme in Rome. " * 40)


def smeared(tok, seed=0):
    return random_gpt(tok, seed=seed, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64,
                      smear_keys=True).eval()


def test_the_gates_start_spread_and_the_mix_changes_the_function(tok):
    m = smeared(tok)
    g = torch.sigmoid(m.layers[0].self_attn.smear)
    assert g.min() < 0.05 and g.max() > 0.95  # one head keyed by its own token, one by the previous one
    x = torch.randint(3, tok.vocab_size, (1, 12))
    with torch.no_grad():
        a = m(x)
        for layer in m.layers:
            layer.self_attn.smear.fill_(-30.0)  # no mix: a plain model with the same weights
        b = m(x)
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a[:, 0], b[:, 0])  # position 0 has no previous key to mix in


def test_packed_documents_and_left_padding_do_not_leak_into_the_mix(tok):
    m = smeared(tok)
    a, b = torch.randint(3, tok.vocab_size, (1, 7)), torch.randint(3, tok.vocab_size, (1, 9))
    with torch.no_grad():
        alone = m(b)
        packed = m(torch.cat([a, b], 1), attn_mask=doc_causal_mask(torch.tensor([[0] * 7 + [1] * 9])))
        torch.testing.assert_close(packed[:, 7:], alone, rtol=1e-5, atol=1e-5)
        # Left padding, then the cache: a prefill behind 4 pad positions and one decoded token.
        pad = torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)
        seen = torch.arange(13) >= 4
        mask = (torch.ones(13, 13, dtype=torch.bool).tril() & seen)[None, None]
        mask[..., ~seen, :] = torch.eye(13, dtype=torch.bool)[~seen][None, None]  # pads see themselves only
        m.setup_cache(1, 20)
        prefill = m(pad, start_pos=0, attn_mask=mask)
        nxt = torch.randint(3, tok.vocab_size, (1, 1))
        step = m(nxt, start_pos=13, attn_mask=torch.cat([seen, torch.tensor([True])])[None, None, None])
        m.clear_cache()
        torch.testing.assert_close(prefill[:, 4:], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[:, 0], m(torch.cat([b, nxt], 1))[:, -1], rtol=1e-5, atol=1e-5)


def test_a_prefix_cache_hit_restores_the_raw_keys_the_next_token_reads(tok):
    m = smeared(tok)
    m.setup_cache(2, 64)
    prompt = torch.randint(3, tok.vocab_size, (1, 13)).tolist()[0]
    cache = PrefixCache(max_bytes=1 << 20, block=4)
    with torch.no_grad():
        m(torch.tensor([prompt]), start_pos=0, slot=0)
        cache.store(m, prompt, 0)
        assert cache.load(m, prompt, 1) == 12  # three blocks, then the last token is prefilled
        got = m(torch.tensor([prompt[12:]]), start_pos=12, slot=1)
    torch.testing.assert_close(got[:, -1], m(torch.tensor([prompt]))[:, -1], rtol=1e-5, atol=1e-5)


def test_run_py_runs_smeared_keys_and_the_llama_formats_refuse_them(tok, tmp_path):
    import importlib.util
    m = smeared(tok, seed=1)
    d = save_model_dir(tmp_path / "m", m, tok)
    with pytest.raises(UserError, match="smeared keys"):
        export_hf(d, tmp_path / "hf")
    with pytest.raises(UserError, match="smeared keys"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
    out = export_twofile(d, tmp_path / "two")
    spec = importlib.util.spec_from_file_location("run_py", RUN_PY)
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    model, _ = run_py.load(str(out / "model.safetensors"))
    ids = torch.randint(3, tok.vocab_size, (20,)).tolist()
    # a prompt, a longer one that extends it (a chunk at position 8), then one token at a time
    got = [model.prefill(ids[:8]), model.prefill(ids[:14])] + [model.decode(t) for t in ids[14:]]
    with torch.no_grad():
        want = m(torch.tensor([ids]))[0, [7, *range(13, 20)]]
    torch.testing.assert_close(torch.from_numpy(np.stack(got)).float(), want, rtol=1e-4, atol=1e-4)


def test_a_plain_model_has_no_smear_and_caches_keys_and_values_only(tok):
    m = random_gpt(tok, seed=0, n_layer=2, n_head=4, d_model=32, max_seq_len=64)
    assert not any("smear" in k for k in m.state_dict())
    m.setup_cache(1, 8)
    assert [len(layer.self_attn.caches()) for layer in m.layers] == [2, 2]
    m.clear_cache()
    assert [len(layer.self_attn.caches()) for layer in m.layers] == [0, 0]
