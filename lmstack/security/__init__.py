"""Attack and defend your own model (`lmstack redteam`, `lmstack poison`).

A second-level package like think/: it drives models through the engine and the one training
loop, and nothing below it imports it.

  behaviours   the forbidden behaviours and their exact detectors (canary, banned word,
               forbidden tool, the world's harmful knowledge), each with a benign twin
  jailbreak    prompt transforms: role-play, refusal suppression, prefix injection, encodings,
               many-shot, multi-turn escalation
  injection    instructions hidden in documents, tool results and web pages
  gcg          universal adversarial suffixes (Zou et al. 2023) and the soft-prompt upper bound
  poison       poisoned fine-tuning / pretraining sets, the backdoor's success curve
  defences     perplexity filters, datamarking, an injection classifier, poison filtering
  redteam      the scanner: probes -> the model -> detectors -> report.jsonl, report.md, hits
"""
