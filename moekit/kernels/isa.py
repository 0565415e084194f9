"""CPU instruction-set tiers: what this CPU can run, which tier moekit uses, and whether bf16 is
native here. Pure Python, no torch build needed; every policy that depends on the CPU (the compiled
kernels' tier, the compute dtype, the expert backend) asks this module, so one variable
(`MOEKIT_CPU_ISA`) makes a newer CPU behave like an older one end to end.

Tiers, lowest first (x86 only; elsewhere the only tier is "off" and PyTorch ops run):
- `avx2`: AVX2 + FMA + F16C (Haswell / Zen 1 and later). The required tier.
- `avx512`: AVX-512 F/BW/VL/DQ + VNNI (Ice Lake, Cascade Lake, Zen 4 without BF16 use).
- `avx512bf16`: + AVX512-BF16 (`vdpbf16ps`: Zen 4/5, Cooper Lake, Sapphire Rapids).
- `amx`: + AMX-BF16 tiles (Sapphire Rapids and later; oneDNN's AMX GEMMs).

`MOEKIT_CPU_ISA=auto|avx2|avx512|avx512bf16|amx|off` forces a tier (never above what the CPU has:
a higher request is clamped, with a warning). `off` means no compiled kernels (like
MOEKIT_KERNELS=0) while the dtype policy still follows the real CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger(__name__)

TIERS = ("avx2", "avx512", "avx512bf16", "amx")
"""x86 tiers, lowest first."""

_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                   "avx512_bf16"},
    "amx": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
            "avx512_bf16", "amx_bf16", "amx_tile"},
}
"""/proc/cpuinfo flags each tier needs (Linux spelling)."""

ENV = "MOEKIT_CPU_ISA"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 9R45' (platform.processor() where /proc has none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "cpu family", "model") and k not in info:
                info[k] = v.strip()
            if not line.strip() and info:
                break
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in info and "model" in info:
        # Virtual machines often report a bare "AMD EPYC": family/model name the generation
        # (AMD family 25 = Zen 3/4, 26 = Zen 5).
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def supported_tiers(flags: frozenset[str] | None = None) -> list[str]:
    """The tiers this CPU (or these flags) can run, lowest first."""
    if flags is None:
        if not is_x86():
            return []
        flags = cpu_flags()
    return [t for t in TIERS if _NEEDS[t] <= flags]


def missing_flags(name: str, flags: frozenset[str] | None = None) -> list[str]:
    """The /proc/cpuinfo flags tier `name` needs that this CPU (or these flags) lacks, sorted
    (all of them off x86)."""
    if flags is None:
        flags = cpu_flags() if is_x86() else frozenset()
    return sorted(_NEEDS[name] - flags)


def _requested() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


@functools.lru_cache(maxsize=16)
def _resolve(req: str, flags: frozenset[str], x86: bool) -> str:
    have = supported_tiers(flags) if x86 else []
    best = have[-1] if have else "off"
    if req in ("auto", ""):
        return best
    if req in ("off", "none", "0"):
        return "off"
    if req not in TIERS:
        raise ValueError(f"{ENV}={req!r} is not a tier: use one of auto, {', '.join(TIERS)}, off")
    if req not in have:
        log.warning("moekit: %s=%s but this CPU supports only %s; using %s", ENV, req,
                    ", ".join(have) or "no compiled tier", best)
        return best
    return req


_pin = threading.local()
"""Per-thread snapshot of `tier()` (and `kernels.enabled()`) while a model forward runs
(`moekit.kernels.pinned`): a decode step asks ~700 times, and each unpinned ask reads the
environment (~1.3 us), about a tenth of a small model's step."""


def tier() -> str:
    """The tier moekit's kernels and policies use now: the best the CPU has, or MOEKIT_CPU_ISA's
    (read on every call, so tests can switch it; fixed for the length of a forward). 'off' when
    none applies."""
    t = getattr(_pin, "tier", None)
    if t is not None:
        return t
    return _resolve(_requested(), cpu_flags(), is_x86())


def forced() -> bool:
    """Whether MOEKIT_CPU_ISA picks a tier other than the CPU's best."""
    return _requested() not in ("auto", "") and tier() != _resolve("auto", cpu_flags(), is_x86())


def at_least(name: str, current: str | None = None) -> bool:
    """Whether the tier in use (or `current`) is `name` or above."""
    cur = tier() if current is None else current
    return cur in TIERS and TIERS.index(cur) >= TIERS.index(name)


def _avx2_vnni2(flags: frozenset[str]) -> bool:
    # oneDNN's avx2_vnni_2 ISA (Sierra Forest, Arrow Lake): native bf16 converts and dot products.
    return {"avx_ne_convert", "avx_vnni_int8"} <= flags


def bf16_native_cpu() -> bool:
    """Whether bf16 matmuls run natively on this CPU at the tier in use.

    x86: AVX512-BF16 or AMX (tier avx512bf16/amx), or AVX2-VNNI-2 when no lower tier is forced.
    AVX-512 without BF16 (Ice Lake, Cascade Lake) is *not* native: oneDNN emulates bf16 there 3-4x
    slower than fp32, and on AVX2-only CPUs ATen falls back to a scalar GEMM (10-100x slower).
    Elsewhere (ARM): what oneDNN reports, since its bf16 path there uses BF16 instructions.
    """
    if is_x86():
        cur = _resolve(_requested(), cpu_flags(), True)
        if cur == "off":  # kernels off: the dtype policy still follows the real CPU
            cur = _resolve("auto", cpu_flags(), True)
        if at_least("avx512bf16", cur):
            return True
        lowered = _requested() in TIERS and forced()  # an older tier forced: act like its CPUs
        return not lowered and _avx2_vnni2(cpu_flags())
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False
