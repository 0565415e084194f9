"""The backing store of offloaded experts: one expert's slices read straight from the safetensors
file into owned, preallocated buffers with `os.preadv` (no memory map, so the file's page cache is
never counted in this process's resident set).

An expert is the e-th slice of each of a layer's stacked tensors: float `w13` [E, H, D] and `w2`
[E, D, F], or the buffers of quantized experts (`qw13.q`, `qw13.scale`, ... [E, ...], any dtype).

Shape legend: E experts, H = 2F fused gate/up rows, D model dim, F expert hidden dim.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from moekit.errors import MoekitError

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "U8": torch.uint8}
FLOAT_PARTS = ("w13", "w2")


def read_header(path: str | Path) -> tuple[dict, int]:
    """safetensors header {name: {dtype, shape, data_offsets}} and the byte offset of the data block."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class ExpertStore:
    """Reads expert e's slices of one layer's stacked tensors `prefix.<name>` (default: w13 [H, D]
    and w2 [D, F]) from the file at their byte offsets."""

    def __init__(self, path: str | Path, prefix: str, names: tuple[str, ...] = FLOAT_PARTS):
        self.path = str(path)
        self.names = tuple(names)
        header, base = read_header(path)
        self.parts = []
        E = None
        for name in self.names:
            key = f"{prefix}.{name}"
            if key not in header:
                raise MoekitError(f"{path}: tensor {key!r} not found; is this the model's own safetensors file?")
            h = header[key]
            if h["dtype"] not in _DTYPES:
                raise MoekitError(f"{path}: {key} has dtype {h['dtype']}; offloading reads F32/BF16/F16 experts "
                                  "or I8/U8 quantized codes with their scales")
            if E is not None and h["shape"][0] != E:
                raise MoekitError(f"{path}: {key} stacks {h['shape'][0]} experts, {prefix}.{self.names[0]} {E}")
            dt = _DTYPES[h["dtype"]]
            E, *rest = h["shape"]
            per = (h["data_offsets"][1] - h["data_offsets"][0]) // E
            self.parts.append((base + h["data_offsets"][0], per, dt, tuple(rest)))
        self.num_experts = E
        self.dtype = self.parts[0][2]
        self.expert_bytes = sum(p[1] for p in self.parts)
        self.fd = os.open(self.path, os.O_RDONLY)

    def alloc(self) -> tuple[torch.Tensor, ...]:
        """An empty slot: owned buffers for one expert's slice of each part (w13 and w2)."""
        return tuple(torch.empty(shape, dtype=dt) for _, _, dt, shape in self.parts)  # type: ignore[return-value]

    def read_into(self, e: int, slot: tuple[torch.Tensor, ...]) -> int:
        """Fill `slot` with expert e's weights; returns the bytes read."""
        total = 0
        for (start, per, _, _), buf in zip(self.parts, slot):
            mv = memoryview(buf.view(-1).view(torch.uint8).numpy())
            off, done = start + e * per, 0
            while done < per:  # preadv may return short reads
                n = os.preadv(self.fd, [mv[done:]], off + done)
                if n <= 0:
                    raise MoekitError(f"{self.path}: short read of expert {e} (file truncated?)")
                done += n
            total += per
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
