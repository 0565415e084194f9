"""Accelerator and CPU-host descriptions for the roofline: memory, bandwidth and matmul peaks.

GPU figures are vendor datasheet peaks (dense, no structured sparsity; SXM/OAM parts), memory as
the driver reports it. `this-cpu` is measured on the spot in seconds (`moekit.plan.measure`: read
bandwidth from a 1 GiB sum, time-bounded matmul peaks of GEMMs up to 2048^3 in the dtype bf16 weights
are really computed in, decode-shaped GEMV bandwidth) and cached in
~/.cache/moekit/this-cpu.json; `--remeasure` refreshes it.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moekit.errors import MoekitError

GIB = 2**30


class HardwareError(MoekitError, ValueError):
    """An unknown hardware name or incomplete custom hardware numbers."""


@dataclass(frozen=True)
class Hardware:
    name: str
    mem_gib: float
    """Memory one device holds (GiB)."""
    bandwidth_gbs: float
    """Peak memory read bandwidth (GB/s = 1e9 B/s)."""
    bf16_tflops: float
    """Dense bf16 matmul peak (TFLOP/s)."""
    fp8_tflops: float | None = None
    """Dense fp8 peak; None where the device has no fp8 units (fp8 weights then run at bf16)."""
    kind: str = "gpu"
    source: str = ""
    gemv_bandwidth_gbs: float | None = None
    """Measured hosts only: the weight bandwidth a bf16 decode-shaped (M=1) matmul achieves."""
    fp32_tflops: float | None = None

    def peak_tflops(self, weight_dtype: str) -> float:
        """Compute peak for a weight precision: fp8 runs as fp8 where supported; int8/int4 are
        weight-only formats whose matmuls run in bf16 after dequantisation."""
        if weight_dtype == "fp8" and self.fp8_tflops:
            return self.fp8_tflops
        return self.bf16_tflops

    def to_dict(self) -> dict:
        return asdict(self)


_DS = "vendor datasheet"
PRESETS: dict[str, Hardware] = {
    "h100-80gb": Hardware("h100-80gb", 79.6, 3350, 989.4, 1978.9, source=f"NVIDIA H100 SXM {_DS}"),
    "h200-141gb": Hardware("h200-141gb", 140.4, 4800, 989.4, 1978.9, source=f"NVIDIA H200 SXM {_DS}"),
    "a100-40gb": Hardware("a100-40gb", 40.0, 1555, 312.0, None, source=f"NVIDIA A100 SXM 40GB {_DS}"),
    "a100-80gb": Hardware("a100-80gb", 80.0, 2039, 312.0, None, source=f"NVIDIA A100 SXM 80GB {_DS}"),
    "l40s": Hardware("l40s", 45.0, 864, 362.1, 733.0, source=f"NVIDIA L40S {_DS}"),
    "rtx-4090": Hardware("rtx-4090", 24.0, 1008, 165.2, 330.3, source=f"NVIDIA RTX 4090 {_DS} (fp32 accumulate)"),
    "mi300x": Hardware("mi300x", 192.0, 5300, 1307.4, 2614.9, source=f"AMD Instinct MI300X {_DS}"),
}
HARDWARE_NAMES = (*PRESETS, "this-cpu", "cpu", "custom")


def _cache_path() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "this-cpu.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return float("nan")


def measure_this_cpu(read_gib: float = 1.0, gemm_n: int = 2048, budget_s: float = 6.0) -> Hardware:
    """Measure this host with torch (`moekit.plan.measure`): seconds, not minutes, on 2 cores.

    1. read bandwidth: sum of a `read_gib` fp32 tensor (far beyond the caches);
    2. matmul peaks, each time-bounded by `budget_s` (GEMM sides grow up to gemm_n while they fit):
       fp32, and the dtype bf16 weights are really computed in (`measure.compute_dtype`): bf16 where
       this CPU runs it natively, else fp32, so `bf16_tflops` is then the fp32 peak (a scalar bf16
       GEMM would take minutes to measure and is not what moekit runs);
    3. decode-shaped GEMV: one bf16 row through `read_gib` of weights, via the path moekit's decode
       takes (its compiled kernel when available, else F.linear): what decode weight reads achieve.
    """
    import torch
    from tqdm import tqdm

    from moekit.plan import measure

    mib = max(64, int(read_gib * 1024))
    bf16_as = measure.compute_dtype(torch.bfloat16)
    with tqdm(total=3, desc="measuring this CPU", leave=False) as bar:
        bw = measure.read_bandwidth_gbs(mib, 5)
        bar.update()
        peaks = {torch.float32: measure.matmul_peak_gflops(torch.float32, gemm_n, 3, budget_s) / 1e3}
        if bf16_as not in peaks:
            peaks[bf16_as] = measure.matmul_peak_gflops(bf16_as, gemm_n, 3, budget_s) / 1e3
        bar.update()
        gemv, path = measure.gemv_bandwidth_gbs(mib, 3, budget_s=budget_s)
        bar.update()
    how = "" if bf16_as == torch.bfloat16 else "; bf16 not native here: bf16 weights computed in fp32, bf16 peak = fp32"
    return Hardware("this-cpu", round(_ram_gib(), 2), round(bw, 2), round(peaks[bf16_as], 4), None, kind="cpu",
                    source=f"measured: {_cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                           f"GEMV via {path}{how}",
                    gemv_bandwidth_gbs=round(gemv, 2), fp32_tflops=round(peaks[torch.float32], 4))


def this_cpu(remeasure: bool = False) -> Hardware:
    """The measured host, from the cache when it matches this CPU and thread count."""
    import torch

    from moekit.checkpoint.native import atomic_write_text

    from moekit import kernels
    from moekit.kernels import isa

    # The ISA tier (MOEKIT_CPU_ISA) changes which kernels and compute dtype run: part of the key.
    key = (f"{_cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__} | "
           f"moekit kernels {kernels.available()} | isa {isa.tier()} bf16 native {isa.bf16_native_cpu()}")
    path = _cache_path()
    if not remeasure and path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("key") == key:
                return Hardware(**d["hardware"])
        except (json.JSONDecodeError, TypeError, KeyError):
            pass  # a stale or torn cache: measure again
    hw = measure_this_cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, "hardware": hw.to_dict()}, indent=2))
    return hw


def get_hardware(name: str, mem_gib: float | None = None, bandwidth_gbs: float | None = None,
                 tflops: float | None = None, remeasure: bool = False) -> Hardware:
    """A hardware preset, the measured host, or custom numbers (which also override a preset)."""
    over = {k: v for k, v in (("mem_gib", mem_gib), ("bandwidth_gbs", bandwidth_gbs), ("bf16_tflops", tflops))
            if v is not None}
    for k, v in over.items():
        if v <= 0:
            raise HardwareError(f"--{k.replace('_', '-').replace('bf16-', '')} must be > 0, got {v}")
    if name in PRESETS:
        return replace(PRESETS[name], **over) if over else PRESETS[name]
    if name == "this-cpu":
        hw = this_cpu(remeasure)
        return replace(hw, **over) if over else hw
    if name in ("cpu", "custom"):
        missing = [f"--{f}" for f, v in (("mem-gib", mem_gib), ("bandwidth-gbs", bandwidth_gbs), ("tflops", tflops))
                   if v is None]
        if missing:
            raise HardwareError(f"--hardware {name} needs {', '.join(missing)} (memory per device in GiB, read "
                                "bandwidth in GB/s, bf16 matmul peak in TFLOP/s)")
        return Hardware(name, mem_gib, bandwidth_gbs, tflops, None, kind="cpu" if name == "cpu" else "gpu",
                        source="user-supplied numbers")
    raise HardwareError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE_NAMES)}")
