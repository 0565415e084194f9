"""Write a moekit model as a Hugging Face directory that `AutoModelForCausalLM.from_pretrained`
loads with the same logits: config.json, safetensors (sharded with an index when large) and
tokenizer.json when the model carries one.

The architecture is the one the model was imported from when it still fits, else the closest
registered layout that expresses the model exactly (`hf_family.EXPORT_ORDER`: Mixtral for a
top-k-softmax router without shared experts, Qwen3-MoE / Qwen2-MoE / OLMoE otherwise, Llama /
Qwen2 for dense models). When none fits, the error lists why each candidate was rejected.
Tensors are written in the per-expert layout `save_pretrained` itself writes, which every
transformers version and most other tools read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moekit.checkpoint.hf_config import HFArchitecture, architectures
from moekit.checkpoint.hf_pieces import export_with_plan
from moekit.checkpoint.native import CheckpointError, atomic_write, atomic_write_text
from moekit.config import ConfigError, ModelConfig

INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(s: str | int) -> int:
    """'5GB', '200MiB', '1000' -> bytes."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]I?B|B)?\s*", s.upper())
    if not m:
        raise ConfigError(f"--max-shard-size: cannot parse {s!r}; use e.g. 5GB or 500MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def choose_architecture(cfg: ModelConfig, name: str | None = None) -> tuple[HFArchitecture, dict]:
    """(architecture, HF config dict) for exporting `cfg`; raises ConfigError when none fits."""
    from moekit.checkpoint.hf_family import EXPORT_ORDER

    if cfg.moe is not None and cfg.moe.hyper_dim:
        raise ConfigError("no Hugging Face architecture has HyperMoE's hypernetwork (moe.hyper_dim > 0); keep the "
                          "model in moekit's native format (`moekit convert --to moekit`)")
    regs = architectures()
    if name is not None:
        if name not in regs or regs[name].export_config_fn is None:
            ok = sorted(n for n, a in regs.items() if a.export_config_fn)
            raise ConfigError(f"--arch: cannot export as {name!r}; exportable: {', '.join(ok)}")
        return regs[name], regs[name].export_config_fn(cfg)
    origin = re.search(r"\((\w+ForCausalLM)\)$", cfg.source or "")
    order = ([origin.group(1)] if origin else []) + list(EXPORT_ORDER)
    order += sorted(n for n in regs if n not in order)
    reasons = []
    for n in dict.fromkeys(order):
        a = regs.get(n)
        if a is None or a.export_config_fn is None:
            continue
        try:
            return a, a.export_config_fn(cfg)
        except ConfigError as e:
            reasons.append(f"{n}: {e}")
    raise ConfigError("no Hugging Face architecture can express this model exactly:\n  " + "\n  ".join(reasons))


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def export_hf(model, out: str | Path, arch: str | None = None, dtype: torch.dtype | None = None,
              max_shard_size: str | int = "5GB") -> Path:
    """Write `model` to directory `out` in Hugging Face format; returns the directory."""
    # Plan: 1. pick the architecture and its config.json; 2. moekit tensors -> HF names/layout;
    # 3. shards (+ index) written atomically, config last; 4. tokenizer.json if present.
    out = Path(out)
    cfg = model.config
    if cfg.moe_layer_experts:
        raise CheckpointError("this model has a different expert count per layer (moekit prune --per-layer-budget); "
                              "Hugging Face MoE configs have one num_experts: keep it in moekit's format, or prune "
                              "with the same count in every layer to export")
    a, hf_cfg = choose_architecture(cfg, arch)
    q = getattr(model, "quant_config", None)
    if q is not None:
        # Quantized weights leave as they are held: only a layout with that format can take them
        # (gpt-oss MXFP4). The plan reads the format from the config, as a loader would.
        from moekit.checkpoint.hf_gpt_oss import MXFP4_HF_CONFIG

        hf_cfg = {**hf_cfg, "quantization_config": dict(MXFP4_HF_CONFIG)} if q.scheme == "mxfp4" else hf_cfg
    plan = a.plan_fn(cfg, hf_cfg, None)
    missing = sorted(set(plan) - set(model.state_dict()))
    if missing:
        raise CheckpointError(f"{a.name} has no Hugging Face layout for this model's quantized weights "
                              f"({missing[0]} ...): export the float model, or use `moekit convert --to gguf`")
    tensors = export_with_plan(model, plan, dtype)
    dt = next(iter(tensors.values())).dtype
    hf_cfg = {**hf_cfg, "torch_dtype": str(dt).removeprefix("torch.")}
    shards = _shards(tensors, parse_size(max_shard_size))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "moekit": "1"}
    if len(shards) == 1:
        atomic_write(out / "model.safetensors", lambda tmp: save_file(shards[0], tmp, metadata=meta))
    else:
        n = len(shards)
        weight_map = {}
        for i, sh in enumerate(tqdm(shards, desc="writing shards", unit="shard", leave=False), 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            atomic_write(out / fname, lambda tmp, sh=sh: save_file(sh, tmp, metadata=meta))
            weight_map.update({k: fname for k in sh})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_text(out / INDEX_NAME, json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=2))
    atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2))
    _remove_stale(out, {f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)}
                  if len(shards) > 1 else {"model.safetensors"})
    tok = getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "to_str"):
        atomic_write_text(out / "tokenizer.json", tok.to_str())
    return out


def _remove_stale(out: Path, keep: set[str]) -> None:
    # A previous export into the same directory must not leave weights a loader would pick up.
    for f in out.glob("model*.safetensors"):
        if f.name not in keep:
            f.unlink()
    if "model.safetensors" in keep and (out / INDEX_NAME).exists():
        (out / INDEX_NAME).unlink()


def check_exportable(cfg: ModelConfig) -> str:
    """The HF architecture name `cfg` would export as (raises CheckpointError if none)."""
    try:
        return choose_architecture(cfg)[0].name
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


__all__ = ["check_exportable", "choose_architecture", "export_hf", "parse_size"]
