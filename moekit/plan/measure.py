"""Measure this host's roofline with torch: the one implementation the planner (`this-cpu`), the
benchmark harness (`moekit bench`) and `benchmarks/moe_layer.py` all use.

Shape legend: N, K weight rows and columns of a GEMV; n the side of a square GEMM.

- read bandwidth: best of several `sum`s over a float32 buffer far larger than any cache (what a
  decode step does to its weights: stream them once);
- matmul peak: best of several large GEMMs (oneDNN bf16 / MKL fp32 on CPU) in the dtype the
  compute really uses (`compute_dtype`), time-bounded so a slow path costs seconds, and of
  moekit's compiled tile kernel on an in-cache problem (MKL's sgemm runs a non-AVX-512 path on
  AMD CPUs, so in fp32 the kernel is the faster matmul there and the bound must count it);
- GEMV bandwidth: bytes per second a decode-shaped (one row) bf16 matmul reads through the path
  moekit's decode really takes: the compiled kernel when it is available, else F.linear.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def best_time(fn, reps: int, budget_s: float | None = None) -> float:
    """Fastest of `reps` timed calls after one warm-up call (seconds). With `budget_s`, the warm-up
    is timed too and no further call starts once the calls so far have used the budget, so a slow
    path (bf16 on a CPU without native bf16: a scalar GEMM, ~1000x slower) costs seconds, not minutes."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    best, spent = (first if budget_s is not None else float("inf")), first
    for _ in range(reps):
        if budget_s is not None and spent + best > budget_s:
            break
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype CPU matmuls on `dtype` weights are computed in: bf16 only where this CPU runs bf16
    natively (`moekit.kernels.isa.bf16_native_cpu`, which follows MOEKIT_CPU_ISA); elsewhere bf16
    weights are computed in fp32 (the scalar bf16 GEMM there is far slower than fp32), so that is
    the peak a roofline of the real compute path must use."""
    from moekit.kernels import isa

    if dtype == torch.bfloat16 and not isa.bf16_native_cpu():
        return torch.float32
    return dtype


def read_bandwidth_gbs(mib: int = 1024, reps: int = 5) -> float:
    """GB/s (1e9 B/s) for summing a float32 buffer of `mib` MiB."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / best_time(x.sum, reps) / 1e9


def gemm_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, budget_s: float = 4.0) -> float:
    """GFLOP/s of the best square GEMM in `dtype`, time-bounded: sides 256, 512, ... up to n, a larger
    side only while the smaller one's calls leave room in `budget_s` (one call of the 256 side always
    runs, so a very slow path still gives a number, in well under a second)."""
    best, t_start, side = 0.0, time.perf_counter(), 256
    while side <= n:
        left = budget_s - (time.perf_counter() - t_start)
        a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
        t = best_time(lambda: torch.mm(a, b), reps, budget_s=max(left, 0.0))
        best = max(best, 2 * side**3 / t / 1e9)
        # The next side costs ~8x this one per call; stop when (warm-up + one call) of it would not fit.
        if 2 * 8 * t > budget_s - (time.perf_counter() - t_start):
            break
        side *= 2
    return best


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5, budget_s: float = 6.0) -> float:
    """GFLOP/s of the faster of a GEMM in `dtype` (`gemm_peak_gflops`) and `kernel_peak_gflops`,
    within about `budget_s` seconds in all. Callers pass `compute_dtype(weight dtype)`."""
    t0 = time.perf_counter()
    gemm = gemm_peak_gflops(dtype, n, reps, budget_s * 2 / 3)
    return max(gemm, kernel_peak_gflops(dtype, reps, max(0.5, budget_s - (time.perf_counter() - t0))))


def kernel_peak_gflops(dtype: torch.dtype, reps: int = 5, budget_s: float = 3.0) -> float:
    """GFLOP/s of moekit's compiled kernels on problems that stay in cache, 8 calls per timing: the
    linear kernel (register tiles, 256 x 256 x 1024) and the packed expert kernel (one SwiGLU
    expert, D 1024, F 1024, 256 rows: its weights stay in L3); the faster one, each time-bounded
    (`best_time`). 0 where the kernels are unavailable."""
    from moekit import kernels

    x, w = torch.randn(256, 1024).to(dtype), torch.randn(256, 1024).to(dtype)
    if not kernels.usable(x, w):
        return 0.0
    t = best_time(lambda: [kernels.linear(x, w) for _ in range(8)], reps, budget_s / 2)
    best = 8 * 2 * 256 * 256 * 1024 / t / 1e9
    w13, w2 = torch.randn(1, 2048, 1024).to(dtype) * 0.03, torch.randn(1, 1024, 1024).to(dtype) * 0.03
    if kernels.packable(w13, w2, "swiglu"):
        packed, counts = kernels.pack_experts(w13, w2, "swiglu"), torch.tensor([256])
        t = best_time(lambda: [kernels.moe_experts_packed(x, packed, counts) for _ in range(4)], reps, budget_s / 2)
        best = max(best, 4 * 2 * 256 * 3 * 1024 * 1024 / t / 1e9)
    return best


def gemv_bandwidth_gbs(mib: int = 1024, reps: int = 3, k: int = 4096, budget_s: float = 6.0) -> tuple[float, str]:
    """(GB/s, path) for one bf16 row through `mib` MiB of [N, k] weights in 64 MiB pieces (so the
    weights come from DRAM), via moekit's compiled kernel when available, else F.linear."""
    from moekit import kernels

    n_rows = 64 * 2**20 // (2 * k)
    # Constant weights: the timing does not depend on the values, and generating 1 GiB of random
    # numbers took longer than the measurement itself on a loaded machine.
    pieces = [torch.full((n_rows, k), 0.01, dtype=torch.bfloat16) for _ in range(max(1, mib // 64))]
    x = torch.randn(1, k).to(torch.bfloat16)
    if kernels.usable(x, pieces[0]):
        fn, path = (lambda: [kernels.linear(x, w) for w in pieces]), "moekit kernel"
    else:
        fn, path = (lambda: [F.linear(x, w) for w in pieces]), "F.linear"
    return len(pieces) * n_rows * k * 2 / best_time(fn, reps, budget_s) / 1e9, path
