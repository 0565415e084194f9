"""`moekit plan`: size a model before downloading it or buying hardware."""

from __future__ import annotations

import json as _json
from pathlib import Path
from typing import Literal

from moekit.plan.spec import PlanError


def plan_cli(model: str, hardware: str = "h100-80gb", batch: list[int] | None = None, context: int = 4096,
             dtype: Literal["bf16", "fp8", "int8", "int4"] = "bf16",
             kv_dtype: Literal["bf16", "fp8", "fp32"] = "bf16",
             devices: int | None = None, reserve_gib: float | None = None, mem_gib: float | None = None,
             bandwidth_gbs: float | None = None, tflops: float | None = None, telemetry: str | None = None,
             plot: str | None = None, out: str | None = None, json: bool = False, remeasure: bool = False) -> int:
    """Plan capacity for an MoE (or dense) model: parameters, FLOPs, memory, devices and speed bounds.

    Prints total and active parameters by component, forward FLOPs per token (and for the dense
    model with equal active parameters), weight memory at bf16/fp8/int8/int4, KV-cache bytes per
    token, the fewest devices that hold weights + KV + a reserve with a suggested expert-parallel
    layout, and roofline lower bounds for a decode step at each batch size and for prefill.

    Args:
        model: a preset name (e.g. mixtral-8x7b, deepseek-v3, qwen3-30b-a3b), a moekit config.json, or a
            Hugging Face config.json (file or directory).
        hardware: h100-80gb, h200-141gb, a100-40gb, a100-80gb, l40s, rtx-4090, mi300x, this-cpu (measured,
            cached in ~/.cache/moekit), cpu or custom (give --mem-gib, --bandwidth-gbs, --tflops).
        batch: decode batch sizes (sequences decoding together); default 1 8 64.
        context: tokens of context per sequence (KV cache size, attention cost).
        dtype: weight precision (int8/int4 include group-wise scales, 128 weights per group).
        kv_dtype: KV-cache precision.
        devices: device count for the speed bounds (default: the fewest that fit the largest batch, rounded
            up to a power of two).
        reserve_gib: memory kept free per device for activations and the runtime (default 10% of it).
        mem_gib: memory per device in GiB (overrides the hardware preset).
        bandwidth_gbs: memory read bandwidth in GB/s (overrides the hardware preset).
        tflops: bf16 matmul peak in TFLOP/s (overrides the hardware preset).
        telemetry: moekit routing telemetry (JSONL with layers[].counts): use the measured expert
            distribution instead of uniform routing.
        plot: write a PNG of weight memory vs FLOPs per token for the real-model presets, their dense twins
            and this model.
        out: also write the plan as JSON to this file.
        json: print JSON instead of tables.
        remeasure: measure this-cpu again instead of using the cached numbers.
    """
    from moekit import resolve_config
    from moekit.checkpoint.native import atomic_write_text
    from moekit.plan.hardware import get_hardware
    from moekit.plan.report import build_plan, plot_presets, print_plan

    batches = list(batch) if batch else [1, 8, 64]
    if devices is not None and devices < 1:
        raise PlanError(f"--devices must be >= 1, got {devices}")
    try:
        cfg = resolve_config(model)
    except KeyError as e:  # an HF config.json without a field its architecture needs
        raise PlanError(f"{model}: config.json has no {e} field, which its architecture needs; add it (see the "
                        "model's published config.json) or pass a preset name") from None
    hw = get_hardware(hardware, mem_gib, bandwidth_gbs, tflops, remeasure)
    plan = build_plan(cfg, hw, batches, context, dtype, kv_dtype, devices, reserve_gib, telemetry)
    plan["warnings"] += _hf_parts_not_counted(model)
    if out:
        atomic_write_text(out, _json.dumps(plan, indent=2))
    if plot:
        plan["plot"] = str(plot_presets(plot, context, cfg))
    if json:
        print(_json.dumps(plan, indent=2))
    else:
        print_plan(plan)
        if plot:
            print(f"plot written to {plan['plot']}")
    return 0


def _hf_parts_not_counted(model: str) -> list[str]:
    """Parts of an HF checkpoint that a text-decoder `ModelConfig` leaves out (the presets count
    them as extras; a raw config.json only gets this note)."""
    p = Path(model)
    f = p / "config.json" if p.is_dir() else p
    try:
        d = _json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return []
    out = []
    if isinstance(d, dict) and d.get("vision_config"):
        out.append("the checkpoint's vision tower is not counted (text decoder only)")
    if isinstance(d, dict) and d.get("num_nextn_predict_layers"):
        out.append(f"{d['num_nextn_predict_layers']} multi-token-prediction layer(s) on the hub are not counted "
                   "(not needed for ordinary decoding)")
    return out
