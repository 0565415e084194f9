"""A per-layer cache of expert weights under a byte budget, LRU or LFU, safe to fill from a
prefetch thread while the main thread computes.

The cache owns `capacity` slots (buffers for one expert each, allocated on first use), so the
resident expert bytes are at most capacity x expert bytes <= the layer's budget by construction.
An entry is pinned while an expert computes on it and unevictable while it loads.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from moekit.memory.store import ExpertStore


@dataclass
class _Entry:
    slot: int
    ready: threading.Event = field(default_factory=threading.Event)
    pins: int = 0
    prefetched: bool = False
    used: bool = False


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    stall_s: float = 0.0
    """Main-thread time spent waiting for expert weights (demand reads and unfinished prefetches)."""
    prefetch_loads: int = 0
    prefetch_used: int = 0
    predicted: int = 0
    predicted_right: int = 0
    needed: int = 0
    max_resident_bytes: int = 0


class ExpertCache:
    def __init__(self, store: ExpertStore, capacity: int, policy: str = "lru"):
        self.store, self.capacity, self.policy = store, capacity, policy
        self.entries: "OrderedDict[int, _Entry]" = OrderedDict()
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.free: list[int] = []
        self.freq = [0] * store.num_experts
        self.lock = threading.Lock()
        self.stats = CacheStats()
        self.prediction: set[int] | None = None

    @property
    def resident_bytes(self) -> int:
        return len(self.slots) * self.store.expert_bytes

    def _victim(self) -> int | None:
        cands = [e for e, ent in self.entries.items() if ent.pins == 0 and ent.ready.is_set()]
        if not cands:
            return None
        if self.policy == "lfu":
            return min(cands, key=lambda e: self.freq[e])  # min is stable: ties go to the least recent
        return cands[0]

    def _reserve(self, e: int) -> _Entry | None:
        """Under the lock: a slot for e (free, new, or evicted), or None when every entry is busy."""
        if self.free:
            slot = self.free.pop()
        elif len(self.slots) < self.capacity:
            self.slots.append(self.store.alloc())
            slot = len(self.slots) - 1
            self.stats.max_resident_bytes = max(self.stats.max_resident_bytes, self.resident_bytes)
        else:
            v = self._victim()
            if v is None:
                return None
            slot = self.entries.pop(v).slot
        ent = _Entry(slot)
        self.entries[e] = ent
        return ent

    def _load(self, e: int, ent: _Entry) -> None:
        n = self.store.read_into(e, self.slots[ent.slot])
        with self.lock:
            self.stats.bytes_read += n
        ent.ready.set()

    def acquire(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's weights, loaded if needed; pinned until `release(e)`."""
        t0 = time.perf_counter()
        while True:
            with self.lock:
                self.freq[e] += 1
                ent = self.entries.get(e)
                load = False
                if ent is not None:
                    self.entries.move_to_end(e)
                    self.stats.hits += 1
                    if not ent.used:  # first use of a prefetched expert: the prefetch paid off
                        self.stats.prefetch_used += ent.prefetched
                    ent.used = True
                    ent.pins += 1
                    break
                ent = self._reserve(e)
                if ent is not None:
                    self.stats.misses += 1
                    ent.used, ent.pins, load = True, 1, True
                    break
                busy = [x for x in self.entries.values() if not x.ready.is_set()]
            if busy:  # every slot is loading (prefetch): wait for one, then evict it
                busy[0].ready.wait()
            else:
                raise RuntimeError("expert cache: every slot is pinned (capacity too small for one expert)")
            self.freq[e] -= 1
        if load:
            self._load(e, ent)
        else:
            ent.ready.wait()
        dt = time.perf_counter() - t0
        with self.lock:
            self.stats.stall_s += dt if (load or dt > 1e-4) else 0.0
        return self.slots[ent.slot]

    def release(self, e: int) -> None:
        with self.lock:
            self.entries[e].pins -= 1

    def contains_ready(self, e: int) -> bool:
        ent = self.entries.get(e)
        return ent is not None and ent.ready.is_set()

    def prefetch(self, experts: list[int]) -> None:
        """Load `experts` (most likely first) if absent, without evicting a pinned or loading entry
        or another expert of this list; called from the prefetch thread."""
        want = experts[: self.capacity]
        for e in want:
            with self.lock:
                if e in self.entries:
                    self.entries.move_to_end(e)
                    continue
                # Protect the other predicted experts from eviction by this prefetch.
                for o in want:
                    if o in self.entries:
                        self.entries[o].pins += 1
                try:
                    ent = self._reserve(e)
                finally:
                    for o in want:
                        if o in self.entries and o != e:
                            self.entries[o].pins -= 1
                if ent is None:
                    return
                ent.prefetched = True
                self.stats.prefetch_loads += 1
            self._load(e, ent)

    def observe_needed(self, needed: set[int]) -> None:
        """Score the last prediction for this layer against the experts this forward needs."""
        with self.lock:
            self.stats.needed += len(needed)
            if self.prediction is not None:
                self.stats.predicted += len(self.prediction)
                self.stats.predicted_right += len(self.prediction & needed)
            self.prediction = None
