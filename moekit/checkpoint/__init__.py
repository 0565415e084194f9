"""Checkpoint formats: moekit native (safetensors + config.json); Hugging Face import/export."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.checkpoint.native import CheckpointError, is_native, load_native, save_model
from moekit.config import ModelConfig


def config_from_path(path: str | Path) -> ModelConfig:
    """Read a moekit or Hugging Face config.json (a file or the directory holding it)."""
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.is_file():
        raise CheckpointError(f"{f}: no config.json found")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if "moekit_version" in d:
        d.pop("quantization", None)  # a quantized checkpoint (moekit.quant): same model config
        return ModelConfig.from_dict(d)
    try:
        from moekit.checkpoint.hf_config import config_from_hf
    except ImportError:
        raise CheckpointError(f"{f}: not a moekit config (no `moekit_version`) and Hugging Face import is unavailable")
    return config_from_hf(d, source=str(f))


def load_any(path: str | Path, dtype=None, device="cpu"):
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if is_native(p):
        return load_native(p, dtype=dtype, device=device)
    if (p / "checkpoints").is_dir() and not (p / "config.json").is_file():
        # A `moekit train` run directory: its newest complete checkpoint.
        from moekit.train.state import latest_checkpoint

        ck = latest_checkpoint(p)
        if ck is None:
            raise CheckpointError(f"{p}: a training run with no complete checkpoint yet")
        model = load_native(ck, dtype=dtype, device=device)
        if (ck / "tokenizer.json").is_file():  # the edge tokenizer travels with the run's checkpoint
            from tokenizers import Tokenizer

            model.tokenizer = Tokenizer.from_file(str(ck / "tokenizer.json"))
        return model
    if p.is_file() and p.suffix == ".gguf":
        from moekit.checkpoint.gguf import load_gguf

        return load_gguf(p, dtype=dtype, device=device)
    if (p / "config.json").is_file():
        from moekit.checkpoint.hf import load_hf

        return load_hf(p, dtype=dtype, device=device)
    raise CheckpointError(f"{p}: not a model directory (no config.json) and not a .gguf file")


__all__ = ["CheckpointError", "config_from_path", "load_any", "load_native", "save_model"]
