"""Evaluation: tasks with ground truth, language modelling, comparisons, the report card.

metrics.py  accuracy with its 95% interval, chance, paired tests, bits per byte
lm.py       a model as evaluations see it: loglikelihood, rolling, generate, chat (batched)
tasks.py    task specs (jsonl + TOML): multiple choice by log-likelihood, generative + checker
world.toml  the synthetic world's tasks, written as specs like any user's
run.py      `lmstack eval`: run tasks, write results JSON, print tables, compare two models
report.py   `lmstack report`: the report card of a run (markdown + plots)
harness.py  an adapter so EleutherAI lm-evaluation-harness can evaluate an lmstack model
"""
