"""The engine: KV-cache decoding == full recompute, batched == unbatched (left padding),
seeds, top-k, stop ids and stop strings, max tokens, streaming text (UTF-8 split across
tokens), log-probs, the context policy, bf16; and the calculator / tool registry."""

from types import SimpleNamespace

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.engine import (ContextLengthError, PackedLinear, _full_mask, decode_one_token, decode_one_token_static,
                            fit_prompt, for_inference, generate, generate_batch, prefill, stream)
from lmstack.model import GPT, apply_rope, rope, rope_table, signed_sin
from lmstack.tokenizer import train_tokenizer
from lmstack.tools import ToolRegistry, default_registry
from lmstack.tools.calculator import calculator
from lmstack.utils import UserError



pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny()).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "a.txt").write_text("The calculator says 23 + 58 = 81. What is 2 + 3? It is 5. hello world, stop here.\n" * 50)
    return train_tokenizer([d / "a.txt"], vocab_size=300, out=d / "tok", progress=False)


class ScriptedModel(torch.nn.Module):
    """Stands in for GPT: whatever it is fed, its logits put all the mass on the token that
    `next_token(context_ids)` names. Tracks each row's context through prefill and decode."""

    def __init__(self, vocab_size: int, next_token, max_seq_len: int = 256):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.next_token = next_token
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # device / dtype, like a real model
        self.rows = None

    def num_params(self, include_embeddings: bool = True) -> int:  # what a chat banner counts
        return 0

    def setup_cache(self, batch_size, max_len=None, dtype=None):
        self.rows = [[] for _ in range(batch_size)]

    def clear_cache(self):
        self.rows = None

    def forward(self, idx, start_pos=None, attn_mask=None, last_only=False):  # all positions: allowed
        B, T = idx.shape
        if start_pos is None:  # no cache: the whole context is here
            self.rows = [[] for _ in range(B)]
        logits = torch.full((B, T, self.cfg.vocab_size), -30.0)
        for b, ids in enumerate(idx.tolist()):
            self.rows[b] += ids
            logits[b, -1, self.next_token(self.rows[b])] = 30.0
        return logits

    @staticmethod
    def script(ids, prompt_len):
        """next_token for a fixed reply `ids` after a prompt of `prompt_len` tokens (then repeats the last)."""
        return lambda ctx: ids[min(len(ctx) - prompt_len, len(ids) - 1)]


# --- KV cache, batching, sampling ---------------------------------------------------------------

def test_greedy_with_cache_equals_full_recompute(model):
    prompts = [[1, 5, 9, 13], [2, 3], [7, 8, 9, 10, 11, 12, 4]]
    a = generate_batch(model, prompts, max_tokens=25, temperature=0)
    b = generate_batch(model, prompts, max_tokens=25, temperature=0, use_cache=False)
    assert [c.ids for c in a] == [c.ids for c in b]
    assert all(len(c.ids) == 25 and c.finish_reason == "length" for c in a)


def test_batched_equals_unbatched(model):
    prompts = [[1, 5, 9, 13, 2, 2, 8], [2, 3], [7, 8, 9, 10]]
    batched = generate_batch(model, prompts, max_tokens=20, temperature=0, logprobs=True)
    for p, c in zip(prompts, batched):
        alone = generate_batch(model, [p], max_tokens=20, temperature=0, logprobs=True)[0]
        assert c.ids == alone.ids
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
    # the logits themselves: a left-padded prefill gives each row its unpadded logits
    L = max(map(len, prompts))
    idx = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    key_ok = torch.arange(L)[None, :] >= torch.tensor([L - len(p) for p in prompts])[:, None]
    with torch.inference_mode():
        model.setup_cache(3, L)
        padded = prefill(model, idx, _full_mask(key_ok, L))
        for i, p in enumerate(prompts):
            model.setup_cache(1, len(p))
            torch.testing.assert_close(padded[i], prefill(model, torch.tensor([p]))[0], atol=1e-5, rtol=1e-5)
    model.clear_cache()


def test_seeds_top_k_and_rows_independent_of_batch(model):
    kw = dict(max_tokens=20, temperature=1.0)
    s1 = generate_batch(model, [[1, 2]], seed=7, **kw)[0].ids
    assert s1 == generate_batch(model, [[1, 2]], seed=7, **kw)[0].ids
    assert s1 != generate_batch(model, [[1, 2]], seed=8, **kw)[0].ids
    # row i draws from seed + i: the same sample batched (with a longer neighbour) or alone
    both = generate_batch(model, [[3, 4, 5, 6], [1, 2]], seed=6, **kw)
    assert both[1].ids == s1
    greedy = generate_batch(model, [[1, 2]], max_tokens=20, temperature=0)[0].ids
    assert generate_batch(model, [[1, 2]], top_k=1, seed=3, **kw)[0].ids == greedy
    assert generate_batch(model, [[1, 2]], top_k=5, top_p=0.5, seed=3, **kw)[0].ids  # runs


def test_stop_ids_max_tokens_rows_finish_independently(model):
    prompts = [[1, 5, 9], [2, 3, 4, 4]]
    free = generate_batch(model, prompts, max_tokens=30, temperature=0)
    stop = free[0].ids[5]
    first = free[0].ids.index(stop)
    out = generate_batch(model, prompts, max_tokens=[30, 12], temperature=0, stop_ids={stop})
    assert out[0].ids == free[0].ids[:first] and out[0].finish_reason == "stop" and out[0].stop == stop
    assert stop not in out[0].ids
    want = free[1].ids[:12]
    if stop in want:
        want = want[:want.index(stop)]
    assert out[1].ids == want
    # a finished row yields nothing more
    seen = {0: 0, 1: 0}
    for deltas in stream(model, prompts, max_tokens=[30, 3], temperature=0, stop_ids={stop}):
        for d in deltas:
            seen[d.row] += 1
            assert seen[d.row] <= (first + 1 if d.row == 0 else 3)
    # legacy generate(): the stop id that ended it is included
    assert generate(model, [1, 5, 9], max_tokens=30, temperature=0, stop_ids={stop}) == free[0].ids[:first + 1]


def test_logprobs_are_the_models_log_softmax(model):
    prompt = [4, 8, 15, 16]
    c = generate_batch(model, [prompt], max_tokens=6, temperature=0.8, seed=1, logprobs=True, top_logprobs=3)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + c.ids])), -1)[0]
    want = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.ids)]
    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4, rtol=0)
    assert len(c.top_logprobs) == 6 and all(len(t) == 3 for t in c.top_logprobs)
    assert c.top_logprobs[0][0][1] == pytest.approx(logp[len(prompt) - 1].max().item(), abs=1e-4)


def test_context_policy(model):
    long = list(range(1, 70))  # context is 64
    with pytest.raises(ContextLengthError, match="prompt is 69 tokens; the model's context is 64"):
        generate_batch(model, [long], max_tokens=5)
    assert isinstance(ContextLengthError("x"), UserError)
    # truncate="left": BOS (the first token) + the most recent tokens, room for max_tokens
    kept = fit_prompt(long, 64, 10, "left")
    assert len(kept) == 54 and kept[0] == 1 and kept[1:] == long[-53:]
    assert len(fit_prompt(long, 64, 60, "left")) == 32  # never less than half the context
    c = generate_batch(model, [long], max_tokens=10, temperature=0, truncate="left")[0]
    assert c.ids == generate_batch(model, [kept], max_tokens=10, temperature=0)[0].ids
    assert c.prompt_tokens == 54 and len(c.ids) == 10
    # a prompt that fits but leaves little room: generation stops at the context's end
    c = generate_batch(model, [list(range(1, 60))], max_tokens=50, temperature=0)[0]
    assert len(c.ids) == 5 and c.finish_reason == "length"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_batch(model, [[1, 500]], max_tokens=3)


def test_bf16_weights_and_cache():
    torch.manual_seed(0)
    m = for_inference(GPT(tiny()), "bf16", pack=False)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    it = stream(m, [[1, 2, 3]], max_tokens=8, temperature=0)
    next(it)
    assert m.layers[0].self_attn.cache_k.dtype == torch.bfloat16
    it.close()  # closing the stream frees the cache
    assert m.layers[0].self_attn.cache_k is None
    assert len(generate(m, [1, 2, 3], max_tokens=8, temperature=0)) == 8


@pytest.mark.parametrize("dtype,smear", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_packed_linears_give_the_same_tokens(dtype, smear):
    """Also: a batch of prompts (left-padded) gives each prompt's own tokens; with smeared keys
    too, whose first real token must not read a padding key."""
    if not PackedLinear.supported("cpu", {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]):
        pytest.skip("no oneDNN (or no native bf16) on this CPU")
    torch.manual_seed(0)
    plain = for_inference(GPT(tiny(smear_keys=smear)), dtype, pack=False, fuse=False)
    torch.manual_seed(0)
    packed = for_inference(GPT(tiny(smear_keys=smear)), dtype)  # packed and fused (q/k/v and gate/up in one matrix each)
    assert isinstance(packed.layers[0].mlp.gate_up_proj, PackedLinear) and isinstance(packed.lm_head, PackedLinear)
    assert isinstance(packed.layers[0].self_attn.qkv_proj, PackedLinear)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    a = generate_batch(plain, prompts, max_tokens=12, temperature=0, logprobs=True)
    b = generate_batch(packed, prompts, max_tokens=12, temperature=0, logprobs=True)
    assert [c.ids for c in a] == [c.ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]), torch.tensor([c.logprobs for c in b]),
                               atol=0.02 if dtype == "bf16" else 1e-4, rtol=0)
    assert [c.ids for c in b] == [generate_batch(packed, [p], max_tokens=12, temperature=0)[0].ids for p in prompts]


# --- the decode step's fast paths: each the same function as the plain one ------------------------

def test_rope_roll_is_rotate_half_bit_for_bit():
    cos, sin = rope_table(16, 9, 10000.0)
    x = torch.randn(2, 3, 9, 16)
    x1, x2 = x.chunk(2, dim=-1)
    assert torch.equal(rope(x, cos, signed_sin(sin)), x * cos + torch.cat([-x2, x1], dim=-1) * sin)
    assert torch.equal(apply_rope(x, cos, sin), rope(x, cos, signed_sin(sin)))


@pytest.mark.parametrize("dtype,smear", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_fused_model_computes_the_same_logits(dtype, smear):
    """q/k/v and gate/up fused (for_inference's default): the same logits in every path: training
    (no cache), prefill + decode at an int position, per-row positions in cache slots 1..2."""
    torch.manual_seed(0)
    plain = for_inference(GPT(tiny(smear_keys=smear)), dtype, pack=False, fuse=False)
    torch.manual_seed(0)
    fused = for_inference(GPT(tiny(smear_keys=smear)), dtype, pack=False)
    assert fused.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.layers[0].mlp, "up_proj")
    tol = dict(atol=0.05, rtol=0.02) if dtype == "bf16" else dict(atol=1e-5, rtol=1e-5)
    x = torch.randint(0, 97, (3, 10))
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), **tol)
        for m in (plain, fused):
            m.setup_cache(3, 16)
        want = [plain(x, start_pos=0)[:, -1], plain(x[:, :1], start_pos=10)[:, -1]]
        got = [fused(x, start_pos=0, last_only=True)[:, -1], fused(x[:, :1], start_pos=10)[:, -1]]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
        for m in (plain, fused):  # rows 1..2 of the cache, each at its own position
            m.setup_cache(3, 16)
            m(x[:2, :6], start_pos=0, slot=1)
        pos, mask = torch.tensor([6, 6]), torch.ones(2, 1, 1, 7, dtype=torch.bool)
        a = fused(x[:2, 6:7], start_pos=pos, attn_mask=mask, slot=1)
        torch.testing.assert_close(a, plain(x[:2, 6:7], start_pos=pos, attn_mask=mask, slot=1), **tol)
        torch.testing.assert_close(a[:, -1], plain(x[:2, :7])[:, -1], **tol)  # == no cache at all


def test_for_inference_twice_is_harmless():
    torch.manual_seed(0)
    m = for_inference(GPT(tiny()), "fp32", fuse=False)
    want = generate(m, [1, 2, 3], max_tokens=6, temperature=0)
    assert generate(for_inference(for_inference(m, "fp32"), "fp32"), [1, 2, 3], max_tokens=6, temperature=0) == want


def test_last_only_is_the_last_position_of_all():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        last = m(x, last_only=True)  # one row through the head instead of seven: rounding may differ
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, m(x)[:, -1:], atol=1e-6, rtol=1e-5)


def test_bf16_decode_step_equals_the_full_recompute():
    """A decode step in bf16 (its single-query attention in fp32 on a CPU) gives the logits of
    running the whole sequence again, within bf16 rounding."""
    torch.manual_seed(0)
    m = for_inference(GPT(tiny()), "bf16")
    x = torch.randint(0, 97, (1, 12))
    with torch.inference_mode():
        m.setup_cache(1, 12)
        prefill(m, x[:, :11])
        step = decode_one_token(m, x[:, 11], 11)
        full = m(x)[:, -1]
    torch.testing.assert_close(step.float(), full.float(), atol=0.05, rtol=0.02)


def _static_steps(model, step_fn, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decode through `decode_one_token_static` (or a compiled copy): the positions as a
    tensor, the mask over the whole cache."""
    L, device = prompt.shape[1], prompt.device
    model.setup_cache(1, L + n)
    logits = prefill(model, prompt)
    key_ok = torch.zeros(1, 1, 1, L + n, dtype=torch.bool, device=device)
    key_ok[..., :L] = True
    pos = torch.tensor([L], device=device)
    ids, outs = [], []
    for _ in range(n):
        token = logits.argmax(-1)
        ids.append(int(token))
        key_ok[..., pos] = True
        logits = step_fn(model, token, pos, key_ok)
        outs.append(logits.float().clone())
        pos += 1
    model.clear_cache()
    return ids, outs


def test_static_decode_step_equals_decode_one_token():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 5))
    with torch.inference_mode():
        ids, _ = _static_steps(m, decode_one_token_static, prompt, 12)
    assert ids == generate(m, prompt[0].tolist(), max_tokens=12, temperature=0)


def test_a_compiled_decode_step_gives_the_same_tokens():
    """stream's decode_step option with a torch.compile'd step (the eager backend: the trace,
    without inductor's minutes of kernel compilation here) on an unpacked model."""
    torch.manual_seed(0)
    m = for_inference(GPT(tiny()), "fp32", pack=False)
    step = torch.compile(decode_one_token, backend="eager", dynamic=True)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]  # left padding: the masked step too
    want = [c.ids for c in generate_batch(m, prompts, max_tokens=8, temperature=0)]
    assert [c.ids for c in generate_batch(m, prompts, max_tokens=8, temperature=0, decode_step=step)] == want
    assert generate(m, prompts[0], 8, temperature=0, decode_step=step) == want[0]


def test_static_decode_step_traces_as_one_graph():
    """torch.compile(fullgraph=True) takes the static step whole (no graph break: what a CUDA
    graph capture needs); the eager backend runs the traced graph without compiling kernels."""
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 5))
    traced = torch.compile(decode_one_token_static, backend="eager", fullgraph=True)
    with torch.inference_mode():
        assert _static_steps(m, traced, prompt, 6)[0] == _static_steps(m, decode_one_token_static, prompt, 6)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cuda_graph_decode_step_gives_the_same_tokens(dtype):
    """The static decode step captured as a CUDA graph (torch.compile mode="reduce-overhead")
    decodes what the eager step decodes; the per-token times go to stdout (pytest -s)."""
    import time

    torch.manual_seed(0)
    m = for_inference(GPT(tiny(n_layer=4, d_model=128, n_head=4, n_kv_head=2, ffn_hidden=384, max_seq_len=128)).cuda(), dtype)
    prompt = torch.randint(0, 97, (1, 8), device="cuda")
    graphed = torch.compile(decode_one_token_static, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        want, eager_logits = _static_steps(m, decode_one_token_static, prompt, 32)
        _static_steps(m, graphed, prompt, 32)  # capture (and warm-up)
        times = {}
        for name, fn in (("eager", decode_one_token_static), ("cuda graph", graphed)):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got, logits = _static_steps(m, fn, prompt, 32)
            torch.cuda.synchronize()
            times[name] = (time.perf_counter() - t0) / 32
            assert got == want, name
    for a, b in zip(logits, eager_logits):
        torch.testing.assert_close(a, b, atol=0.05 if dtype == "bf16" else 1e-4, rtol=0.02 if dtype == "bf16" else 1e-4)
    print(f"\n{dtype}: eager {times['eager'] * 1e3:.3f} ms/token, cuda graph {times['cuda graph'] * 1e3:.3f} ms/token "
          f"(prefill included)")


# --- text: streaming, UTF-8, stop strings ------------------------------------------------------------

def test_stream_text_utf8_and_stop_strings(tok):
    text = "héllo wörld 日本, the calculator says STOP here"
    reply = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in reply)  # multi-byte characters split across tokens
    prompt = [tok.bos_id, 20, 21]
    m = ScriptedModel(tok.vocab_size, ScriptedModel.script(reply + [tok.special_ids["<|end|>"]], 3))
    end = {tok.special_ids["<|end|>"]}
    deltas = [d for step in stream(m, [prompt], max_tokens=100, tokenizer=tok, stop_ids=end, temperature=0)
              for d in step]
    assert "".join(d.text for d in deltas) == text
    assert all("\ufffd" not in d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].token is None
    # stop strings: one spanning two tokens ("STOP" is S,T,O,P here), never streamed in part
    for stop, want in [("STOP", "héllo wörld 日本, the calculator says "), ("wörld", "héllo "),
                       ("calculator says", "héllo wörld 日本, the ")]:
        out = [d for s in stream(m, [prompt], max_tokens=100, tokenizer=tok, stop_strings=[stop, "zzz"],
                                 temperature=0) for d in s]
        assert "".join(d.text for d in out) == want
        assert out[-1].finish_reason == "stop" and out[-1].stop == stop
        c = generate_batch(m, [prompt], max_tokens=100, tokenizer=tok, stop_strings=[stop], temperature=0)[0]
        assert c.text == want and stop not in c.text
    # max tokens in the middle of a character: the text ends with what there is, no crash
    c = generate_batch(m, [prompt], max_tokens=2, tokenizer=tok, temperature=0)[0]
    assert c.finish_reason == "length" and c.text == tok.decode(reply[:2])


# --- the calculator and the registry ----------------------------------------------------------------

@pytest.mark.parametrize("expr,want", [
    ("23 + 58", "81"), ("2 ** 10", "1024"), ("6 / 3", "2"), ("10 / 4", "2.5"), ("7 // 2", "3"),
    ("-3 % 5", "2"), ("-(2 + 3) * 4", "-20"), ("2 ** -2", "0.25"), ("0.1 + 0.2", "0.3"),
    ("12345678901234567890 * 98765432109876543210", "1219326311370217952237463801111263526900"),
])
def test_calculator_arithmetic(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr,why", [
    ("__import__('os').system('echo hi')", "function call"), ("x + 1", "name"), ("(1).real", "attribute"),
    ("[1, 2][0]", "not allowed"), ("'a' * 3", "only numbers"), ("True + 1", "only numbers"),
    ("2 ** 100000", "exponent"), ("9 ** 9 ** 9", "exponent"), ("10 ** 5000", "too large"),
    ("10.0 ** 400", "too large"), ("1 / 0", "division by zero"), ("(-8) ** 0.5", "not a real number"),
    ("1 +", "not an arithmetic expression"), ("1" * 600, "longer than"), ("lambda: 1", "not allowed"),
])
def test_calculator_refuses(expr, why):
    out = calculator(expr)
    assert out.startswith("error: ") and why in out


def test_calculator_time_limit():
    expr = " + ".join(["2 ** 100 * 3 ** 50"] * 20)
    assert calculator(expr, time_limit=1e-7) == "error: timed out after 1e-07s"
    assert calculator(expr).isdigit()


def test_registry_never_raises():
    reg = default_registry()
    assert reg.specs()[0]["function"]["name"] == "calculator"
    assert reg.specs()[0]["function"]["parameters"]["required"] == ["expression"]
    assert reg.call("calculator", '{"expression": "2 + 3"}') == "5"
    assert reg.call("calculator", {"expression": "2 + 3"}) == "5"
    assert reg.call("search", "{}").startswith("error: unknown tool 'search'")
    assert reg.call("calculator", "{not json").startswith("error:")
    assert "missing: expression" in reg.call("calculator", "{}")
    assert "unknown: time_limit" in reg.call("calculator", {"expression": "1", "time_limit": 1e9})
    boom = ToolRegistry()
    boom.register("boom", lambda: 1 / 0, "fails", {"type": "object", "properties": {}})
    assert boom.call("boom", None) == "error: ZeroDivisionError: division by zero"
