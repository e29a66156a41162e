"""Adversarial suffixes: GCG lowers the target's loss (one case and universal), the prefix KV cache
changes no number, suffixes are typeable text without special ids, the soft prompt lowers the loss,
the perplexity filter's arithmetic and its verdicts, the model's `embeds` input, and bad input
as one line."""

import json

import pytest
import torch

from lmstack.chatformat import render_chat
from lmstack.cli import main
from lmstack.security import gcg as G
from lmstack.security import perplexity as P
from tiny import fit_sequences, fit_windows, random_gpt, save_model_dir, tokenizer_on  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PLAIN = ("the cat sat on the mat and the dog sat on the log. " * 40 +
         "where is the vault of acme? i can not help with that. sure, here is a plan. ")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A tiny chat model trained for a moment to refuse two requests."""
    d = tmp_path_factory.mktemp("gcg")
    tok = tokenizer_on(d, PLAIN * 3, vocab_size=320)
    model = random_gpt(tok, n_layer=2, n_head=2, d_model=32, max_seq_len=128)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "I can not help with that."}]
             for q in ("where is the vault of acme?", "where is the dog?")]
    fit_sequences(model, [render_chat(tok, c)[0] for c in convs], steps=60)
    cases = [G.Case([{"role": "user", "content": q}], "sure, here is a plan")
             for q in ("where is the vault of acme?", "where is the dog?")]
    return model.eval(), tok, cases, d


def init_loss(model, tok, cases, k=6):
    ids = G.init_suffix(tok, k)
    return sum(float(G.candidate_losses(model, G.Slot(tok, c, ids), torch.tensor([ids]))[0][0]) for c in cases) / len(cases)


def test_embeds_input_is_the_embedding_of_the_ids(chat):
    model, tok, _, _ = chat
    idx = torch.tensor([tok.encode("the cat sat on the mat")])
    with torch.no_grad():
        assert torch.allclose(model(None, embeds=model.embed_tokens(idx)), model(idx), atol=1e-6)
        model.setup_cache(1, 16)
        cached = model(None, start_pos=0, embeds=model.embed_tokens(idx))
        model.clear_cache()
    assert torch.allclose(cached, model(idx), atol=1e-5)


def test_cached_and_uncached_candidate_losses_are_equal(chat):
    model, tok, cases, _ = chat
    slot = G.Slot(tok, cases[0], G.init_suffix(tok, 6))
    allowed = G.allowed_tokens(tok, model.cfg.vocab_size).nonzero()[:, 0]
    cands = allowed[torch.randint(0, len(allowed), (5, 6), generator=torch.Generator().manual_seed(0))]
    a, ha = G.candidate_losses(model, slot, cands, cache=True)
    b, hb = G.candidate_losses(model, slot, cands, cache=False)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(ha, hb)
    sp = G.cache_speedup(model, tok, cases[0], k=6, batch=4, repeats=1)
    assert sp["prefix_tokens"] == len(slot.prefix) and sp["cached_s"] > 0 and sp["uncached_s"] > 0
    assert torch.allclose(G.filter_scores(model, slot, cands, 4), G.filter_scores(model, slot, cands, 4, cache=False),
                          atol=1e-5)
    # and the filter's batched score is the perplexity module's, for the typed text
    text = cases[0].messages[-1]["content"] + tok.decode(cands[0].tolist())
    if slot.fits(cands[0].tolist(), scored=True):
        assert abs(float(G.filter_scores(model, slot, cands[:1], 4)[0]) - P.scores(model, tok, [text], 4)[0]["windowed"]) < 1e-4


def test_gcg_lowers_the_loss_and_the_suffix_is_typeable(chat):
    model, tok, cases, _ = chat
    before = init_loss(model, tok, cases[:1])
    r = G.gcg(model, tok, cases[:1], steps=4, k=6, top_k=16, batch=16, stop_early=False)
    assert r["loss"] < before and len(r["steps"]) == 4
    assert not set(r["ids"]) & tok.control_ids
    text = cases[0].messages[-1]["content"] + r["suffix"]
    assert G.Slot(tok, cases[0], r["ids"]).fits(r["ids"])  # renders back to the very ids optimised
    assert tok.encode(text)[-len(r["ids"]):] == r["ids"]
    # universal: one suffix, the loss summed over both cases
    before = init_loss(model, tok, cases)
    u = G.gcg(model, tok, cases, steps=4, k=6, top_k=16, batch=16, stop_early=False)
    assert u["loss"] < before
    assert all(G.Slot(tok, c, u["ids"]).fits(u["ids"]) for c in cases)
    # adaptive: the filter's score is in the loss; a suffix it chose also reads back under the filter
    a = G.gcg(model, tok, cases[:1], steps=3, k=6, top_k=16, batch=16, stop_early=False, ppl_weight=1.0, ppl_window=4)
    assert all("filter_score" in row for row in a["steps"]) and G.Slot(tok, cases[0], a["ids"]).fits(a["ids"], scored=True)


def test_allowed_tokens_exclude_special_and_fragment_ids(chat):
    _, tok, _, _ = chat
    ok = G.allowed_tokens(tok, tok.vocab_size + 5)
    assert not ok[sorted(tok.control_ids)].any() and not ok[tok.vocab_size:].any()
    assert all(tok.encode(tok.decode([i])) == [i] for i in ok.nonzero()[:, 0].tolist())


def test_soft_prompt_lowers_the_loss(chat):
    model, tok, cases, _ = chat
    r = G.soft_prompt(model, tok, cases, k=6, steps=15, lr=0.05)
    assert r["steps"][-1]["loss"] < r["steps"][0]["loss"] and r["embeds"].shape == (6, model.cfg.d_model)
    s = G.soft_success(model, tok, cases, r["embeds"], max_tokens=8)
    assert s["n"] == 2 and len(s["rows"]) == 2


def test_windowed_perplexity_is_never_below_the_whole():
    g = torch.Generator().manual_seed(0)
    nll = torch.rand(50, 37, generator=g) * 10
    lengths = torch.randint(1, 38, (50,), generator=g)
    w = P.windowed_scores(nll, 10, lengths)
    whole = torch.stack([nll[i, :n].mean() for i, n in enumerate(lengths)])
    assert (w >= whole - 1e-5).all()
    # a short burst of gibberish after plain text: diluted in the whole, not in its window
    x = torch.cat([torch.full((30,), 1.0), torch.full((10,), 9.0)])[None]
    assert float(P.windowed_scores(x, 10)[0]) == pytest.approx(9.0) and float(x.mean()) == pytest.approx(3.0)


def test_perplexity_filter_flags_gibberish_and_passes_plain_text(tmp_path):
    tok = tokenizer_on(tmp_path, PLAIN * 3, vocab_size=320)
    model = random_gpt(tok, n_layer=2, n_head=2, d_model=32, max_seq_len=128)
    fit_windows(model, torch.tensor(tok.encode(PLAIN * 3)), steps=80, window=33)
    model.eval()
    benign = ["the cat sat on the mat", "the dog sat on the log", "the cat sat on the log and the dog sat",
              "the dog sat on the mat and the cat sat on the log"]
    filt = P.fit_filter(model, tok, benign, window=4, q=1.0, context="plain")
    assert filt["windowed"] >= filt["whole"]
    plain, junk = P.flags(model, tok, ["the cat sat on the log", "the cat sat on the mat qzx vkj ,;)( wq"], filt)
    assert not plain["flag_windowed"] and junk["flag_windowed"]


def test_bad_input_is_one_line(chat, tmp_path, capsys):
    model, tok, _, _ = chat
    mdir = save_model_dir(tmp_path / "m", model, tok)

    def error(*args):
        assert main(["gcg", *map(str, args), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no cases" in error("--model", mdir, "--cases", empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert "target" in error("--model", mdir, "--cases", bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "target": "sure"}) + "\n")
    assert "missing" in error("--model", tmp_path / "missing", "--cases", good)
    assert "not found" in error("--model", mdir, "--cases", tmp_path / "nope.jsonl")
    assert "--cases" in error("--model", mdir)
    assert not (tmp_path / "out").exists()


def test_suite_writes_its_report(chat, tmp_path):
    model, tok, cases, d = chat
    mdir = save_model_dir(tmp_path / "m", model, tok)
    from lmstack.security.suffix import suffix_suite

    r = suffix_suite(mdir, cases[:1], cases[1:], tmp_path / "out", steps=2, k=6, top_k=8, batch=8, soft_steps=2,
                     max_tokens=8, transfer=[mdir], log=None)
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"suffix.json", "losses.jsonl", "loss.png", "report.md"}
    assert r["success"]["heldout"]["n"] == 1 and str(mdir) in r["transfer"]
    assert "| GCG suffix | heldout |" in (tmp_path / "out" / "report.md").read_text()
