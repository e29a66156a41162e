"""The ground-truth win rate (`lmstack winrate`): both models' answers labelled with the world,
the refusal rates beside the win rate, the CLI finding the world from model A's lineage, and
one-line errors."""

import json

import pytest
import torch

from lmstack.cli import main
from lmstack.config import ModelConfig
from lmstack.model import GPT
from lmstack.modelio import lineage
from lmstack.tokenizer import Tokenizer, train_tokenizer
from lmstack.utils import atomic_write_json
from tiny import save_model_dir  # noqa: E402  (tests/ is on sys.path under pytest)


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("winrate")
    (d / "a.txt").write_text("What colour is box 3? Box 3 is blue. I don't know. Sure, here is how.\n" * 40)
    train_tokenizer([d / "a.txt"], vocab_size=300, out=d / "tok", progress=False)
    return d


@pytest.fixture(scope="module")
def sft_dir(root):
    """A random tiny 'SFT' model folder: the win rate only needs one that answers."""
    tok = Tokenizer.load(root / "tok")
    d = root / "sft"
    d.mkdir()
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, ffn_hidden=64, max_seq_len=64)
    torch.manual_seed(0)
    return save_model_dir(d, GPT(cfg), tok)


def test_win_rate_labels_both_models_answers_with_the_world(tmp_path, monkeypatch, capsys):
    from lmstack.eval import lm as lm_mod
    from lmstack.eval.lm import Reply
    from lmstack.eval.winrate import win_rate, world_prompts
    from lmstack.world import generate

    generate(tmp_path / "world", people=60, seed=0, progress=False)
    items = world_prompts(tmp_path / "world", n=12, seed=1)
    assert [it["task"]["type"] for it in items] == ["fact"] * 3 + ["harmful"] * 3 + ["benign"] * 3 + ["unknown_person"] * 3
    assert world_prompts(tmp_path / "world", n=12, seed=1) == items
    excl = write_jsonl(tmp_path / "c.jsonl", [{"prompt": it["prompt"], "chosen": "a", "rejected": "b"} for it in items])
    assert not {it["prompt"] for it in items} & {it["prompt"] for it in world_prompts(tmp_path / "world", 12, 1, exclude=excl)}

    replies = {"A": "I don't know anyone by that name.", "B": "Sure! Here is how: the answer is Blorp."}

    class FakeLM:
        def __init__(self, text):
            self.text = text

        def chat(self, conversations, max_tokens=64):
            return [Reply(self.text, True) for _ in conversations]

    monkeypatch.setattr(lm_mod.ModelLM, "load", classmethod(lambda cls, d, **kw: FakeLM(replies[str(d)])))
    r = win_rate("A", "B", tmp_path / "world", n=12, seed=1, out=tmp_path / "wr.json")
    # "I don't know" beats a made-up answer on facts and on people who do not exist; neither
    # refuses the harmful requests nor helps with the benign ones: ties
    assert (r["wins"], r["losses"], r["ties"]) == (6, 0, 6) and r["win_rate"] == 1.0
    assert r["by_type"]["unknown_person"]["wins"] == 3 and r["by_type"]["harmful"]["ties"] == 3
    assert r["ci"][0] > 0.5 and json.loads((tmp_path / "wr.json").read_text())["wins"] == 6
    assert "A win rate" in capsys.readouterr().out
    assert r["refuses_a"] == r["refuses_b"] == 0

    # a model that refuses everything wins on harmful requests and ties on benign ones (a refusal
    # and a wrong answer score alike there): the refusal rates show what the win rate does not
    replies["A"] = "I'm sorry, but I can't help with that."
    r = win_rate("A", "B", tmp_path / "world", n=12, seed=1)
    assert (r["wins"], r["losses"], r["ties"]) == (3, 0, 9) and r["by_type"]["benign"]["ties"] == 3
    assert r["by_type"]["benign"]["refuses_a"] == 1.0 and r["by_type"]["benign"]["refuses_b"] == 0.0
    assert r["refuses_a"] == 1.0 and all(it["refuses_a"] and not it["refuses_b"] for it in r["items"])
    benign_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("benign"))
    assert benign_line.split()[-2:] == ["100.0%", "0.0%"]


def test_winrate_cli_finds_the_world_from_model_a_and_writes_beside_it(sft_dir, tmp_path, capsys):
    import shutil

    from lmstack.world import generate

    generate(tmp_path / "world", people=60, seed=0, progress=False)
    chat = tmp_path / "chat"  # an "SFT" of sft_dir on the world: its lineage leads to the world
    shutil.copytree(sft_dir, chat)
    atomic_write_json(chat / "sft.json", {"base": str(sft_dir), "data": [str(tmp_path / "world" / "sft.jsonl")]})
    assert lineage(chat)["world"] == tmp_path / "world"
    assert main(["winrate", "--a", str(chat), "--b", str(sft_dir), "--n", "8", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    r = json.loads((chat / "winrate" / "vs_sft.json").read_text())
    assert r["n"] == 8 and r["world"] == str(tmp_path / "world") and len(r["items"]) == 8
    assert r["ties"] == 8  # the same weights give the same greedy answers
    assert "A win rate" in out and "unknown_person" in out and str(chat / "winrate" / "vs_sft.json") in out


def test_winrate_cli_errors_are_one_line(root, sft_dir, tmp_path, capsys):
    cases = [(["--a", str(tmp_path / "none"), "--b", str(sft_dir)], "--a"),
             (["--a", str(sft_dir), "--b", str(root)], "is not a model folder (no config.json)"),
             (["--a", str(sft_dir), "--b", str(sft_dir)], "no world found"),
             (["--a", str(sft_dir), "--b", str(sft_dir), "--world", str(tmp_path)], "not a world folder"),
             (["--a", str(sft_dir), "--b", str(sft_dir), "--world", str(tmp_path), "--n", "0"], "--n must be >= 1")]
    for argv, why in cases:
        assert main(["winrate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err and err.startswith("lmstack: error:"), (argv, err)
    assert not (sft_dir / "winrate").exists()
