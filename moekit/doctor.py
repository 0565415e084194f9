"""`moekit doctor`: what this machine is and what moekit will do on it.

The same facts open `moekit bench` and `moekit compare` reports, so every published number carries
the CPU, the ISA tier, whether bf16 was native and the compute dtype it actually ran with.
"""

from __future__ import annotations

import json as _json
import os
import platform
from typing import Any

import torch

from moekit.kernels import isa


def _kernel_facts(build: bool) -> dict[str, Any]:
    from moekit import kernels

    out: dict[str, Any] = {"switched_off": os.environ.get("MOEKIT_KERNELS", "1").strip().lower()
                           in ("0", "false", "off", "no")}
    if build:
        out["built"] = bool(kernels.available())
    out["tier"] = kernels.tier() if build else isa.tier()
    out["error"] = kernels.build_error()
    return out


def _backend_facts(dtype: torch.dtype) -> dict[str, str]:
    """The expert backend each path would pick for a small Mixtral-style layer in `dtype`."""
    from moekit.config import MoEConfig
    from moekit.moe import backends
    from moekit.moe.layer import MoELayer, pack_experts

    torch.manual_seed(0)
    layer = MoELayer(256, MoEConfig(num_experts=8, top_k=2, expert_dim=512)).to(dtype)
    paths = {"training (autograd)": backends.would_use(layer.train(), 4096, grad=True)}
    layer.eval()
    for label, t in (("decode, batch 1", 1), ("decode, batch 8", 8), ("prefill, 512 tokens", 512)):
        paths[label] = backends.would_use(layer, t)
    if pack_experts(layer):
        paths["prefill, 512 tokens, packed experts"] = backends.would_use(layer, 512)
    return paths


def facts(build_kernels: bool = True, backends: bool = True) -> dict[str, Any]:
    """Machine and policy facts as a JSON-able dict (building the kernels first unless told not to)."""
    from moekit import precision

    tiers = isa.supported_tiers()
    auto = precision.auto_dtype("cpu")
    f: dict[str, Any] = {
        "cpu": isa.cpu_model(),
        "machine": platform.machine(),
        "isa_tier": isa.tier(),
        "isa_tier_forced": isa.forced(),
        "isa_tiers_available": tiers,
        "MOEKIT_CPU_ISA": os.environ.get(isa.ENV, "auto"),
        "library_caps": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                         if k in os.environ},
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": precision.bf16_native("cpu"),
        "auto_compute_dtype": str(auto).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "kernels": _kernel_facts(build_kernels),
    }
    if torch.cuda.is_available():
        f["cuda"] = {"device": torch.cuda.get_device_name(), "bf16_native": precision.bf16_native("cuda"),
                     "auto_compute_dtype": str(precision.auto_dtype("cuda")).removeprefix("torch.")}
    if backends:
        f["expert_backends"] = _backend_facts(auto)
    return f


def summary_line(f: dict[str, Any]) -> str:
    """One line for report headers."""
    k = f["kernels"]
    kern = f"kernels {k['tier']}" if k.get("built", k["tier"] != "off") else "kernels off"
    return (f"{f['cpu']}, {f['logical_cpus']} logical CPUs, {f['threads']} threads; ISA tier {f['isa_tier']}"
            f"{' (forced)' if f['isa_tier_forced'] else ''} of {', '.join(f['isa_tiers_available']) or 'none'}; "
            f"bf16 native: {'yes' if f['bf16_native'] else 'no'}; auto compute dtype {f['auto_compute_dtype']}; "
            f"{kern}; torch {f['torch']} ({f['torch_cpu_capability']})")


def markdown(f: dict[str, Any]) -> str:
    rows = [("CPU", f["cpu"]), ("ISA tier", f["isa_tier"] + (" (forced by MOEKIT_CPU_ISA)" if f["isa_tier_forced"] else "")),
            ("tiers available", ", ".join(f["isa_tiers_available"]) or "none (not x86: PyTorch ops)"),
            ("torch CPU capability", f"{f['torch_cpu_capability']} (torch {f['torch']})"),
            ("library caps", ", ".join(f"{k}={v}" for k, v in f["library_caps"].items()) or "none"),
            ("bf16 native", "yes" if f["bf16_native"] else "no"),
            ("compute dtype (auto)", f["auto_compute_dtype"]),
            ("kernels", _kernels_text(f["kernels"])),
            ("threads", f"{f['threads']} of {f['logical_cpus']} logical CPUs")]
    if "cuda" in f:
        rows.append(("CUDA", f"{f['cuda']['device']}, auto dtype {f['cuda']['auto_compute_dtype']}"))
    for path, b in f.get("expert_backends", {}).items():
        rows.append((f"experts: {path}", b))
    return "\n".join(["| fact | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]) + "\n"


def _kernels_text(k: dict[str, Any]) -> str:
    if k["switched_off"]:
        return "off (MOEKIT_KERNELS=0)"
    if "built" not in k:
        return f"not checked (--no-build); tier {k['tier']} would be used"
    if k.get("built") is False or k["error"]:
        return f"not built: {(k['error'] or 'no compiled tier for this CPU').splitlines()[0][:200]}"
    return f"built, tier {k['tier']}"


def doctor_cli(json: bool = False, build: bool = True) -> int:
    """Print this machine's CPU, ISA tiers, bf16 support, compute dtype, kernels and expert backends.

    What `auto` precision picks here, which compiled-kernel tier runs (MOEKIT_CPU_ISA forces a lower
    one), whether the kernels built (and why not), and which expert backend each path uses.

    Args:
        json: print JSON instead of a table.
        build: build the compiled kernels if needed (about 30 s once) to report whether they work.
    """
    f = facts(build_kernels=build)
    if json:
        print(_json.dumps(f, indent=1))
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title="moekit doctor", show_header=False)
        for line in markdown(f).splitlines()[2:]:
            a, b = line.strip("|").split(" | ", 1)
            t.add_row(escape(a.strip()), escape(b.strip(" |")))  # "[avx2]" is not rich markup
        Console().print(t)
    return 0
