"""Where moekit's generation time goes on the reference workload (torch.profiler, CPU).

Profiles `--steps` decode steps at each batch size and one prefill of `--prompt` tokens on
tiny-Mixtral (bf16, random init), and writes the top operators by self time for each phase to
benchmarks/results/inference-profile.md (and prints it). docs/performance.md quotes this file.

    python benchmarks/inference_profile.py [--threads 2] [--batch-sizes 1 8] [--prompt 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _table(prof, total_s: float, rows: int) -> list[str]:
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    lines = ["| operator | calls | self ms | share of wall |", "|---|---|---|---|"]
    for e in ev:
        ms = e.self_cpu_time_total / 1e3
        lines.append(f"| `{e.key}` | {e.count} | {ms:.1f} | {ms / 1e3 / total_s:.0%} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference-profile.md")
    a = ap.parse_args()

    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import moekit
    from moekit.checkpoint.native import atomic_write_text
    from moekit.inference import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    model = moekit.build_model(moekit.get_preset("tiny-mixtral"), dtype=torch.bfloat16, seed=0).eval()
    eng = Engine(model)
    out = [f"# moekit generation profile: tiny-mixtral, bf16, {a.threads} threads", "",
           f"Command: `python benchmarks/inference_profile.py --threads {a.threads} --batch-sizes "
           f"{' '.join(map(str, a.batch_sizes))} --prompt {a.prompt} --steps {a.steps}`", ""]
    for layer in model.moe_layers():
        layer.loss_stats = False  # as the engine runs it
    for B in a.batch_sizes:
        # Decode steps only: the 128-token prefill and 2 warm-up steps run before the profiler starts.
        ids = torch.tensor([list(range(300 + b, 428 + b)) for b in range(B)])
        cache = model.new_cache(B, 128 + a.steps + 4)
        with torch.inference_mode():
            logits = eng.prefill(cache, ids, torch.full((B,), 128))
            for _ in range(2):
                logits = eng.decode_step(cache, logits.argmax(-1))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    logits = eng.decode_step(cache, logits.argmax(-1))
                wall = time.perf_counter() - t0
        out += [f"## decode, batch {B} (prompt 128, {a.steps} steps; {1e3 * wall / a.steps:.1f} ms per step "
                f"under the profiler)", ""] + _table(prof, wall, a.rows) + [""]
    prompt = [list(range(300, 300 + a.prompt))]
    eng.generate(prompt, SamplingParams(max_new_tokens=1))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        eng.generate(prompt, SamplingParams(max_new_tokens=1))
        wall = time.perf_counter() - t0
    out += [f"## prefill, batch 1, {a.prompt} tokens ({a.prompt / wall:,.0f} tok/s under the profiler)", ""]
    out += _table(prof, wall, a.rows) + [""]
    text = "\n".join(out)
    atomic_write_text(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
