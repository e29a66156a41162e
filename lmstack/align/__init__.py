"""Alignment: from a chat model to a preferred one, through THE training loop (lmstack/train/).

    pairs.py    comparisons ({prompt, chosen, rejected}), their rendering, pair batches, a stage's setup
    reward.py   `lmstack reward train | score`: the Bradley-Terry reward model
    dpo.py      `lmstack dpo`: direct preference optimisation against a frozen reference
    judge.py    `lmstack judge`: RLAIF, comparisons labelled by a model against a constitution
    rollout.py  RL's rollout phase: prompts, replies from the current policy, scorers, the batch source
    rl.py       `lmstack ppo` / `lmstack grpo`: the policy (and value head), the objectives, the stage
    rewards.py  checkable rewards for RL: arithmetic, the world's ground truth, your own function
"""
