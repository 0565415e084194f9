"""Small shared helpers."""

from __future__ import annotations

import torch
from torch import nn


class Fp32Buffers(nn.Module):
    """Module whose buffers named in `_fp32_buffers` follow `.to(device)` but never change dtype.

    Used for values whose precision decides behaviour rather than just rounding: the router's
    selection bias (accumulates tiny +-gamma steps) and RoPE frequencies (angles up to 1e5 rad).
    """

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: self._buffers.pop(n) for n in self._fp32_buffers if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        if kept:
            device = fn(torch.zeros(1)).device  # where the module is going
            for n, b in kept.items():
                self._buffers[n] = b.to(device=device, dtype=torch.float32)
        return out


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def retain_freed_memory(on: bool = True) -> bool:
    """Keep freed memory in the process instead of handing it back to the OS.

    A training step allocates and frees the same large activations, logits and gradients every
    step; so does each prefill. glibc serves blocks above its mmap threshold (at most 32 MiB) with
    a fresh mmap and unmaps them on free, so every step pays a page fault per 4 KiB of them again
    (measured on a 2-core VM: 168 ms to first-touch one 134 MB float32 logits copy, against ~5 ms
    to copy it). With `on`:

    1. glibc serves large blocks from its heap and never trims it (mallopt);
    2. where moekit's compiled CPU kernels are built, torch's CPU allocator becomes a caching one
       (`moekit/kernels/alloc_cpu.cpp`): freed tensors of 1 MiB and more are kept by size class and
       reused, 2 MiB aligned with transparent huge pages advised. The glibc heap alone still
       fragments as per-expert buffer sizes change each step and keeps faulting fresh pages in
       (4,000-37,000 faults per small-moe step, in bursts). At most MOEKIT_CPU_CACHE_LIMIT_MB
       (default 4096, or a quarter of RAM if less) is held free; `moekit.kernels.cpu_cache_empty()`
       returns it.

    `moekit train` and the inference engine call this; MOEKIT_RETAIN_MEMORY=0 opts out. `on=False`
    sets glibc's usual steady state again and puts torch's previous allocator back. Returns
    whether step 1 applied (False where it cannot: not glibc).
    """
    import ctypes
    import os
    import sys

    if on and os.environ.get("MOEKIT_RETAIN_MEMORY", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    from moekit import kernels

    kernels.cpu_cache(on)
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    if on:
        ok = mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    else:
        ok = (mallopt(_M_MMAP_MAX, 65536) and mallopt(_M_MMAP_THRESHOLD, 32 << 20)
              and mallopt(_M_TRIM_THRESHOLD, 64 << 20))
    return bool(ok)
