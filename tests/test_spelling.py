"""Spelling (lmstack/eval/spelling.py): are a model's replies made of its world's words?"""

import json

from lmstack.eval.spelling import spelling, spelling_by_task, world_lexicon


def _world(tmp_path):
    w = tmp_path / "world"
    (w / "probes").mkdir(parents=True)
    (w / "world.json").write_text("{}")
    # A newline inside a JSON string is written "\n": "\nOnes" must give the word "ones".
    (w / "pretrain.jsonl").write_text(json.dumps({"text": "Mianda Fleipov works in Tihaven.\nOnes: 9 + 2 = 11."}) + "\n")
    (w / "sft.jsonl").write_text(json.dumps({"messages": [
        {"role": "assistant", "content": "I'm sorry, I can't help with that."}]}) + "\n")
    (w / "probes" / "nonexistent.jsonl").write_text(json.dumps({"question": "Where does Neartara Giasic work?"}) + "\n"
                                                    + "\n" + "not json: Zorblat\n")  # a blank line, a bad one
    return w


def test_the_lexicon_is_every_word_of_the_worlds_files(tmp_path):
    lex = world_lexicon(_world(tmp_path))
    assert {"mianda", "tihaven", "ones", "sorry", "can", "t", "neartara", "content", "role", "zorblat"} <= lex
    assert "nones" not in lex and "n" not in lex and "11" not in lex  # no escape letters, no digits


def test_a_reply_with_a_non_word_is_counted_with_its_non_words(tmp_path):
    lex = world_lexicon(_world(tmp_path))
    s = spelling(["I'm sorry, I can't help with that.", "I'm sorry, I can't help with lgguaaeleel 12.",
                  "Neartara Giasic works in Tihaven."], lex)
    assert s["n"] == 3 and s["correct"] == 2 and s["words"] == 23 and s["nonwords"] == 1
    assert s["common"] == [["lgguaaeleel", 1]] and abs(s["nonword_share"] - 1 / 23) < 1e-12
    assert s["ci"][0] < 2 / 3 < s["ci"][1]


def test_by_task_counts_the_greedy_chat_replies_only(tmp_path):
    lex = world_lexicon(_world(tmp_path))
    tasks = {"refusal": {"format": "chat", "items": [{"reply": "I can't help."}, {"reply": "I cn't hlp."}]},
             "pass8": {"format": "chat", "items": [{"samples": ["zzz"]}]},  # sampled: no greedy reply
             "facts_text": {"format": "text", "items": [{"reply": "qqq"}]}}  # a base model's continuation
    s = spelling_by_task(tasks, lex)
    assert set(s) == {"all", "refusal"} and s["all"]["n"] == 2 and s["refusal"]["correct"] == 1
    assert sorted(w for w, _ in s["all"]["common"]) == ["cn", "hlp"]
