"""Where the low-bit kernels stop paying: kernel against dequantize-then-GEMM, by rows per call.

One tiny-Mixtral MoE layer (8 experts of 1024 x 2816, top-2) with int8, int4 and int4 after
`pack_int4` (torch's int4 matmul), bf16 tokens: the `cpu-quant` backend against the `torch` backend
at each token count. Then single quantized linears (an attention-sized 1536 x 1024 and the
32000 x 1024 head): `linear_q` against F.linear on the dequantized weight. Best of 5 calls each,
side by side in one process. These set `moekit.kernels.quant.MAX_ROWS` / `MAX_LINEAR_ROWS`.

    python benchmarks/quant_crossover.py [--threads 2]

Writes benchmarks/results/quant_crossover.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def best_ms(f, n: int = 5) -> float:
    f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def expert_rows(scheme: str, pack: bool, tokens: list[int]) -> list[dict]:
    import moekit
    from moekit.kernels import quant as kq
    from moekit.moe import backends
    from moekit.quant import QuantConfig, quantize_rtn

    cfg = moekit.resolve_config("tiny-mixtral")
    cfg.n_layers = 1
    q = quantize_rtn(moekit.build_model(cfg, dtype=torch.bfloat16, seed=0).eval(), QuantConfig(scheme=scheme))
    layer = next(m for m in q.modules() if hasattr(m, "router") and hasattr(m, "experts"))
    if pack:
        layer.experts.pack()
    saved, kq.MAX_ROWS = kq.MAX_ROWS, 1 << 30  # measure the kernel past its threshold too
    out = []
    try:
        for T in tokens:
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, cfg.dim, generator=g).bfloat16()
            ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
            call = backends.ExpertCall(layer, x, ids, torch.rand(T, 2, generator=g))
            with torch.no_grad():
                k = best_ms(lambda: backends.get("cpu-quant").run(call))
                t = best_ms(lambda: backends.get("torch").run(call))
            out.append({"what": f"experts {scheme}{' (int4pack)' if pack else ''}", "rows": T, "kernel_ms": k,
                        "torch_ms": t})
            print(out[-1], flush=True)
    finally:
        kq.MAX_ROWS = saved
    return out


def linear_rows(N: int, K: int, scheme: str, rows: list[int]) -> list[dict]:
    from moekit.kernels import quant as kq
    from moekit.quant.modules import QuantizedTensor

    qt = QuantizedTensor.from_float(torch.randn(N, K) * 0.02, scheme, 32)
    code = kq.scheme_code(scheme, False, 32)
    out = []
    for M in rows:
        x = torch.randn(M, K).bfloat16()
        k = best_ms(lambda: kq.linear_q(x, qt.q, qt.scale, None, code, 32))
        t = best_ms(lambda: F.linear(x, qt.dequantize(torch.bfloat16)))
        out.append({"what": f"linear {N}x{K} {scheme}", "rows": M, "kernel_ms": k, "torch_ms": t})
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_crossover"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from moekit import kernels

    rows = []
    for scheme, pack in (("int8", False), ("int4", False), ("int4", True)):
        rows += expert_rows(scheme, pack, [8, 32, 64, 128, 256, 512])
    for N, K, s in ((1536, 1024, "int8"), (32000, 1024, "int4")):
        rows += linear_rows(N, K, s, [8, 16, 32, 64, 128])
    from moekit.bench.cli import _machine_desc

    res = {"command": "python benchmarks/quant_crossover.py --threads %d" % a.threads,
           "machine": f"{_machine_desc()}; kernels tier {kernels.tier()}", "rows": rows}
    from moekit.checkpoint.native import atomic_write_text

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    lines = ["# Low-bit kernel vs dequantize + GEMM, by rows per call", "", f"`{res['command']}`; {res['machine']}.",
             "Best of 5 calls, side by side.", "",
             "| what | rows | kernel ms | torch ms | kernel / torch |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['rows']} | {r['kernel_ms']:.2f} | {r['torch_ms']:.2f} | "
                     f"{r['kernel_ms'] / r['torch_ms']:.2f} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
