"""Training: THE loop (loop.py), its objectives and checkpoints, and the two language-model stages.

    loop.py        train(cfg, model, batches, objective, out, ...): the one loop for every stage
    objectives.py  (model, batch) -> (loss_sum, n_tokens): next-token losses, and the preference
                   and RL math the alignment stages (lmstack/align/) build theirs from
    checkpoint.py  resume state: atomic checkpoints, --out and --resume checks
    pretrain.py    `lmstack pretrain`
    sft.py         `lmstack sft`: the same loop and loss, with a mask and packed conversations
"""
