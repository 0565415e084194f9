"""Side-by-side decode step time on tiny-Mixtral: moekit's compiled CPU kernels on vs off.

"off" is `MOEKIT_KERNELS=0`: the same engine and model on PyTorch ops only (oneDNN F.linear for
every projection and expert, the per-expert dispatch path, PyTorch decode attention over a
128-slot key window). Modes alternate in one process, so both see the same machine load.

    python benchmarks/inference_decode_ab.py [--threads 2] [--batch-sizes 1 8] [--reps 3]

Writes benchmarks/results/inference_decode_ab-t<threads>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()

    import os

    import torch

    import moekit
    from moekit.checkpoint.native import atomic_write_text
    from moekit.inference import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    model = moekit.build_model(moekit.get_preset("tiny-mixtral"), dtype=torch.bfloat16, seed=0).eval()

    def set_mode(on: bool) -> None:
        os.environ["MOEKIT_KERNELS"] = "1" if on else "0"  # read on every call (moekit.kernels.enabled)

    rows = []
    for B in a.batch_sizes:
        prompts = [list(range(300 + b, 428 + b)) for b in range(B)]
        times = {"on": [], "off": []}
        for _ in range(a.reps):
            for mode in ("on", "off"):
                set_mode(mode == "on")
                eng = Engine(model)
                eng.generate(prompts, SamplingParams(max_new_tokens=a.steps + 1), time_steps=True)
                times[mode] += eng.stats.step_s
        on, off = (statistics.median(times[m]) * 1e3 for m in ("on", "off"))
        rows.append({"batch": B, "on_ms": on, "off_ms": off, "speedup": off / on})
        print(f"batch {B}: kernels on {on:.1f} ms/step, off {off:.1f} ms/step ({off / on:.2f}x)")
    set_mode(True)
    out = ROOT / "benchmarks" / "results" / f"inference_decode_ab-t{a.threads}"
    cmd = f"python benchmarks/inference_decode_ab.py --threads {a.threads} --batch-sizes " \
          f"{' '.join(map(str, a.batch_sizes))} --reps {a.reps}"
    atomic_write_text(out.with_suffix(".json"), json.dumps({"command": cmd, "threads": a.threads, "rows": rows}, indent=2))
    md = [f"Command: `{cmd}`", "", "| batch | kernels on ms/step | MOEKIT_KERNELS=0 ms/step | speedup |",
          "|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['on_ms']:.1f} | {r['off_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
