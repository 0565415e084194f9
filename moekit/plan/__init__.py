"""Capacity planning: parameters, FLOPs, memory, device counts and roofline speed bounds."""

from moekit.plan.hardware import PRESETS as HARDWARE_PRESETS
from moekit.plan.hardware import Hardware, get_hardware, measure_this_cpu
from moekit.plan.report import build_plan, plot_presets, print_plan
from moekit.plan.roofline import (decode_step, devices_needed, expected_distinct, expected_distinct_uniform,
                                  load_telemetry, prefill_bound, suggest_layout)
from moekit.plan.spec import (PUBLISHED, Extra, PlanError, dense_same_total, extras_for, flops_per_token,
                              kv_bytes_per_token, matches_published, param_summary, weight_memory)

__all__ = [
    "HARDWARE_PRESETS", "PUBLISHED", "Extra", "Hardware", "PlanError", "build_plan", "decode_step", "dense_same_total",
    "devices_needed", "expected_distinct", "expected_distinct_uniform", "extras_for", "flops_per_token",
    "get_hardware", "kv_bytes_per_token", "load_telemetry", "matches_published", "measure_this_cpu",
    "param_summary", "plot_presets", "prefill_bound", "print_plan", "suggest_layout", "weight_memory",
]
