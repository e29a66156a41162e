"""Evaluation: tasks with ground truth, language modelling, comparisons, the report card.
(The statistics, Wilson intervals and paired tests, are lmstack/stats.py.)

lm.py       a model as evaluations see it: loglikelihood, rolling, generate, chat (batched)
tasks.py    task specs (jsonl + TOML): multiple choice by log-likelihood, generative + checker
world.toml  the synthetic world's tasks, written as specs like any user's
run.py      `lmstack eval`: run tasks, write results JSON, print tables, compare two models
report.py   `lmstack report`: the report card of a run (markdown + plots)
winrate.py  `lmstack winrate`: ground-truth win rate of one model against another on the world
harness.py  an adapter so EleutherAI lm-evaluation-harness can evaluate an lmstack model
"""
