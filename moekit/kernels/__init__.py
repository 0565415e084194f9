"""Optional compiled CPU kernels, with the pure-PyTorch path as the always-correct fallback.

Shape legend: T tokens, D model dim, F expert hidden, H = 2F (gated) or F, E experts, S rows sorted
by expert, M rows of a small linear, N its outputs.

`moe_cpu.cpp` is compiled on first use with `torch.utils.cpp_extension.load_inline` (needs a C++
compiler and ninja; ~30 s once, then cached under torch's extension directory). Nothing here is
required: when the CPU lacks AVX512-BF16, the build fails, autograd needs the graph, the tensors
live on another device, or `MOEKIT_KERNELS=0` is set, `available()` is False and callers use
F.linear. Kernels run only under no-grad: they have no backward.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ACTS = {"swiglu": 0, "geglu": 1, "gelu": 2}
"""Activation codes understood by the kernel."""

MAX_ROWS_PER_EXPERT = 128
"""Experts with more rows than this go to F.linear (oneDNN / MKL); at or below it the kernel's
single weight pass wins or ties. This is the bf16 value on CPUs without AMX; `max_rows(dtype)`
gives the value used for this CPU and dtype (override: MOEKIT_KERNEL_MAX_ROWS)."""


def max_rows(dtype: torch.dtype) -> int:
    """Row threshold for the kernel at this dtype on this CPU.

    Measured on AMD Zen 5 (AVX512-BF16, no AMX) with `python benchmarks/moe_layer.py --sweep-rows`
    (docs/moe_layer.md): in bf16 the kernel beat oneDNN from 1 to 8 rows per expert and tied or beat
    it up to 128 (with one thread; with two threads on a loaded machine it won everywhere, since
    it is two parallel regions per call instead of several per expert); in float32 it beat MKL at
    every size in the sweep (1-128 rows), but lost to MKL in the full benchmark at 256 (fine-grained,
    T=2048) and 512 rows (Mixtral-style, T=2048), so it takes up to 128. With AMX (Sapphire Rapids and later) oneDNN's tile
    GEMM should win from a few rows in bf16, and MKL is strong in fp32 on Intel, so
    those get low thresholds (8 and 16): not measured on such a machine yet; rerun the sweep there
    and override with MOEKIT_KERNEL_MAX_ROWS if it disagrees.
    """
    env = os.environ.get("MOEKIT_KERNEL_MAX_ROWS")
    if env:
        return int(env)
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        return 8 if "amx_bf16" in flags else MAX_ROWS_PER_EXPERT
    # The kernel does not block over rows: past ~128 rows (fp32) an expert's activations leave L2
    # and are re-read for every weight tile.
    return 128 if "GenuineIntel" not in _vendor() else 16


@functools.lru_cache(maxsize=1)
def _vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


_lock = threading.Lock()
_module = None
_failed: str | None = None


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def enabled() -> bool:
    """Kernels are allowed here: not switched off by MOEKIT_KERNELS=0 and the CPU has AVX512-BF16."""
    if os.environ.get("MOEKIT_KERNELS", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    return {"avx512f", "avx512bw", "avx512_bf16"} <= _cpu_flags()


def _cached_build_exists() -> bool:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory("moekit_cpu_kernels", verbose=False)).glob("*.so"))
    except Exception:
        return False


def load():
    """The compiled module, building it on first call; None when disabled or the build failed."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    if not enabled():
        return None
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        try:
            from torch.utils.cpp_extension import load_inline

            src = (Path(__file__).with_name("moe_cpu.cpp")).read_text()
            # Visible by default (WARNING reaches stderr without logging config): a first forward
            # that pauses for half a minute must say why. A cached build loads in about a second.
            if not _cached_build_exists():
                log.warning("moekit: compiling CPU kernels once (about 30 s, then cached; MOEKIT_KERNELS=0 skips)")
            _module = load_inline(
                "moekit_cpu_kernels", cpp_sources=[src], functions=["moe_experts", "linear_small"],
                extra_cflags=["-O3", "-march=native", "-mavx512f", "-mavx512bw", "-mavx512bf16"],
                verbose=False,
            )
        except Exception as exc:  # no compiler, no ninja, odd toolchain: the fallback is correct
            _failed = f"{type(exc).__name__}: {exc}"
            log.warning("moekit CPU kernels unavailable, using PyTorch ops (%s)", _failed.splitlines()[0])
    return _module


def available() -> bool:
    """True when the compiled kernels are built (building them now if needed) and switched on."""
    return enabled() and load() is not None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a kernel may run on these tensors now: CPU, bf16/fp32, one dtype, no autograd."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return False
    if any(w.device.type != "cpu" or w.dtype != x.dtype for w in weights):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return available()


def moe_experts(x_RD: torch.Tensor, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, counts_E: torch.Tensor,
                act: str, starts_E: torch.Tensor | None = None, src_S: torch.Tensor | None = None,
                dst_S: torch.Tensor | None = None, scale_S: torch.Tensor | None = None,
                out_ND: torch.Tensor | None = None, n_out: int | None = None) -> torch.Tensor:
    """Run every expert with rows on the rows grouped by expert, in one call.

    Expert e handles sorted rows starts_E[e] .. starts_E[e] + counts_E[e] (starts default to the
    running sum of counts); sorted row s reads input row src_S[s] (default s) and adds
    scale_S[s] * y to float32 output row dst_S[s] (default s). Experts with count 0 are skipped,
    so a caller can hand some experts to another path. Returns the float32 [n_out, D] output.
    """
    mod = load()
    if mod is None:
        raise RuntimeError("moekit CPU kernels are not available; check available() first")
    counts_E = counts_E.to("cpu", torch.int64).contiguous()
    if starts_E is None:
        starts_E = torch.cumsum(counts_E, 0) - counts_E
    starts_E = starts_E.to("cpu", torch.int64).contiguous()
    if out_ND is None:
        rows = n_out if n_out is not None else int((starts_E + counts_E).max()) if counts_E.numel() else 0
        out_ND = torch.zeros(rows, w13_EHD.shape[-1], dtype=torch.float32)
    empty_i = torch.empty(0, dtype=torch.int64)
    with torch.profiler.record_function("moekit::moe_experts"):  # visible in torch.profiler tables
        mod.moe_experts(
            x_RD.contiguous(), w13_EHD.contiguous(), w2_EDF.contiguous(), starts_E, counts_E,
            empty_i if src_S is None else src_S.to(torch.int64).contiguous(),
            empty_i if dst_S is None else dst_S.to(torch.int64).contiguous(),
            torch.empty(0) if scale_S is None else scale_S.to(torch.float32).contiguous(),
            out_ND, ACTS[act],
        )
    return out_ND


def linear(x_MK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """x @ w.T for small M (decode), float32 result; same contract as F.linear without bias."""
    mod = load()
    if mod is None:
        raise RuntimeError("moekit CPU kernels are not available; check available() first")
    lead = x_MK.shape[:-1]
    out = mod.linear_small(x_MK.reshape(-1, x_MK.shape[-1]).contiguous(), w_NK.contiguous())
    return out.view(*lead, w_NK.shape[0])
