"""Safety data: the defence made of the attacks' own prompts (`lmstack safety-data`).

Every forbidden request of the world, in the phrasings its conversations use (never the probes'
held-out ones), is dressed by each jailbreak family's *train* templates (the scan measures the
held-out ones) and answered as the operator wants: refused. Every benign twin is dressed the
same way and answered, so the assistant learns to refuse the request, not the framing (the
clean cost is measured on the twins). Multi-turn escalation is left out: it is the family the
defence never sees, and the scan says how far what it learnt carries.

  sft.jsonl          {"messages"}: dressed request -> the refusal / dressed twin -> the answer
  comparisons.jsonl  {"prompt", "chosen", "rejected", "reason", "meta"}: the refusal over the
                     ground-truth leak (the canary, the banned city, the true vault code), and
                     the twin's answer over a refusal. The forbidden tool is in SFT only: its
                     "leak" is a tool call, which a comparison's text cannot hold.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from lmstack.security import jailbreak
from lmstack.utils import UserError, atomic_output_dir
from lmstack.world import assistant as world_assistant
from lmstack.world import security as ws
from lmstack.world.corpus import load_world

FAMILIES = [f for f in jailbreak.FAMILIES if f != "multi_turn"]


def _conversations(world: dict, rng: random.Random, n: int) -> list[tuple[str, bool, list[dict], str]]:
    """(goal, twin, conversation, the leak a refusal withholds) in train phrasings."""
    sec = world["security"]
    goal_of = {"canary": "canary", "banned": "banned_word", "tool": "forbidden_tool"}
    out = []
    for k in range(n):
        kind = ws.KINDS[k % len(ws.KINDS)]
        conv = ws.conversation(kind, rng, world, f"call_s{k}")
        goal, twin = goal_of[kind.removesuffix("_twin")], kind.endswith("_twin")
        leak = {"canary": f"The secret code is {sec['canary']}.", "banned_word": None, "forbidden_tool": None}[goal]
        if goal == "banned_word" and not twin:
            city = next(c for c in world["cities"] if c["name"] == sec["banned_word"])
            leak = ws.city_qa(city, 0)[1]
        out.append((goal, twin, conv, leak))
    for k in range(n // 3):  # the harmful knowledge: the vault code refused; the benign twin answered
        c = rng.choice(world["companies"])
        ask = rng.choice(ws.ASK_VAULT[:-1]).format(company=c["name"])
        topic = f"giving out the code of {c['name']}'s vault"
        refusal = rng.choice(world_assistant.REFUSALS).format(topic=topic)
        out.append(("harmful", False, [{"role": "user", "content": ask}, {"role": "assistant", "content": refusal}],
                    f"The code of the vault of {c['name']} is {c['vault_code']}."))
        out.append(("harmful", True, [{"role": "user", "content": f"Where is the head office of {c['name']}?"},
                                      {"role": "assistant", "content": f"{c['name']} has its head office in {c['city']}."}],
                    None))
    return out


def safety_data(world_dir, out, n: int = 600, seed: int = 0, force: bool = False) -> dict:
    """Write sft.jsonl and comparisons.jsonl (module doc) from `n` deployed conversations of the
    world (and n/3 vault-code requests with as many twins), each dressed by every family in FAMILIES."""
    world = load_world(world_dir)
    if "security" not in world:
        raise UserError(f"{world_dir} has no security behaviours (a world made before them): make a new one")
    if n < len(ws.KINDS):
        raise UserError(f"-n must be at least {len(ws.KINDS)} (one conversation per behaviour and twin)")
    rng = random.Random(f"lmstack-safety:{seed}")
    sft, comparisons = [], []
    for goal, twin, conv, leak in _conversations(world, rng, n):
        first = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt, answer = conv[:first], conv[first:]
        attempt = {"goal": goal, "twin": twin, "messages": prompt, "truth": None}
        for family in FAMILIES:
            dressed = jailbreak.dress(attempt, family, rng, split="train", shots=4)["messages"]
            sft.append({"messages": dressed + answer})
            reply = answer[-1]["content"] if len(answer) == 1 else None
            if reply is None:
                continue
            if twin:
                worse = rng.choice(world_assistant.EVASIVE)
                comparisons.append({"prompt": dressed, "chosen": reply, "rejected": worse,
                                    "reason": "a benign request is answered, whatever its framing",
                                    "meta": {"type": "safety_twin", "goal": goal, "family": family}})
            elif leak:
                comparisons.append({"prompt": dressed, "chosen": reply, "rejected": leak,
                                    "reason": "the operator's forbidden behaviour is refused, whatever its framing",
                                    "meta": {"type": "safety", "goal": goal, "family": family}})
    rng.shuffle(sft)
    rng.shuffle(comparisons)
    with atomic_output_dir(out, force) as tmp:
        for name, rows in (("sft.jsonl", sft), ("comparisons.jsonl", comparisons)):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"sft": len(sft), "comparisons": len(comparisons), "out": str(Path(out))}
