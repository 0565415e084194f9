"""Loss curves: one process vs `torchrun ... --ep 2` (2 processes) vs EP=2 x DP=2 (4 processes).

    python benchmarks/ep_loss_curve.py --steps 50 --out docs/figures/ep_loss_curve.png

Trains --preset (default tiny-moe; fp32, aux loss off: the Switch loss is per rank, not the global-batch loss) on a
small generated English-like corpus (tests/train_helpers.py), or on a prepared corpus with --data-dir
(`moekit data prepare`), with the same seed and batch, and plots the three curves plus their largest
relative difference.

    python benchmarks/ep_loss_curve.py --steps 50 --preset small-moe --data-dir data --corpus en-prose \
        --batch-size 8 --seq-len 128 --out docs/figures/ep_loss_curve_small_moe_en_prose.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--work", default="/tmp/moekit-ep-loss")
    ap.add_argument("--out", default="docs/figures/ep_loss_curve.png")
    ap.add_argument("--preset", default="tiny-moe")
    ap.add_argument("--data-dir", default=None, help="prepared data (default: a tiny generated corpus)")
    ap.add_argument("--corpus", default="en-prose")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--lr", default="3e-3")
    a = ap.parse_args()
    from moekit.distributed.spawn import free_port

    work = Path(a.work)
    if a.data_dir is None:
        from train_helpers import tiny_data

        data_root, corpus = str(tiny_data(work).root), "x"
    else:
        data_root, corpus = str(Path(a.data_dir).resolve()), a.corpus
    common = ["train", "--preset", a.preset, "--data-dir", data_root, "--corpus", corpus, "--max-steps",
              str(a.steps), "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--threads", "1",
              "--precision", "fp32",
              "--eval-every", "0", "--ckpt-every", "0", "--no-progress", "--lr", a.lr, "--warmup-steps", "5",
              "--balance", "none"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {"1 process": [], "EP=2 (2 proc)": ["--ep", "2"], "EP=2 x DP=2 (4 proc)": ["--ep", "2"]}
    curves = {}
    for (name, extra), n in zip(runs.items(), (1, 2, 4)):
        out = work / name.split()[0].replace("=", "") / str(n)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        launch = [sys.executable, "-m", "moekit"] if n == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
             str(free_port()), "-m", "moekit"]
        subprocess.run([*launch, *common, "--out", str(out), *extra], cwd=ROOT, env=env, check=True)
        curves[name] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    base = curves["1 process"]
    diffs = {k: max(abs(x - y) / abs(y) for x, y in zip(v, base)) for k, v in curves.items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (k, v), ls in zip(curves.items(), ("-", "--", ":")):
        ax.plot(range(1, len(v) + 1), v, ls, label=f"{k} (max rel. diff {diffs[k]:.1e})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{a.preset}: one process vs expert parallel (gloo, CPU)")
    ax.legend()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110, bbox_inches="tight")
    res = {"preset": a.preset, "corpus": corpus, "batch": [a.batch_size, a.seq_len], "steps": a.steps,
           "max_rel_diff": diffs, "final_loss": {k: v[-1] for k, v in curves.items()},
           "max_rel_diff_first_20": {k: max(abs(x - y) / abs(y) for x, y in zip(v[:20], base)) for k, v in curves.items()}}
    Path(a.out).with_suffix(".json").write_text(json.dumps({**res, "curves": curves}, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
