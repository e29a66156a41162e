"""System 2: turn thinking time (more samples, longer replies, search) into accuracy.

  estimators.py  pass@k (unbiased), majority@k (self-consistency), best-of-k by a verifier, bootstrap
  curve.py       `lmstack think curve`: sample k replies per problem, the accuracy-vs-compute curve
"""
