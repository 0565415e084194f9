"""Fixed cost of one decode step: tiny-Mixtral's structure with tiny weights.

Same layers, experts, heads and KV cache as the reference workload (8 layers, 8 experts top-2, 16
query / 4 KV heads), but dim 256, expert width 64 and vocab 512, so the weight reads cost almost
nothing and what remains is the per-step work around them: Python, small PyTorch ops, kernel calls
and their parallel regions. Prints the median batch-1 step in ms (kernels on, and off with
`MOEKIT_KERNELS=0` when --both) and writes nothing.

    python benchmarks/decode_overhead.py [--threads 2] [--steps 200] [--both]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_ms(model, steps: int) -> float:
    import torch

    cache = model.new_cache(1, 64 + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ts = []
    with torch.inference_mode():
        model(ids, cache=cache)
        cache.advance(64)
        tok = ids[:, :1]
        for _ in range(steps):
            t = time.perf_counter()
            model(tok, cache=cache)
            cache.advance(1)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts[steps // 10:]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--both", action="store_true", help="also time with MOEKIT_KERNELS=0")
    a = ap.parse_args()
    import torch

    import moekit

    torch.set_num_threads(a.threads)
    cfg = moekit.get_preset("tiny-mixtral")
    cfg = dataclasses.replace(cfg, dim=256, vocab_size=512, moe=dataclasses.replace(cfg.moe, expert_dim=64))
    model = moekit.build_model(cfg, seed=0, dtype=torch.bfloat16).eval()
    for layer in model.moe_layers():
        layer.loss_stats = False  # as the engine runs it
    for mode in (("1", "0") if a.both else ("1",)):
        os.environ["MOEKIT_KERNELS"] = mode
        print(f"kernels {'on' if mode == '1' else 'off'}: {step_ms(model, a.steps):.2f} ms per batch-1 decode step "
              f"({a.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
