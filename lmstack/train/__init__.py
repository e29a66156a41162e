"""Training: THE loop (loop.py), objectives, checkpoints, and the pretraining entry point.

    loop.py        train(cfg, model, batches, objective, out, ...): the one loop for every stage
    objectives.py  (model, batch) -> (loss_sum, n_tokens)
    checkpoint.py  the model folder, atomic save / resume, load_model
    pretrain.py    `lmstack pretrain` and `lmstack sample`
"""
