"""Hash-based prefix cache over the slot KV cache: repeated prompt prefixes skip prefill.

vLLM's scheme (block hashing) without its paged cache: a prompt is cut into blocks of `block`
tokens, and block i's key is sha256(key of block i-1 || token ids of block i), so a key names the
whole prefix up to that block. Finished prefills copy their full blocks into a fixed pool of KV
blocks (LRU eviction); a new request copies the longest run of hit blocks into its own slot and
prefills only the rest. Copy in and out costs O(prefix x kv width) per layer, far below the
prefill it saves; a paged cache would share the blocks instead of copying them (not done here).

Shape legend: P pool blocks, Bt tokens per block; the pool mirrors each cache tensor with the
slot dimension replaced by P and the sequence dimension by Bt.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch


def block_keys(ids: list[int], block: int, n_blocks: int) -> list[bytes]:
    keys, prev = [], b""
    arr = np.asarray(ids[:n_blocks * block], dtype=np.int64)
    for i in range(n_blocks):
        prev = hashlib.sha256(prev + arr[i * block:(i + 1) * block].tobytes()).digest()
        keys.append(prev)
    return keys


def _seq_dim(t: torch.Tensor) -> int:
    # Attention caches are [slots, G, M, Dh] (sequence dim 2); MLA's latent ones [slots, M, C].
    return 2 if t.dim() == 4 else 1


class PrefixCache:
    """A pool of `capacity_tokens // block` KV blocks keyed by prefix hash."""

    def __init__(self, cache_layers: list, capacity_tokens: int, block: int = 16):
        self.block = block
        self.capacity = max(0, capacity_tokens // block)
        self.pool: list[tuple[torch.Tensor, ...]] = []
        if self.capacity:
            for st in cache_layers:
                bufs = []
                for t in st:
                    shape = list(t.shape)
                    shape[0], shape[_seq_dim(t)] = self.capacity, block
                    bufs.append(torch.zeros(shape, dtype=t.dtype, device=t.device))
                self.pool.append(tuple(bufs))
        self.index: OrderedDict[bytes, int] = OrderedDict()  # key -> pool block, in LRU order
        self.free = list(range(self.capacity - 1, -1, -1))

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def lookup(self, ids: list[int]) -> list[int]:
        """Pool blocks holding the longest cached prefix of `ids`, leaving at least one token to
        prefill (the last prompt token's logits are needed)."""
        if not self.enabled:
            return []
        n = (len(ids) - 1) // self.block
        hits = []
        for k in block_keys(ids, self.block, n):
            b = self.index.get(k)
            if b is None:
                break
            self.index.move_to_end(k)
            hits.append(b)
        return hits

    def load(self, cache_layers: list, slot: int, blocks: list[int]) -> int:
        """Copy pool blocks into `slot` positions 0.. ; returns the tokens loaded."""
        if not blocks:
            return 0
        idx = torch.tensor(blocks)
        n = len(blocks) * self.block
        for st, pool in zip(cache_layers, self.pool):
            for t, p in zip(st, pool):
                d = _seq_dim(t)
                src = p.index_select(0, idx)  # [nb, ..., Bt, ...]
                if d == 2:  # [nb, G, Bt, Dh] -> [G, nb*Bt, Dh]
                    t[slot, :, :n] = src.permute(1, 0, 2, 3).reshape(src.shape[1], n, src.shape[3])
                else:  # [nb, Bt, C] -> [nb*Bt, C]
                    t[slot, :n] = src.reshape(n, src.shape[2])
        return n

    def store(self, cache_layers: list, slot: int, ids: list[int]) -> int:
        """Copy the full blocks of a prefilled prompt in `slot` into the pool; returns blocks added."""
        if not self.enabled:
            return 0
        added = 0
        for i, k in enumerate(block_keys(ids, self.block, len(ids) // self.block)):
            if k in self.index:
                self.index.move_to_end(k)
                continue
            if not self.free:
                _, old = self.index.popitem(last=False)
                self.free.append(old)
            b = self.free.pop()
            s0, s1 = i * self.block, (i + 1) * self.block
            for st, pool in zip(cache_layers, self.pool):
                for t, p in zip(st, pool):
                    if _seq_dim(t) == 2:
                        p[b] = t[slot, :, s0:s1]
                    else:
                        p[b] = t[slot, s0:s1]
            self.index[k] = b
            added += 1
        return added

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pool in self.pool for p in pool)
