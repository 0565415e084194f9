"""The reference inference workload of docs/performance.md (issue 6): tiny-Mixtral, bf16, 2 threads.

tiny-Mixtral = preset `tiny-mixtral` = HF MixtralConfig(vocab 32000, hidden 1024, intermediate
2816, 8 layers, 16/4 heads, 8 experts top-2), random init (seed 0), 640M params / 1.19 GiB in
bf16. One run measures this machine's read bandwidth and matmul peak, then moekit, its dense
equivalent, transformers and llama.cpp (when llama-cpp-python is installed) on the same weights
at batch 1, 8, 32 and prompt 128, 512, and writes JSON + markdown + PNG.

    python benchmarks/inference_reference.py                 # 3 interleaved rounds, ~15 min on a quiet machine
    python benchmarks/inference_reference.py --quick         # tiny-moe, seconds (smoke test)

Results go to benchmarks/results/inference-<model>/ (results.json, results.md, throughput.png);
rerun on a quiet machine: ratios measured side by side in one run are what count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-moe, small shapes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--max-prefill-tokens", type=int, default=0,
                    help="skip batch x prompt shapes above this (e.g. 4096 drops batch 32 x 512 on a busy machine)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved sweeps; each figure is the median over rounds (this machine drifts by 20-40%% "
                         "within minutes)")
    a = ap.parse_args()
    from moekit.cli import main as moekit_main

    model = "tiny-moe" if a.quick else "tiny-mixtral"
    out = a.out or ROOT / "benchmarks" / "results" / f"inference-{model}"
    argv = ["bench", model, "--threads", str(a.threads), "--out", str(out), "--dtype", "bfloat16"]
    if a.max_prefill_tokens:
        argv += ["--max-prefill-tokens", str(a.max_prefill_tokens)]
    if a.quick:
        argv.append("--quick")
    else:
        argv += ["--rounds", str(a.rounds)]
    return moekit_main(argv)


if __name__ == "__main__":
    sys.exit(main())
