"""Benchmark: moekit's MoE layer against transformers' own sparse MoE blocks on CPU.

Shape legend: T tokens, D model dim (H in HF terms), F expert hidden (HF I), E experts, K top-k.

Two blocks with IDENTICAL weights (the HF modules share moekit's parameter tensors):
  mixtral      H 1024, I 2816, 8 experts top-2   (transformers MixtralSparseMoeBlock)
  finegrained  H 1024, moe_I 256, 64 experts top-8 (transformers Qwen3MoeSparseMoeBlock, normalised top-k)
at T in 1, 8, 64, 512, 2048, in float32 and bfloat16. Each point cycles through enough copies of the
block that their weights exceed 1 GiB, so every call streams its weights from DRAM, and is compared
with a lower bound measured in the same run:
  bound = max(bytes of the distinct experts touched + router / DRAM read bandwidth,
              FLOPs / matmul peak at that dtype).
transformers runs with each CPU experts backend it has ("eager" per-expert loop, "grouped_mm", and
"batched_mm" at T <= 8 only: it gathers a weight copy per token and is far slower beyond), and the
fastest one per point is the baseline.

Usage:
  python benchmarks/moe_layer.py            # full run (~2 min on 2 cores)
  python benchmarks/moe_layer.py --quick    # T 1, 64, 512; bf16 only
Writes benchmarks/results/moe_layer.json, docs/moe_layer.md and docs/moe_layer.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit import kernels  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.moe.layer import MoELayer  # noqa: E402
from moekit.plan import measure  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    hidden: int
    experts: int
    top_k: int


SHAPES = {
    "mixtral": Shape("mixtral", 1024, 2816, 8, 2),
    "finegrained": Shape("finegrained", 1024, 256, 64, 8),
}


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.SubprocessError):
        model = platform.processor() or "?"
    import transformers

    flags = kernels._cpu_flags()
    return {
        "cpu": model, "cpu_features": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f"))),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "moekit_kernels": kernels.available(),
    }


def measure_bandwidth() -> float:
    """DRAM read bandwidth (bytes/s): best of a 1 GiB reduction and the decode GEMV path."""
    return 1e9 * max(measure.read_bandwidth_gbs(1024, 3), measure.gemv_bandwidth_gbs(1024, 3)[0])


def measure_peak(dtype: torch.dtype) -> float:
    """Matmul peak (FLOP/s) at this dtype: best over the expert GEMM shapes at large M and moekit's
    tile kernel in cache (faster than MKL's sgemm on AMD CPUs, see moekit.plan.measure)."""
    best = measure.kernel_peak_gflops(dtype, 3) * 1e9
    for m, n, k in ((2048, 5632, 1024), (2048, 1024, 2816), (1024, 4096, 4096)):
        a, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
        F.linear(a, b)
        best = max(best, 2 * m * n * k / measure.best_time(lambda: F.linear(a, b), 3))
    return best


def hf_block(shape: Shape):
    if shape.name == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=shape.dim, intermediate_size=shape.hidden,
                            num_local_experts=shape.experts, num_experts_per_tok=shape.top_k)
        return cfg, MixtralSparseMoeBlock
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=shape.dim, moe_intermediate_size=shape.hidden, num_experts=shape.experts,
                         num_experts_per_tok=shape.top_k, norm_topk_prob=True)
    return cfg, Qwen3MoeSparseMoeBlock


def build(shape: Shape, dtype: torch.dtype, gib: float):
    """Copies of the moekit layer plus HF blocks sharing each copy's weight tensors."""
    mcfg = MoEConfig(num_experts=shape.experts, top_k=shape.top_k, expert_dim=shape.hidden,
                     router="topk_softmax" if shape.name == "mixtral" else "softmax_topk",
                     norm_topk_prob=shape.name != "mixtral")
    per_block = (3 * shape.experts * shape.hidden * shape.dim + shape.experts * shape.dim) * dtype.itemsize
    n = max(2, math.ceil(gib * 2**30 / per_block))
    hcfg, cls = hf_block(shape)
    ours, theirs = [], []
    for i in range(n):
        torch.manual_seed(i)
        layer = MoELayer(shape.dim, mcfg).to(dtype).eval()
        layer.loss_stats = False  # inference, as in moekit's engine: HF's block computes no aux losses either
        with torch.no_grad():  # weights large enough that the routing is not degenerate
            layer.router.weight.normal_(0, 0.05)
        hf = cls(hcfg).eval()
        hf.gate.weight = layer.router.weight
        hf.experts.gate_up_proj = layer.experts.w13
        hf.experts.down_proj = layer.experts.w2
        ours.append(layer)
        theirs.append(hf)
    return ours, theirs, hcfg, per_block


def time_interleaved(impls: dict, x, min_time: float) -> dict[str, float]:
    """Median seconds per call of each implementation. Calls are interleaved round-robin (one call
    of each per round) so that load from other processes hits all of them alike, and each call
    takes the next copy of the block, so it reads cold weights."""
    names = list(impls)
    for name in names:  # warm-up: oneDNN primitive caches, first-touch allocations
        for fn in impls[name][:2]:
            fn(x)
    samples: dict[str, list[float]] = {n: [] for n in names}
    r, t_start = 0, time.perf_counter()
    while r < 3 or (time.perf_counter() - t_start < min_time * len(names) and r < 40):
        for name in names:
            fns = impls[name]
            fn = fns[(r + 2) % len(fns)]
            t0 = time.perf_counter()
            fn(x)
            samples[name].append(time.perf_counter() - t0)
        r += 1
    return {n: statistics.median(v) for n, v in samples.items()}


def _hf_call(block, cfg, impl):
    def call(x):
        cfg._experts_implementation = impl
        return block(x)
    return call


def run_point(shape, dtype, T, ours, theirs, hcfg, bw, peak, min_time) -> dict:
    D, F_, E, K = shape.dim, shape.hidden, shape.experts, shape.top_k
    torch.manual_seed(1000 + T)
    x = torch.randn(1, T, D).to(dtype)
    ids = ours[0].router(x.view(-1, D)).topk_ids_TK
    touched = int(torch.unique(ids).numel())
    elt = dtype.itemsize
    bytes_ = touched * 3 * F_ * D * elt + E * D * elt
    flops = 2 * T * K * 3 * F_ * D + 2 * T * D * E
    bound = max(bytes_ / bw, flops / peak)
    impls = {"moekit": [lambda x, m=m: m(x)[0] for m in ours]}
    for impl in ["eager", "grouped_mm"] + (["batched_mm"] if T <= 8 else []):
        impls[f"hf_{impl}"] = [_hf_call(b, hcfg, impl) for b in theirs]
    times = time_interleaved(impls, x, min_time)
    best_hf = min((k for k in times if k.startswith("hf_")), key=times.get)
    # Same weights, same routing rule: the outputs must agree (sanity check of the comparison).
    y_ours = ours[0](x)[0].float()
    hcfg._experts_implementation = "grouped_mm"
    y_hf = theirs[0](x).float()
    rel_err = float((y_ours - y_hf).abs().max() / y_hf.abs().max().clamp_min(1e-12))
    return {
        "shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "tokens": T,
        "experts_touched": touched, "bytes": bytes_, "flops": flops, "bound_ms": bound * 1e3,
        "bound_kind": "memory" if bytes_ / bw >= flops / peak else "compute",
        "ms": {k: v * 1e3 for k, v in times.items()}, "best_hf": best_hf,
        "speedup_vs_best_hf": times[best_hf] / times["moekit"], "moekit_over_bound": times["moekit"] / bound,
        "best_hf_over_bound": times[best_hf] / bound, "max_rel_diff_vs_hf": rel_err,
    }


def sweep_rows(dtypes: list[str], gib: float, min_time: float) -> list[dict]:
    """Kernel vs F.linear per rows-per-expert M (every expert gets M rows): where the
    thresholds in moekit.kernels.max_rows come from."""
    import os

    from moekit.moe.experts import GroupedExperts

    out = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        for shape in SHAPES.values():
            E, D, F_ = shape.experts, shape.dim, shape.hidden
            n = max(2, math.ceil(gib * 2**30 / (3 * E * F_ * D * dtype.itemsize)))
            mods = [GroupedExperts(E, D, F_).to(dtype) for _ in range(n)]

            def with_limit(limit, m):
                def call(x):
                    os.environ["MOEKIT_KERNEL_MAX_ROWS"] = str(limit)
                    return m(x, torch.full((E,), x.shape[0] // E))
                return call

            for M in (1, 2, 4, 8, 16, 32, 64, 128):
                x = torch.randn(E * M, D).to(dtype)
                t = time_interleaved({"kernel": [with_limit(1 << 30, m) for m in mods],
                                      "F.linear": [with_limit(0, m) for m in mods]}, x, min_time)
                out.append({"dtype": dt, "shape": shape.name, "rows_per_expert": M,
                            "kernel_ms": t["kernel"] * 1e3, "linear_ms": t["F.linear"] * 1e3})
                print(f"sweep {dt} {shape.name} M={M}: kernel {t['kernel'] * 1e3:.2f} ms, "
                      f"F.linear {t['F.linear'] * 1e3:.2f} ms", flush=True)
            del mods
    os.environ.pop("MOEKIT_KERNEL_MAX_ROWS", None)
    return out


def profile_table(layers, x, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    for m in layers[:2]:
        m(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for m in layers[:4]:
            m(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def write_markdown(res: dict, path: Path) -> None:
    m = res["machine"]
    lines = [
        "# MoE layer vs transformers on CPU", "",
        "Generated by `python benchmarks/moe_layer.py` " + ("(`--quick`)" if res["quick"] else "") + ". "
        "Median ms per call of one MoE block (router + experts + combine), weights streamed from DRAM "
        f"(cycling {res['gib']:.1f} GiB of block copies), inference mode. Identical weights in both.",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['cpu_features'])}), {m['threads']} threads, torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}, moekit kernels built: {m['moekit_kernels']}.",
        f"Measured in the same run: DRAM read bandwidth {res['bandwidth_GBps']:.1f} GB/s; matmul peak "
        + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in res["peak_GFLOPs"].items()) + ".",
        "Bound = max(bytes of distinct experts touched + router / bandwidth, FLOPs / peak). "
        "`best HF` = fastest transformers experts backend at that point (eager, grouped_mm, batched_mm at T<=8).",
        "",
        "| block | dtype | T | experts hit | bound ms (kind) | moekit ms | best HF ms (backend) | HF eager | HF grouped_mm "
        "| moekit / bound | best HF / bound | moekit speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in res["points"]:
        ms = p["ms"]
        lines.append(
            f"| {p['shape']} | {p['dtype']} | {p['tokens']} | {p['experts_touched']} | {p['bound_ms']:.2f} "
            f"({p['bound_kind'][:3]}) | **{ms['moekit']:.2f}** | {ms[p['best_hf']]:.2f} ({p['best_hf'][3:]}) | "
            f"{ms['hf_eager']:.2f} | {ms['hf_grouped_mm']:.2f} | {p['moekit_over_bound']:.2f}x | "
            f"{p['best_hf_over_bound']:.2f}x | {p['speedup_vs_best_hf']:.2f}x |")
    pts = res["points"]
    slower = [p for p in pts if p["speedup_vs_best_hf"] < 1.0]
    mix_bf16 = [p for p in pts if p["shape"] == "mixtral" and p["dtype"] == "bfloat16"]
    over = [p for p in mix_bf16 if p["moekit_over_bound"] > 1.5]
    fmt = lambda ps: ", ".join(f"{p['shape']} {p['dtype']} T={p['tokens']} ({p['speedup_vs_best_hf']:.2f}x vs HF, "
                               f"{p['moekit_over_bound']:.2f}x bound)" for p in ps) or "none"
    if any(p["moekit_over_bound"] < 1 or p["best_hf_over_bound"] < 1 for p in pts):
        lines += ["", "**Warning:** some points run faster than their 'bound': the bandwidth and peak measured at the "
                  "start of this run were depressed by other load on the machine, so the bound ratios of this run "
                  "are not trustworthy; the side-by-side moekit / transformers ratios still are (interleaved calls)."]
    lines += [
        "", "## Targets in this run", "",
        f"- At least as fast as the fastest transformers backend: {len(pts) - len(slower)}/{len(pts)} points; "
        f"slower at: {fmt(slower)}.",
        f"- Mixtral-style block, bf16, within 1.5x of the lower bound: {len(mix_bf16) - len(over)}/{len(mix_bf16)} "
        f"points; over at: {fmt(over)}.",
        "", "![time / bound vs tokens](moe_layer.png)", "",
    ]
    if res.get("sweep_rows"):
        lines += ["## Kernel vs F.linear by rows per expert (`--sweep-rows`)", "",
                  "Every expert of the block gets M rows; experts-only time, weights streamed.", "",
                  "| dtype | block | M | kernel ms | F.linear ms | kernel speedup |", "|---|---|---:|---:|---:|---:|"]
        for q in res["sweep_rows"]:
            lines.append(f"| {q['dtype']} | {q['shape']} | {q['rows_per_expert']} | {q['kernel_ms']:.2f} | "
                         f"{q['linear_ms']:.2f} | {q['linear_ms'] / q['kernel_ms']:.2f}x |")
        lines.append("")
    lines += [
        "## How moekit runs the block on CPU (inference)", "",
        "1. Router in float32, stable sort of the T*K assignments by expert, one gather of the rows.",
        "2. Experts with at most `moekit.kernels.max_rows(dtype)` rows go to one call of the compiled kernel "
        "(`moekit/kernels/moe_cpu.cpp`: AVX512-BF16 `vdpbf16ps` / AVX-512 FMA, gate+up+activation fused, each "
        "OpenMP thread streams a contiguous slice of every expert's weights once, weighted scatter into a float32 "
        "[T, D] accumulator with no atomics). An expert with up to 8 rows streams one weight row at a time with "
        "software prefetch 4 KiB ahead and reuses it for all its rows (a GEMV: bandwidth-bound); one with more "
        "rows runs register tiles of 4 weight rows x 4 token rows with a vectorised SiLU (compute-bound). At "
        "decode sizes (T <= that threshold) the grouping itself happens inside the kernel (`moe_experts_topk`), "
        "so the layer costs the router plus one call.",
        "3. The remaining experts run as two GEMMs each (oneDNN bf16 / MKL fp32), the fused SiLU x up between them "
        "(`kernels.silu_mul`), each writing its rows of one [S, D] buffer; one compiled pass (`kernels.combine_rows`) "
        "then adds every token's weighted rows into the same float32 accumulator.",
        "4. Training (autograd on) runs the experts as one autograd node on CPU (per-expert GEMMs into stacked "
        "buffers, rows padded to 64 so oneDNN reuses its primitives, compiled SwiGLU and combine kernels both "
        "ways); CUDA bf16 uses torch._grouped_mm. `MOEKIT_KERNELS=0` switches the kernels off; "
        "`MOEKIT_KERNEL_MAX_ROWS=N` moves the threshold.", "",
        "Timings on a shared machine are noisy: calls of all implementations are interleaved round-robin so "
        "load hits them alike; compare ratios within one run, and rerun on a quiet machine for absolute numbers. "
        "The process keeps freed memory (`moekit.utils.retain_freed_memory`, as moekit's engine and trainer set "
        "it: glibc keeps its heap and torch's CPU allocator caches blocks of 1 MiB and more) for every "
        "implementation alike" + ("" if res.get("retain", True) else " (not in this run: --no-retain)")
        + ": without it each fresh multi-MB buffer pays a page fault per 4 KiB, in HF's blocks as in moekit's.",
        "",
    ]
    for name, table in res.get("profiles", {}).items():
        lines += [f"## Profile: {name}", "", "```", table.rstrip(), "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    from moekit.checkpoint.native import atomic_write_text

    atomic_write_text(path, "\n".join(lines) + "\n")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, shape in zip(axes, SHAPES):
        for dt, style in (("float32", "--"), ("bfloat16", "-")):
            pts = [p for p in res["points"] if p["shape"] == shape and p["dtype"] == dt]
            if not pts:
                continue
            T = [p["tokens"] for p in pts]
            ax.plot(T, [p["moekit_over_bound"] for p in pts], style, marker="o", label=f"moekit {dt}")
            ax.plot(T, [p["best_hf_over_bound"] for p in pts], style, marker="x", label=f"best transformers {dt}")
        ax.axhline(1.5, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("time / lower bound")
    fig.suptitle(f"MoE block on {res['machine']['cpu']}, {res['machine']['threads']} threads")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="T 1, 64, 512 in bf16 only")
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--gib", type=float, default=1.0, help="total weight bytes of block copies per shape")
    ap.add_argument("--min-time", type=float, default=0.4, help="seconds of timed calls per point and impl")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-retain", action="store_true",
                    help="glibc's default allocator behaviour (freed memory unmapped) for every implementation")
    ap.add_argument("--sweep-rows", action="store_true",
                    help="also time the kernel vs F.linear at 1-128 rows per expert (thresholds)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="only re-render the markdown and plot from a results JSON of an earlier run")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "moe_layer.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "moe_layer.md")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "moe_layer.png")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        write_markdown(res, args.md)
        plot(res, args.png)
        print(f"wrote {args.md}, {args.png}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = args.tokens or ([1, 64, 512] if args.quick else [1, 8, 64, 512, 2048])
    dtypes = args.dtypes or (["bfloat16"] if args.quick else ["float32", "bfloat16"])
    from tqdm import tqdm

    torch.set_grad_enabled(False)
    from moekit.utils import retain_freed_memory

    # Process-wide, so HF's blocks get it exactly as moekit's layer does.
    retained = not args.no_retain and retain_freed_memory()
    res = {"machine": machine(), "quick": args.quick, "gib": args.gib, "retain": retained}
    print("machine:", res["machine"], flush=True)
    bw = measure_bandwidth()
    peaks = {dt: measure_peak(DTYPES[dt]) for dt in dtypes}
    res["bandwidth_GBps"] = bw / 1e9
    res["peak_GFLOPs"] = {k: v / 1e9 for k, v in peaks.items()}
    print(f"bandwidth {bw / 1e9:.1f} GB/s, peaks {res['peak_GFLOPs']}", flush=True)
    res["points"], res["profiles"] = [], {}
    bar = tqdm(total=len(args.shapes) * len(dtypes) * len(tokens), desc="moe_layer")
    for sname in args.shapes:
        shape = SHAPES[sname]
        for dt in dtypes:
            ours, theirs, hcfg, per_block = build(shape, DTYPES[dt], args.gib)
            with torch.inference_mode():
                for T in tokens:
                    p = run_point(shape, DTYPES[dt], T, ours, theirs, hcfg, bw, peaks[dt], args.min_time)
                    res["points"].append(p)
                    bar.update()
                    bar.write(f"{sname:11s} {dt:8s} T={T:5d} bound {p['bound_ms']:8.2f} ms | moekit "
                              f"{p['ms']['moekit']:8.2f} ({p['moekit_over_bound']:.2f}x) | {p['best_hf']} "
                              f"{p['ms'][p['best_hf']]:8.2f} ({p['best_hf_over_bound']:.2f}x)")
                if dt == "bfloat16" and not args.no_profile:
                    Tp = 512 if sname == "mixtral" else 64
                    x = torch.randn(1, Tp, shape.dim).to(DTYPES[dt])
                    res["profiles"][f"moekit {sname} bf16 T={Tp}"] = profile_table(ours, x)
            del ours, theirs
    bar.close()
    if args.sweep_rows and kernels.available():
        with torch.inference_mode():
            res["sweep_rows"] = sweep_rows(dtypes, args.gib, args.min_time / 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from moekit.checkpoint.native import atomic_write_text

    atomic_write_text(args.json, json.dumps(res, indent=1))
    write_markdown(res, args.md)
    plot(res, args.png)
    print(f"wrote {args.json}, {args.md}, {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
