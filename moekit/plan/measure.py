"""Measure this host's roofline with torch: the one implementation the planner (`this-cpu`), the
benchmark harness (`moekit bench`) and `benchmarks/moe_layer.py` all use.

Shape legend: N, K weight rows and columns of a GEMV; n the side of a square GEMM.

- read bandwidth: best of several `sum`s over a float32 buffer far larger than any cache (what a
  decode step does to its weights: stream them once);
- matmul peak: best of several large GEMMs in a dtype (oneDNN bf16 / MKL fp32 on CPU) and of
  moekit's compiled tile kernel on an in-cache problem (MKL's sgemm runs a non-AVX-512 path on
  AMD CPUs, so in fp32 the kernel is the faster matmul there and the bound must count it);
- GEMV bandwidth: bytes per second a decode-shaped (one row) bf16 matmul reads through the path
  moekit's decode really takes: the compiled kernel when it is available, else F.linear.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def best_time(fn, reps: int) -> float:
    """Fastest of `reps` timed calls after one untimed warm-up call (seconds)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth_gbs(mib: int = 1024, reps: int = 5) -> float:
    """GB/s (1e9 B/s) for summing a float32 buffer of `mib` MiB."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    return x.numel() * 4 / best_time(x.sum, reps) / 1e9


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the faster of an n x n x n GEMM in `dtype` and `kernel_peak_gflops`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return max(2 * n**3 / best_time(lambda: torch.mm(a, b), reps) / 1e9, kernel_peak_gflops(dtype, reps))


def kernel_peak_gflops(dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of moekit's compiled kernels on problems that stay in cache, 8 calls per timing: the
    linear kernel (register tiles, 256 x 256 x 1024) and the packed expert kernel (one SwiGLU
    expert, D 1024, F 1024, 256 rows: its weights stay in L3); the faster one. 0 where the kernels
    are unavailable."""
    from moekit import kernels

    x, w = torch.randn(256, 1024).to(dtype), torch.randn(256, 1024).to(dtype)
    if not kernels.usable(x, w):
        return 0.0
    best = 8 * 2 * 256 * 256 * 1024 / best_time(lambda: [kernels.linear(x, w) for _ in range(8)], reps) / 1e9
    w13, w2 = torch.randn(1, 2048, 1024).to(dtype) * 0.03, torch.randn(1, 1024, 1024).to(dtype) * 0.03
    if kernels.packable(w13, w2, "swiglu"):
        packed, counts = kernels.pack_experts(w13, w2, "swiglu"), torch.tensor([256])
        t = best_time(lambda: [kernels.moe_experts_packed(x, packed, counts) for _ in range(4)], reps)
        best = max(best, 4 * 2 * 256 * 3 * 1024 * 1024 / t / 1e9)
    return best


def gemv_bandwidth_gbs(mib: int = 1024, reps: int = 3, k: int = 4096) -> tuple[float, str]:
    """(GB/s, path) for one bf16 row through `mib` MiB of [N, k] weights in 64 MiB pieces (so the
    weights come from DRAM), via moekit's compiled kernel when available, else F.linear."""
    from moekit import kernels

    n_rows = 64 * 2**20 // (2 * k)
    pieces = [torch.randn(n_rows, k).to(torch.bfloat16) for _ in range(max(1, mib // 64))]
    x = torch.randn(1, k).to(torch.bfloat16)
    if kernels.usable(x, pieces[0]):
        fn, path = (lambda: [kernels.linear(x, w) for w in pieces]), "moekit kernel"
    else:
        fn, path = (lambda: [F.linear(x, w) for w in pieces]), "F.linear"
    return len(pieces) * n_rows * k * 2 / best_time(fn, reps) / 1e9, path
