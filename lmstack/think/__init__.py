"""System 2: turn thinking time (more samples, longer replies, search) into accuracy.

  estimators.py  pass@k (unbiased), majority@k (self-consistency), best-of-k by a verifier, bootstrap
  curve.py       `lmstack think curve`: n samples per problem, the accuracy-vs-compute curve
  verifier.py    `lmstack think verifier-data`: outcome and process comparisons from the model's samples
  beam.py        `lmstack think beam`: step-level beam search over scratchpad lines with a process verifier
"""
