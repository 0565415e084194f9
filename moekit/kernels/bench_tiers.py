"""Indicative kernel-vs-PyTorch row sweep for one CPU tier: the data behind `max_rows` and
`max_linear_rows` of the avx2 / avx512 tiers.

    MOEKIT_CPU_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python -m moekit.kernels.bench_tiers --rows 1 8 32 128 512

ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS cap PyTorch's own GEMMs at the same tier (read when
torch starts), so a newer CPU stands in for an older one on both sides. Per row count M, interleaved
calls (kernel, then PyTorch, repeated; median time each): the MoE expert block (every expert gets
M rows; the kernel in fp32 and with bf16 weights under fp32 activations, against per-expert
F.linear in fp32) and a linear (kernel fp32 / bf16 weights vs F.linear fp32). Prints one row per
size with the ratio PyTorch / kernel (> 1: the kernel wins). Timings on a shared machine are
indicative only; rerun on the target CPU.

Shape legend: E experts, M rows per expert, D model dim, F expert hidden, N linear outputs, K its
reduction length.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit import kernels
from moekit.kernels import isa


def _interleaved(fns: list, reps: int) -> list[float]:
    """Median seconds per call of each fn, calls interleaved so load changes hit all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _torch_block(x_ED, w13, w2):
    """Per-expert F.linear -> SwiGLU -> F.linear (the layer's fallback), fp32."""
    outs = []
    for e in range(w13.shape[0]):
        h = F.linear(x_ED[e], w13[e])
        g, u = h.chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, w2[e]))
    return torch.cat(outs)


@torch.no_grad()
def sweep(rows: list[int], E: int, D: int, F_: int, N: int, reps: int) -> list[dict]:
    """One dict per row count: milliseconds of each implementation."""
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * F_, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, F_, generator=g) * F_ ** -0.5
    w13_b, w2_b = w13.bfloat16(), w2.bfloat16()
    wl = torch.randn(N, D, generator=g) * D ** -0.5
    wl_b = wl.bfloat16()
    out = []
    for M in rows:
        x = torch.randn(E * M, D, generator=g)
        counts = torch.full((E,), M)
        xs = x.view(E, M, D)
        t = _interleaved([
            lambda: kernels.moe_experts(x, w13, w2, counts, "swiglu"),
            lambda: kernels.moe_experts(x, w13_b, w2_b, counts, "swiglu"),
            lambda: _torch_block(xs, w13, w2),
            lambda: kernels.linear(x[:M], wl),
            lambda: kernels.linear(x[:M], wl_b),
            lambda: F.linear(x[:M], wl),
        ], reps)
        ms = [1e3 * v for v in t]
        out.append(dict(M=M, block_kernel_fp32=ms[0], block_kernel_bf16w=ms[1], block_torch_fp32=ms[2],
                        linear_kernel_fp32=ms[3], linear_kernel_bf16w=ms[4], linear_torch_fp32=ms[5]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=704)
    ap.add_argument("--outputs", type=int, default=4096, help="N of the linear")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (1 on a loaded machine: a descheduled worker stalls every parallel region)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not kernels.available():
        raise SystemExit(f"moekit kernels unavailable at tier {isa.tier()}: {kernels.build_error()}")
    print(f"# tier {kernels.tier()} ({kernels.module_name(kernels.tier())}) on {isa.cpu_model()}, "
          f"{torch.get_num_threads()} threads; E={a.experts} D={a.dim} F={a.hidden} N={a.outputs}; "
          f"median of {a.reps} interleaved calls, ms (ratio = torch / kernel)")
    print("M | block fp32 kernel | block bf16-w kernel | block torch fp32 | ratio fp32 | ratio bf16-w | "
          "linear fp32 kernel | linear bf16-w kernel | linear torch fp32 | ratio fp32 | ratio bf16-w")
    for r in sweep(a.rows, a.experts, a.dim, a.hidden, a.outputs, a.reps):
        bt, lt = r["block_torch_fp32"], r["linear_torch_fp32"]
        print(f"{r['M']} | {r['block_kernel_fp32']:.2f} | {r['block_kernel_bf16w']:.2f} | {bt:.2f} | "
              f"{bt / r['block_kernel_fp32']:.2f} | {bt / r['block_kernel_bf16w']:.2f} | "
              f"{r['linear_kernel_fp32']:.2f} | {r['linear_kernel_bf16w']:.2f} | {lt:.2f} | "
              f"{lt / r['linear_kernel_fp32']:.2f} | {lt / r['linear_kernel_bf16w']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
