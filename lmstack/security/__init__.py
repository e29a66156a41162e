"""Attack and defend your own model (`lmstack redteam`, `safety-data`, `injection`, `gcg`, `poison`).

A package above experiments/: it drives models through the engine, the evaluation's ModelLM and
the one training loop, and writes the experiment store; nothing below it imports it.

  behaviours     the forbidden behaviours (canary, banned word, forbidden tool, the world's harmful
                 knowledge), each with a benign twin, and their exact detectors
  jailbreak      prompt transforms: role play, refusal suppression, prefix injection, encodings,
                 many-shot, multi-turn escalation
  redteam        the scanner: attempts -> the model -> detectors -> report.jsonl, report.md, hit log
  safety         the defence made of the attacks' own prompts: refusal SFT data, DPO comparisons
  injection      instructions planted in search results, tool results and (hidden in) pasted pages
  untrusted      which text is untrusted, spotlighting's marks
  hierarchy      the instruction-hierarchy defences: delimit/datamark guards, the injection filter
  classifier     the injection classifier (hashed n-grams, logistic regression)
  gcg            adversarial suffixes by GCG (Zou et al. 2023) and the soft-prompt upper bound
  perplexity     the perplexity filter (whole and windowed) against suffixes
  suffix         the suffix suite: universal/individual GCG, transfer, the filter and its adaptive attack
  poison         poisoned fine-tuning / pretraining sets and exact backdoor checks
  poison_filter  poison detection before training: spectral signatures, clustering, dedupe, outliers
  backdoor       the backdoor's success against the number of poison examples, into the store
"""

# What the command line offers, here so that building its parser imports no torch (`lmstack
# --help` in 0.2 s, not 4): the scanner's suites and defences (redteam.py) and GCG's default target
# (gcg.py; the world's compliance opener, lmstack/world/assistant.py COMPLIANCE).
SUITES = ("jailbreak", "injection", "suffix", "backdoor")
DEFENCES = ("perplexity", "windowed-perplexity", "datamark", "delimit", "classifier")
GCG_TARGET = "Sure! Here is a plan for {topic}"
