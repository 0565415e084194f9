"""Planner prediction vs measured decode time for a moekit model on this CPU.

Builds a preset (default tiny-mixtral: 8 layers, dim 1024, 8 experts top-2, 640M parameters) in
bf16, prefills a random prompt per row, then times cached decode steps at each batch size and
prints, side by side: the planner's roofline lower bound on `this-cpu` (measured stream read
bandwidth), the planner's estimate at the measured decode-shaped GEMV bandwidth, and the measured
median step time. It also checks the distinct-experts formula against the experts the decode
steps actually touched. Writes benchmarks/results/plan_vs_measured.json and .md.

    python benchmarks/plan_vs_measured.py --preset tiny-mixtral --batch 1 8 --steps 24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import moekit
from moekit.checkpoint.native import atomic_write_text
from moekit.plan import decode_step, measure_this_cpu, weight_memory
from moekit.plan.hardware import GIB

ROOT = Path(__file__).resolve().parents[1]


def measure(model, batch: int, prompt: int, steps: int, warmup: int, seed: int) -> dict:
    """Median wall time of a cached decode step (one token per row) after a `prompt`-token prefill,
    and the mean number of distinct experts each MoE layer ran per step."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(batch, prompt + warmup + steps + 1)
    times, distinct = [], []
    with torch.inference_mode():
        out = model(torch.randint(0, cfg.vocab_size, (batch, prompt), generator=g), cache=cache,
                    logits_at=torch.full((batch,), prompt - 1))
        cache.advance(prompt)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in tqdm(range(warmup + steps), desc=f"decode b{batch}", leave=False):
            t0 = time.perf_counter()
            out = model(tok, cache=cache)
            cache.advance(1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
                layers = [r for r in out.routing if r is not None]
                if layers:
                    distinct.append(sum(int((r.tokens_per_expert > 0).sum()) for r in layers) / len(layers))
    return {"ms": statistics.median(times) * 1e3, "ms_all": [t * 1e3 for t in times],
            "distinct_experts_per_layer": statistics.mean(distinct) if distinct else 0.0,
            "context": prompt + warmup + steps // 2}


def markdown(res: dict) -> str:
    lines = [
        f"Model `{res['preset']}` in bf16 ({res['weight_gib']:.2f} GiB of weights), prompt {res['prompt']} tokens, "
        f"{res['steps']} timed decode steps after {res['warmup']} warm-up steps; {res['threads']} threads, "
        f"torch {res['torch']}, {res['cpu']}; 1-minute load average {res['load_average_1m']:.1f} on "
        f"{res['cpus']} CPUs. The host's bandwidth is measured again right before each row.", "",
        "| batch | experts/layer predicted / seen | stream read GB/s | bound (ms) | bf16 GEMV GB/s "
        "| estimate @ GEMV (ms) | measured median (best) ms | median / bound | tok/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['pred_distinct']:.2f} / {r['seen_distinct']:.2f} | {r['stream_gbs']:.1f} "
                     f"| {r['bound_ms']:.1f} | {r['gemv_gbs']:.1f} | {r['gemv_ms']:.1f} "
                     f"| {r['measured_ms']:.1f} ({r['best_ms']:.1f}) | {r['measured_ms'] / r['bound_ms']:.1f}x "
                     f"| {r['batch'] / r['measured_ms'] * 1e3:,.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny-mixtral")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "plan_vs_measured.json")
    ap.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results" / "plan_vs_measured.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Plan: 1. build the model; 2. per batch: measure the host (bandwidth, GEMV, peaks) right before
    # timing, so prediction and measurement see the same load on a shared machine; 3. write results.
    cfg = moekit.get_preset(args.preset)
    model = moekit.build_model(cfg, dtype=torch.bfloat16, seed=0).eval()
    rows, hw = [], None
    for b in args.batch:
        hw = measure_this_cpu()
        m = measure(model, b, args.prompt, args.steps, args.warmup, seed=b)
        bound = decode_step(cfg, hw, b, m["context"], "bf16")
        gemv = decode_step(cfg, hw, b, m["context"], "bf16", bandwidth_gbs=hw.gemv_bandwidth_gbs)
        rows.append({"batch": b, "context": m["context"], "pred_distinct": bound.distinct_experts,
                     "seen_distinct": m["distinct_experts_per_layer"], "stream_gbs": hw.bandwidth_gbs,
                     "gemv_gbs": hw.gemv_bandwidth_gbs, "bf16_tflops": hw.bf16_tflops,
                     "bound_ms": bound.time_s * 1e3, "bound": bound.bound, "gemv_ms": gemv.time_s * 1e3,
                     "measured_ms": m["ms"], "best_ms": min(m["ms_all"]), "measured_ms_all": m["ms_all"]})
    res = {"preset": args.preset, "weight_gib": weight_memory(cfg)["bf16"] / GIB, "prompt": args.prompt,
           "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": hw.source if hw else "", "cpus": os.cpu_count(),
           "rows": rows, "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")}
    atomic_write_text(args.json, json.dumps(res, indent=1))
    md = markdown(res)
    atomic_write_text(args.md, md)
    print(md)
    print(f"wrote {args.json}, {args.md}")


if __name__ == "__main__":
    main()
