"""The reference engine's prefix cache: vLLM V1's automatic prefix caching in miniature.

vLLM V1 splits a sequence into blocks of ``block_size`` tokens and names each *full*
block by a hash chained over the block's tokens and its parent block's hash. A new
request reuses the KV of its longest run of cached leading blocks and computes the
rest. Emulated here:

* keys are a SHA-256 chain over block contents only: the weights that computed the
  KV are not part of the key, exactly as in vLLM. After a weight update that does not
  reset the cache (a concurrent update, or ``pause_generation(clear_cache=False)``),
  old entries stay and a matching request reuses KV computed by the old weights;
* a hit never covers the whole prompt: at least the last prompt token is recomputed
  (vLLM caps a hit at ``num_tokens - 1`` so the request gets logits);
* the first block stored under a key wins; recomputing the same block later does not
  replace it (vLLM keeps the existing cached block for a hash);
* least-recently-used blocks are dropped past ``max_blocks`` (vLLM evicts free blocks
  in LRU order when it needs room).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from replay.engines.reference.model import RequestKV

_ROOT = b"replay-prefix-root"


@dataclass
class CachedBlock:
    """KV of one full block, per layer ([kv_heads, block_size, head_dim] each)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]


class PrefixCache:
    """Content-keyed KV blocks shared across requests and generate() calls."""

    def __init__(self, block_size: int = 16, max_blocks: int = 4096):
        self.block_size = block_size        # tokens per block (vLLM's default is 16)
        self.max_blocks = max_blocks        # LRU capacity in blocks
        self._blocks: OrderedDict[bytes, CachedBlock] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Drop every entry (vLLM's ``reset_prefix_cache()``)."""
        self._blocks.clear()

    def _chain(self, tokens: list[int], n_blocks: int) -> list[bytes]:
        keys, parent, bs = [], _ROOT, self.block_size
        for b in range(n_blocks):
            block = tokens[b * bs:(b + 1) * bs]
            parent = hashlib.sha256(parent + b"|" + ",".join(map(str, block)).encode()).digest()
            keys.append(parent)
        return keys

    def peek(self, prompt: list[int]) -> int:
        """How many tokens :meth:`lookup` would serve from the cache now (nothing copied or touched)."""
        usable = (len(prompt) - 1) // self.block_size
        n = 0
        for key in self._chain(prompt, usable):
            if key not in self._blocks:
                break
            n += 1
        return n * self.block_size

    def lookup(self, prompt: list[int], kv: RequestKV) -> int:
        """Copy the longest cached run of leading blocks of ``prompt`` into ``kv``; return its length in tokens."""
        usable = (len(prompt) - 1) // self.block_size
        hit = 0
        for b, key in enumerate(self._chain(prompt, usable)):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            s = b * self.block_size
            for li in range(len(kv.k)):
                kv.k[li][:, s:s + self.block_size] = block.k[li]
                kv.v[li][:, s:s + self.block_size] = block.v[li]
            hit = s + self.block_size
        kv.length = max(kv.length, hit)
        return hit

    def store(self, tokens: list[int], kv: RequestKV) -> int:
        """Cache every full block of ``tokens`` whose KV ``kv`` holds; return how many were new."""
        n_blocks = min(len(tokens), kv.length) // self.block_size
        new = 0
        for b, key in enumerate(self._chain(tokens, n_blocks)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            s = b * self.block_size
            self._blocks[key] = CachedBlock([k[:, s:s + self.block_size].clone() for k in kv.k],
                                            [v[:, s:s + self.block_size].clone() for v in kv.v])
            new += 1
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
        return new
