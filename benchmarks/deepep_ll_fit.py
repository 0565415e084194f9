"""The simulator's all-to-all latency model against DeepEP's published low-latency table.

    python benchmarks/deepep_ll_fit.py --out benchmarks/results/deepep-ll-fit

DeepEP (deepseek-ai/DeepEP) publishes dispatch and combine latencies of its low-latency kernels on
H800 (128 tokens per rank, hidden 7168, top-8 of 256 experts, fp8 dispatch, bf16 combine) at EP 8 to
256. The simulator turns a routing trace into per-rank NVLink and RDMA bytes (`simulate_layer`) and a
time alpha + max(NVLink bytes / NVLink BW, RDMA bytes / RDMA BW). Plan:
1. fit the three numbers (alpha, both bandwidths) to all 12 published latencies, minimising the
   largest relative error (`fit_deepep_ll`), and compare with the `h800-deepep-ll` preset;
2. hold-out checks: fit on dispatch only and predict combine; fit on EP 8-32 and predict 64-256;
3. the nominal `h800` preset (DeepEP's README bandwidths, alpha 10 us, not fitted) for contrast;
4. write deepep_ll_fit.json and deepep_ll_fit.md (atomically).
Pure arithmetic on a synthetic uniform trace: the result does not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write_text  # noqa: E402
from moekit.distributed.simulate import NETWORKS, deepep_ll_latency, fit_deepep_ll  # noqa: E402


def _worst(rows, ops=("dispatch", "combine"), degrees=None) -> float:
    return max(abs(r[f"{op}_rel_err"]) for r in rows for op in ops if degrees is None or r["ep"] in degrees)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/deepep-ll-fit"))
    args = ap.parse_args(argv)
    fit, err = fit_deepep_ll()
    preset = NETWORKS["h800-deepep-ll"]
    rows = deepep_ll_latency(preset)
    d_only, _ = fit_deepep_ll(ops=("dispatch",))
    small, _ = fit_deepep_ll(degrees=(8, 16, 32))
    nominal = deepep_ll_latency(NETWORKS["h800"])
    res = {
        "fit": {"alpha_us": fit.alpha_us, "nvlink_gbs": fit.nvlink_gbs, "rdma_gbs": fit.rdma_gbs, "max_rel_err": err},
        "preset": {"alpha_us": preset.alpha_us, "nvlink_gbs": preset.nvlink_gbs, "rdma_gbs": preset.rdma_gbs,
                   "max_rel_err": _worst(rows)},
        "rows": rows,
        "holdout_dispatch_to_combine": {"net": [d_only.alpha_us, d_only.nvlink_gbs, d_only.rdma_gbs],
                                        "combine_max_rel_err": _worst(deepep_ll_latency(d_only), ("combine",))},
        "holdout_small_to_large_ep": {"net": [small.alpha_us, small.nvlink_gbs, small.rdma_gbs],
                                      "max_rel_err_ep64_256": _worst(deepep_ll_latency(small), degrees=(64, 128, 256))},
        "nominal_h800_max_rel_err": _worst(nominal),
    }
    md = ["| EP | dispatch us (model) | published | error | combine us (model) | published | error |",
          "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['ep']} | {r['dispatch_us']:.1f} | {r['published_dispatch_us']} | {100 * r['dispatch_rel_err']:+.1f}% "
                  f"| {r['combine_us']:.1f} | {r['published_combine_us']} | {100 * r['combine_rel_err']:+.1f}% |")
    md += ["", f"preset h800-deepep-ll: alpha {preset.alpha_us} us, NVLink {preset.nvlink_gbs} GB/s, RDMA "
           f"{preset.rdma_gbs} GB/s; largest error {100 * res['preset']['max_rel_err']:.2f}% "
           f"(a fresh fit: {100 * err:.2f}%).",
           f"hold-out: fitted on dispatch only, combine within {100 * res['holdout_dispatch_to_combine']['combine_max_rel_err']:.1f}%; "
           f"fitted on EP 8-32, EP 64-256 within {100 * res['holdout_small_to_large_ep']['max_rel_err_ep64_256']:.1f}%.",
           f"nominal h800 preset (not fitted): largest error {100 * res['nominal_h800_max_rel_err']:.1f}%."]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "deepep_ll_fit.json", json.dumps(res, indent=1))
    atomic_write_text(args.out / "deepep_ll_fit.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
