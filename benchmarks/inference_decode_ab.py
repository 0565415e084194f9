"""Side-by-side decode step time on tiny-Mixtral: the engine's decode fast paths on vs off.

"off" swaps back what the engine work replaced, in the same process and interleaved with "on"
(so both see the same machine load): SDPA for one-query attention instead of
`decode_attention`, F.linear instead of the compiled GEMV for attention projections and the LM
head (`decode_linear`), and the MoE balance-loss bookkeeping left on.

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

    import torch
    import torch.nn.functional as F

    import moekit
    import moekit.model.attention as A
    import moekit.model.transformer as T
    from moekit.checkpoint.native import atomic_write_text
    from moekit.inference import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    model = moekit.build_model(moekit.get_preset("tiny-mixtral"), dtype=torch.bfloat16, seed=0).eval()
    fast = {"linear": A.decode_linear, "attn": A.decode_attention}

    def sdpa_decode(q, k, v, mask, scale):
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])

    def set_mode(on: bool) -> None:
        A.decode_linear = T.decode_linear = fast["linear"] if on else (lambda x, w, b=None: F.linear(x, w, b))
        A.decode_attention = fast["attn"] if on else sdpa_decode

    rows = []
    for B in a.batch_sizes:
        prompts = [list(range(300 + b, 428 + b)) for b in range(B)]
        times = {"on": [], "off": []}
        for _ in range(a.reps):
            for mode in ("on", "off"):
                eng = Engine(model)
                set_mode(mode == "on")
                if mode == "off":  # the engine turns loss stats off; put the layer back to always-on
                    for layer in model.moe_layers():
                        layer.__class__ = _AlwaysStats.wrap(layer.__class__)
                eng.generate(prompts, SamplingParams(max_new_tokens=a.steps + 1), time_steps=True)
                for layer in model.moe_layers():
                    layer.__class__ = _AlwaysStats.unwrap(layer.__class__)
                times[mode] += eng.stats.step_s
        on, off = (statistics.median(times[m]) * 1e3 for m in ("on", "off"))
        rows.append({"batch": B, "on_ms": on, "off_ms": off, "speedup": off / on})
        print(f"batch {B}: fast paths {on:.1f} ms/step, without {off:.1f} ms/step ({off / on:.2f}x)")
    set_mode(True)
    out = ROOT / "benchmarks" / "results" / f"inference_decode_ab-t{a.threads}"
    cmd = f"python benchmarks/inference_decode_ab.py --threads {a.threads} --batch-sizes " \
          f"{' '.join(map(str, a.batch_sizes))} --reps {a.reps}"
    atomic_write_text(out.with_suffix(".json"), json.dumps({"command": cmd, "threads": a.threads, "rows": rows}, indent=2))
    md = [f"Command: `{cmd}`", "", "| batch | fast paths ms/step | without ms/step | speedup |", "|---|---|---|---|"]
    md += [f"| {r['batch']} | {r['on_ms']:.1f} | {r['off_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


class _AlwaysStats:
    """Makes `loss_stats` read True whatever the engine sets (the pre-change behaviour)."""

    _cache: dict = {}

    @classmethod
    def wrap(cls, klass):
        if getattr(klass, "_always_stats", False):
            return klass
        if klass not in cls._cache:
            cls._cache[klass] = type(klass.__name__, (klass,), {
                "_always_stats": True,
                "loss_stats": property(lambda self: True, lambda self, v: None)})
        return cls._cache[klass]

    @staticmethod
    def unwrap(klass):
        return klass.__mro__[1] if getattr(klass, "_always_stats", False) else klass


if __name__ == "__main__":
    sys.exit(main())
