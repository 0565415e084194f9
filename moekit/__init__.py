"""moekit: build, train, import, shrink, serve and size Mixture-of-Experts LLMs."""

from __future__ import annotations

from pathlib import Path

from moekit import _cpuenv  # noqa: F401  (first: caps oneDNN/ATen/MKL at a forced MOEKIT_CPU_ISA tier)

from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.model.params import ParamCount, count_params, dense_equivalent
from moekit.model.transformer import ModelOutput, Transformer, build_model
from moekit.moe.layer import MoELayer, Routing, pack_experts
from moekit.moe.cost import FlopsMeter, clear_routing_cost, set_routing_cost
from moekit.presets import get_preset, preset_names

__version__ = "0.1.0"


def load_model(path: str | Path, dtype=None, device="cpu"):
    """Load a model directory: moekit's own format, or a Hugging Face checkpoint when supported."""
    from moekit.checkpoint import load_any

    return load_any(path, dtype=dtype, device=device)


def save_model(model: Transformer, path: str | Path, dtype=None) -> Path:
    """Save `model` to directory `path` (config.json + model.safetensors, written atomically)."""
    from moekit.checkpoint.native import save_model as _save

    return _save(model, path, dtype=dtype)


def resolve_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name, a moekit config.json (file or directory), or a Hugging Face config.json."""
    from moekit.checkpoint import config_from_path

    p = Path(name_or_path)
    if not p.exists():
        return get_preset(str(name_or_path))
    return config_from_path(p)


__all__ = [
    "ConfigError", "ModelConfig", "MoEConfig", "ModelOutput", "MoELayer", "ParamCount", "Routing", "Transformer",
    "build_model", "count_params", "dense_equivalent", "get_preset", "load_model", "pack_experts", "preset_names",
    "resolve_config",
    "save_model",
    "FlopsMeter", "clear_routing_cost", "set_routing_cost",
]
