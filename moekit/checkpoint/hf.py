"""Load a Hugging Face model directory (config.json + safetensors, optionally sharded) as a moekit
`Transformer`, with its `tokenizer.json` when present.

Loading streams: the model is built on the meta device (no random init, no memory), each moekit
tensor is allocated once in its final dtype and filled piece by piece from the checkpoint
(`hf_pieces.load_with_plan`), so per-expert matrices stack into `[E, 2F, D]` without a second full
copy. Tensors are read with positioned reads straight from the file rather than through a memory
map: with safetensors 0.8 a mapped file's pages stay resident (and count in RSS) until the file
is closed, which measured at 2.0x the model size for a single-file checkpoint; plain reads keep the
peak at the model plus one source tensor (benchmarks/hf_load_memory.py). The safetensors header
is still validated by `safetensors.safe_open` first. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from moekit.checkpoint.hf_config import config_from_hf, get_architecture
from moekit.checkpoint.hf_pieces import build_meta, finish, load_with_plan
from moekit.checkpoint.native import CheckpointError
from moekit.config import ConfigError

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class SafetensorsReader:
    """Tensor names, shapes and contents of a single or index-sharded safetensors checkpoint.

    Same interface as `hf_pieces.ShardedReader` (`path`, `where`, `keys()`, `shape()`, `get()`),
    reading each tensor with one positioned read into a fresh tensor instead of a memory map.
    """

    def __init__(self, path: Path):
        self.path = path
        index = path / INDEX_NAME
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            files = sorted({path / f for f in wm.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in path.glob("*.bin"))
                hint = (f" (found {bins[:3]}: pickled PyTorch weights are never loaded, since unpickling can run "
                        "code; convert them with transformers: `AutoModelForCausalLM.from_pretrained(dir)"
                        ".save_pretrained(out)` which writes safetensors)") if bins else ""
                raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
            wm = None
        self.header: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            for k, info in self._read_header(f).items():
                self.header[k] = (f, *info)
        if wm is not None:
            for k, f in wm.items():
                if k in self.header and self.header[k][0] != path / f:
                    raise CheckpointError(f"{index}: tensor {k!r} is listed in {f} but stored in "
                                          f"{self.header[k][0].name}; re-save the checkpoint")
        self.where = {k: v[0] for k, v in self.header.items()}

    @staticmethod
    def _read_header(f: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        """Validate with safetensors, then parse the (8-byte length + JSON) header for offsets."""
        if not f.is_file():
            raise CheckpointError(f"{f}: shard listed in {INDEX_NAME} is missing; re-download the checkpoint")
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: not a readable safetensors file ({e}); the file may be truncated, "
                                  "re-save or re-download it") from None
        size = f.stat().st_size
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            meta = json.loads(fh.read(n))
        out = {}
        for k, info in meta.items():
            if k == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise CheckpointError(f"{f}: tensor {k!r} has dtype {info['dtype']} that moekit cannot load")
            a, b = info["data_offsets"]
            if 8 + n + b > size:
                raise CheckpointError(f"{f}: tensor {k!r} extends past the end of the file; the file is truncated, "
                                      "re-download it")
            out[k] = (_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + a, b - a)
        return out

    def keys(self) -> set[str]:
        return set(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.header[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self.header[key][1]

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or only entry `index` of its leading dim (a contiguous byte range)."""
        if key not in self.header:
            raise CheckpointError(f"{self.path}: missing tensor {key!r}")
        f, dtype, shape, offset, nbytes = self.header[key]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CheckpointError(f"{f}: tensor {key!r} has shape {shape}, no entry {index} in its first dim")
            nbytes //= shape[0]
            offset += index * nbytes
            shape = shape[1:]
        t = torch.empty(shape, dtype=dtype)
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
        if len(buf) != nbytes:
            raise CheckpointError(f"{f}: tensor {key!r} has {nbytes} bytes, its shape {shape} needs {len(buf)}")
        fd = os.open(f, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buf[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{f}: tensor {key!r} cannot be read; the file is truncated")
                done += got
        finally:
            os.close(fd)
        return t


def read_hf_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face model directory")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` from `tokenizer.json` in a model directory (or beside a file),
    or None when there is none."""
    p = Path(path)
    f = (p if p.is_dir() else p.parent) / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # a broken tokenizer is reported, not fatal for the weights
        warnings.warn(f"{f}: tokenizer not loaded ({e})", stacklevel=2)
        return None


def load_hf(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"):
    """Load a Hugging Face checkpoint directory as a moekit `Transformer` (eval mode).

    dtype: None keeps the checkpoint's dtype (bf16 stays bf16); else cast while reading.
    The tokenizer, if `tokenizer.json` is present, is attached as `model.tokenizer`.
    """
    # Plan: 1. config.json -> architecture + ModelConfig; 2. index the safetensors headers;
    # 3. tensor plan (layout chosen from the names present); 4. meta build + streamed fill;
    # 5. buffers, device, tokenizer.
    path = Path(path)
    d = read_hf_config(path)
    src = str(path / "config.json")
    try:
        arch = get_architecture(d, src)
        cfg = config_from_hf(d, src)
    except ConfigError as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(src) else f"{src}: {msg}") from None
    reader = SafetensorsReader(path)
    keys = reader.keys()
    plan = arch.plan_fn(cfg, d, keys)
    model = arch.build_fn(cfg, d, keys) if arch.build_fn is not None else build_meta(cfg)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        first = next(iter(plan.values()))[0].hf_key
        dtype = (reader.dtype(first) if hasattr(reader, "dtype") else reader.get(first).dtype) \
            if first in keys else torch.float32

    def ignore(k: str) -> bool:
        # A tied checkpoint may still store the head; the embedding is what the model uses.
        return (cfg.tie_embeddings and k == "lm_head.weight") or bool(arch.ignore_fn and arch.ignore_fn(k))

    load_with_plan(model, plan, reader, dtype, ignore)
    model = finish(model, device)
    tok = load_tokenizer(path)
    if tok is not None:
        model.tokenizer = tok
    return model


__all__ = ["SafetensorsReader", "load_hf", "load_tokenizer", "read_hf_config"]
