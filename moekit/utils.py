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
