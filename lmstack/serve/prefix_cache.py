"""Prefix caching: the keys/values of prompt prefixes already seen, copied into a slot instead
of being prefilled again (an assistant's system prompt and knowledge, a chat template's head).

A prompt is cut into blocks of `block` tokens (vLLM's scheme); block i is named by a hash of
its tokens and of block i-1's name, so a name stands for the whole prefix up to it, at
positions 0.. (a prefix's keys/values do not depend on what follows it: attention is causal).
Each block's keys and values, all layers, are one tensor [n_layer, 2, n_kv_head, block, head_dim]
(3, not 2, with smeared keys: their raw keys too, `Attention.caches`). The store is bounded in bytes and evicts the least recently used block; a hit
touches its blocks from the last to the first, and a new prompt's blocks go in from the last to
the first, so the head of a prefix is always fresher than its tail and a tail goes first (a
block whose parent is gone could never be reached again).

The last token of a prompt is always prefilled (its logits start the reply), so at most
(len - 1) // block blocks are read; every full block is stored once the prompt is prefilled.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def _attn(model) -> list:
    return [layer.self_attn for layer in model.layers]


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = 16):
        if block < 1:
            raise ValueError("a prefix-cache block holds at least one token")
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.stats = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    def _names(self, prompt: list[int], n_blocks: int):
        """The names of the first n_blocks blocks of `prompt`, one after another."""
        h = b""
        for i in range(n_blocks):
            chunk = prompt[i * self.block:(i + 1) * self.block]
            h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
            yield h

    def match(self, prompt: list[int]) -> list[bytes]:
        """The names of the cached blocks that start `prompt` (its longest cached prefix)."""
        found = []
        for name in self._names(prompt, (len(prompt) - 1) // self.block):
            if name not in self.blocks:
                break
            found.append(name)
        return found

    def load(self, model, prompt: list[int], slot: int, found: list[bytes] | None = None) -> int:
        """Copy the longest cached prefix of `prompt` (or the blocks `found` by `match`) into
        KV-cache row `slot`; its length in tokens."""
        if found is None:
            found = self.match(prompt)
        else:  # found earlier: what is still cached of it, up to the first block gone
            found = found[:next((i for i, n in enumerate(found) if n not in self.blocks), len(found))]
        self.stats["lookups"] += 1
        if not found:
            return 0
        for name in reversed(found):  # the head ends freshest
            self.blocks.move_to_end(name)
        kv = torch.cat([self.blocks[n] for n in found], dim=3)
        n = kv.shape[3]
        for i, a in enumerate(_attn(model)):
            for t, block in zip(a.caches(), kv[i]):
                t[slot, :, :n] = block
        self.stats["hits"] += 1
        self.stats["hit_tokens"] += n
        return n

    def store(self, model, prompt: list[int], slot: int) -> None:
        """Keep the full blocks of `prompt` (prefilled into row `slot`) that are not kept yet."""
        names = list(self._names(prompt, len(prompt) // self.block))
        new = [i for i, name in enumerate(names) if name not in self.blocks]
        if not new:
            return
        start, end = new[0] * self.block, len(names) * self.block
        kv = torch.stack([torch.stack([t[slot, :, start:end] for t in a.caches()]) for a in _attn(model)])
        for i in reversed(new):  # the tail first: the head ends freshest
            block = kv[:, :, :, (i - new[0]) * self.block:(i - new[0] + 1) * self.block].clone()
            size = block.numel() * block.element_size()
            if size > self.max_bytes:
                return
            self.blocks[names[i]] = block
            self.bytes += size
            self.stats["stored_blocks"] += 1
            self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.numel() * block.element_size()
            self.stats["evicted_blocks"] += 1

    @property
    def load_stats(self) -> dict:
        return {**self.stats, "blocks": len(self.blocks), "bytes": self.bytes}
