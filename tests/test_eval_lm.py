"""lmstack eval's language-modelling measures on constructed models: bits per byte, the batched
log-likelihood, loss on prepared data, in-context copying (`copy`) and the ICL score (`icl`)."""

import math
import random
import string
from types import SimpleNamespace

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.eval.lm import ModelLM
from lmstack.eval.run import copy_eval, icl_eval, lm_eval_data, lm_eval_text, resolve_tasks
from lmstack.model import GPT
from test_eval import byte_tok, model_dir, tok, write_jsonl  # noqa: F401,E402  (fixtures; tests/ is on sys.path)

pytestmark = pytest.mark.usefixtures("one_thread")


class UniformModel(torch.nn.Module):
    """Logits 0 on `allowed` ids and -inf elsewhere: a uniform distribution over len(allowed) symbols."""

    def __init__(self, vocab_size, allowed, max_seq_len=64):
        super().__init__()
        self.cfg = SimpleNamespace(vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.bias = torch.full((vocab_size,), float("-inf"))
        self.bias[list(allowed)] = 0.0

    def forward(self, idx, start_pos=None, attn_mask=None):
        return self.bias.expand(*idx.shape, -1).clone()


@pytest.mark.parametrize("k", [8, 4])
def test_uniform_model_over_2_to_the_k_symbols_has_k_bits_per_byte(tmp_path, byte_tok, k):
    alphabet = [chr(c) for c in range(ord("a"), ord("a") + 2 ** k)] if k < 8 else None
    if k == 8:
        allowed = range(16, 272)  # every byte
        texts = ["héllo wörld — ünïcode ✓\n" * 3, "plain ascii text " * 9]
    else:
        allowed = [byte_tok.encode(ch)[0] for ch in alphabet]
        texts = ["".join(alphabet[(i * 7) % len(alphabet)] for i in range(150)), "abcabc" * 20]
    assert all(len(byte_tok.encode(t)) == len(t.encode()) for t in texts)  # one byte per token
    lm = ModelLM(UniformModel(byte_tok.vocab_size, allowed, max_seq_len=40), byte_tok, batch_size=8)
    files = [write_jsonl(tmp_path / f"d{k}.jsonl", [{"text": t} for t in texts])]
    r = lm_eval_text(lm, files)
    assert r["bpb"] == pytest.approx(k, rel=1e-6)
    assert r["tokens"] == r["bytes"] == sum(len(t.encode()) for t in texts)
    assert r["loss"] == pytest.approx(k * math.log(2), rel=1e-6)


# --- batched scoring against a plain forward pass --------------------------------------------

def test_loglikelihood_batched_equals_one_forward(model_dir, tok):
    lm = ModelLM.load(model_dir, dtype="fp32", device="cpu", batch_size=3)
    pairs = [("Ana was born in", " Paris."), ("Bo works at", " Acme in Rome"), ("", "What is 23 + 58?"),
             ("What is 23 + 58? " * 4, "81."), ("x", " y")]
    got = lm.loglikelihood(pairs)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        c, x = lm.split_pair(ctx, cont)
        seq = (c + x)[-(lm.ctx + 1):]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([seq[:-1]])).float(), -1)[0]
        want = sum(float(logp[len(seq) - 1 - len(x) + i, t]) for i, t in enumerate(x))
        assert lp == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(logp[len(seq) - 1 - len(x) + i].argmax()) == t for i, t in enumerate(x))
    # The model's own greedy continuation is greedy.
    ids = [tok.bos_id] + tok.encode("Ana was born")
    cont = lm.generate([ids], max_tokens=4)[0].ids
    assert lm.loglikelihood_ids([(ids, cont)])[0][1] is True
    # Rolling over a text longer than the context: every token once, and the same total as
    # scoring each window by hand.
    doc = [tok.bos_id] + tok.encode("Ana was born in Paris. Bo works at Acme in Rome. " * 4)
    assert len(doc) > 2 * lm.ctx
    total, n = lm.rolling_ids([doc])[0]
    assert n == len(doc) - 1
    manual, done = 0.0, 1
    while done < len(doc):
        end = min(done + lm.ctx, len(doc))
        manual += lm.loglikelihood_ids([(doc[max(0, end - lm.ctx - 1):done], doc[done:end])])[0][0]
        done = end
    assert total == pytest.approx(manual, abs=1e-4)


def test_lm_on_prepared_data_matches_the_training_loop(tmp_path, model_dir, tok):
    from lmstack.data import iter_eval_windows, prepare
    from lmstack.train.loop import evaluate as loop_evaluate
    from lmstack.train.objectives import next_token_loss

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"Ana was born in Paris in year {i}. " * 3} for i in range(60)])
    prepare([docs], tokenizer=model_dir, out=tmp_path / "data", val_fraction=0.3, progress=False)
    lm = ModelLM.load(model_dir, dtype="fp32", device="cpu", batch_size=4)
    r = lm_eval_data(lm, tmp_path / "data")
    want = loop_evaluate(lm.model, lambda: iter_eval_windows(tmp_path / "data", "val", 4, lm.ctx), next_token_loss,
                         torch.device("cpu"), None, torch.tensor(tok.token_bytes()))
    assert r["loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    assert r["bpb"] == pytest.approx(want["val_bpb"], rel=1e-5)


class Copier(torch.nn.Module):
    """An induction head written by hand: at each position, the token that followed the last
    earlier occurrence of the current token, with near certainty; uniform where there is none."""

    def __init__(self, vocab_size: int, ctx: int = 256):
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab_size, max_seq_len=ctx)
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        out = torch.zeros(*idx.shape, self.cfg.vocab_size)
        for b, row in enumerate(idx.tolist()):
            last = {}
            for t, tok in enumerate(row):
                if tok in last and last[tok] + 1 < len(row):
                    out[b, t, row[last[tok] + 1]] = 20.0
                last[tok] = t
        return out


def test_copy_measures_in_context_copying(tok):
    copier = copy_eval(ModelLM(Copier(tok.vocab_size), tok), sequences=16, length=32)
    assert copier["ratio"] < 0.2 and copier["ci"][1] < 0.3  # it copies: the second occurrence is nearly free
    assert copier["first"] == pytest.approx(math.log(tok.vocab_size), rel=0.1)
    torch.manual_seed(0)
    plain = copy_eval(ModelLM(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2)), tok),
                      sequences=16, length=32)
    assert 0.9 < plain["ratio"] < 1.1 and plain["ci"][0] < 1 < plain["ci"][1]  # a random model does not
    assert resolve_tasks("copy,lm", None, True) == ([], {"copy", "lm"})


def test_icl_score_is_loss_late_in_a_context_minus_early(tmp_path, byte_tok):
    """Documents of 32 distinct characters, then the same again (one token a byte): the hand-written
    induction head finds the late tokens free (the score about -ln V); a random model is no better
    late than early (about 0)."""
    from lmstack.data import prepare

    rng = random.Random(0)
    chars = string.ascii_letters + string.digits
    docs = [{"text": seq + seq} for seq in ("".join(rng.sample(chars, 32)) for _ in range(80))]
    byte_tok.save(tmp_path / "tok")
    prepare([write_jsonl(tmp_path / "docs.jsonl", docs)], tokenizer=tmp_path / "tok", out=tmp_path / "data",
            val_fraction=0.5, progress=False)
    copier = icl_eval(ModelLM(Copier(byte_tok.vocab_size, ctx=64), byte_tok), tmp_path / "data", windows=16)
    assert copier["windows"] == 16 and copier["ctx"] == 64
    assert copier["early"] == pytest.approx(math.log(byte_tok.vocab_size), rel=0.05)
    assert copier["score"] < -5 and copier["ci"][1] < -5, copier
    torch.manual_seed(0)
    plain = icl_eval(ModelLM(GPT(ModelConfig(vocab_size=byte_tok.vocab_size, n_layer=1, d_model=32, n_head=2,
                                             max_seq_len=64)), byte_tok), tmp_path / "data", windows=16)
    assert abs(plain["score"]) < 0.1, plain
    assert resolve_tasks("icl", None, True) == ([], {"icl"})
    assert icl_eval(ModelLM(Copier(byte_tok.vocab_size, ctx=4096), byte_tok), tmp_path / "data") is None


def test_copy_text_draws_the_texts_own_tokens(tmp_path, byte_tok):
    """copy_text: the copying test with tokens drawn as the validation text uses them (text_pool:
    its ordinary ids and counts; never a control token): every probe token is one of the text's,
    the frequent ones in most rows, each row's tokens distinct; the hand-written induction head
    copies them, a random model does not."""
    from lmstack.data import copy_probe, prepare, text_pool

    docs = [{"text": "ab" * 40 + "xyzqrs"}] * 40
    byte_tok.save(tmp_path / "tok")
    prepare([write_jsonl(tmp_path / "docs.jsonl", docs)], tokenizer=tmp_path / "tok", out=tmp_path / "data",
            val_fraction=0.5, progress=False)
    ids, counts = text_pool(tmp_path / "data", "val", byte_tok)
    assert set(ids.tolist()) == {byte_tok.encode(c)[0] for c in "abxyzqrs"}
    assert not set(ids.tolist()) & set(byte_tok.control_ids)
    probe = copy_probe(byte_tok, 64, sequences=32, length=4, pool=(ids, counts))
    head = len(byte_tok.scoring_head)
    rows = probe[:, head:].tolist()
    assert all(r[:4] == r[4:] and len(set(r[:4])) == 4 and set(r) <= set(ids.tolist()) for r in rows)
    a = byte_tok.encode("a")[0]
    assert sum(a in r for r in rows) > 24  # "a" is a third of the text; "x", "q" ... a hundredth each
    lm = ModelLM(Copier(byte_tok.vocab_size, ctx=64), byte_tok)
    assert copy_eval(lm, sequences=8, pool=(ids, counts))["length"] == 8  # no more than the text's 8 tokens
    assert copy_eval(lm, sequences=8, pool=(ids, counts))["ratio"] < 0.2
    torch.manual_seed(0)
    plain = ModelLM(GPT(ModelConfig(vocab_size=byte_tok.vocab_size, n_layer=1, d_model=32, n_head=2, max_seq_len=64)),
                    byte_tok)
    assert 0.8 < copy_eval(plain, sequences=16, pool=(ids, counts))["ratio"] < 1.2
    assert resolve_tasks("copy_text", None, True) == ([], {"copy_text"})
