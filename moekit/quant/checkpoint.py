"""Quantized checkpoints: moekit's native layout (config.json + model.safetensors) with the packed
codes, scales and zeros as tensors and a `quantization` section in config.json.

Loading builds the model on the meta device, swaps in empty quantized modules of the right shapes,
then assigns the file's tensors one by one (`native.read_safetensors`): the float experts are never
materialised, so the peak memory of a load is about the file size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from moekit.checkpoint.native import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, atomic_write, atomic_write_text,
                                      materialize_buffers)
from moekit.config import ConfigError, ModelConfig
from moekit.quant.apply import empty_structure, set_compute_dtype
from moekit.quant.config import QuantConfig, QuantError

QUANT_KEY = "quantization"
REPORT_NAME = "quant_calibration.json"
"""Per-expert calibration coverage and weight error, written next to the weights by `quantize`."""


def save_quantized(model, qcfg: QuantConfig, path: str | Path) -> Path:
    """Write a quantized model to directory `path` (weights first, then config, each atomically)."""
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "moekit": "1",
                                                                               "quantization": qcfg.scheme}))
    d = json.loads(model.config.to_json())
    d[QUANT_KEY] = qcfg.to_dict()
    atomic_write_text(path / CONFIG_NAME, json.dumps(d, indent=2))
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, QuantConfig | None]:
    """The model config and (when present) the quantization config of a checkpoint directory."""
    f = Path(path) / CONFIG_NAME
    try:
        d = json.loads(f.read_text())
        q = d.pop(QUANT_KEY, None)
        return ModelConfig.from_dict(d), (None if q is None else QuantConfig.from_dict(q))
    except (OSError, json.JSONDecodeError, ConfigError, QuantError, TypeError) as e:
        raise CheckpointError(f"{f}: {e}") from None


def is_quantized(path: str | Path) -> bool:
    """True for a directory whose config.json has a `quantization` section."""
    try:
        return QUANT_KEY in json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "BOOL": torch.bool}


def read_into(file: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Read a safetensors file tensor by tensor straight into fresh tensors (one `readinto` each):
    no file mapping and no second copy, so the peak memory is the tensors themselves. Names and
    shapes are checked against `expected` as `native.read_safetensors` does."""
    import struct

    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            base = 8 + n
            names = set(header)
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or extra:
                raise CheckpointError(f"{file}: missing tensor(s) {missing[:5]} / unexpected tensor(s) {extra[:5]}; "
                                      "does config.json (its quantization section) match these weights?")
            out = {}
            for k, shape in expected.items():
                h = header[k]
                if tuple(h["shape"]) != tuple(shape) or h["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{file}: tensor {k!r} is {h['dtype']} {tuple(h['shape'])}, "
                                          f"expected shape {tuple(shape)}")
                a, b = h["data_offsets"]
                t = torch.empty(tuple(shape), dtype=_DTYPES[h["dtype"]])
                if t.numel() * t.element_size() != b - a:
                    raise CheckpointError(f"{file}: tensor {k!r} holds {b - a} bytes, its shape needs "
                                          f"{t.numel() * t.element_size()}")
                f.seek(base + a)
                if b > a and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != b - a:
                    raise CheckpointError(f"{file}: tensor {k!r} is cut short; the file is truncated")
                out[k] = t
            return out
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); re-save it") from None


def load_quantized(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a quantized checkpoint directory; `dtype` casts the float parts (norms, router,
    embeddings) and sets the dtype the quantized weights dequantize to."""
    # Plan: 1. configs; 2. the model and its quantized modules on meta (no memory); 3. assign the
    # file's tensors by name with shapes checked; 4. recreate non-persistent buffers.
    from moekit.model.transformer import Transformer

    path = Path(path)
    cfg, qcfg = read_config(path)
    if qcfg is None:
        raise CheckpointError(f"{path / CONFIG_NAME}: no `{QUANT_KEY}` section; load it with moekit.load_model")
    with torch.device("meta"):
        model = Transformer(cfg)
    empty_structure(model, qcfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = read_into(path / WEIGHTS_NAME, expected)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    materialize_buffers(model)
    if dtype is not None:
        model = model.to(dtype)
    set_compute_dtype(model, model.embed.weight.dtype)
    model.quant_config = qcfg
    return model.to(device).eval()
