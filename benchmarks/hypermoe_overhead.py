"""Benchmark: step-time overhead of HyperMoE (moekit.moe.hypermoe) over the same MoE without it.

Shape legend: B batch, S sequence.

Two models, same preset and seed (so the same base weights): the MoE (`--preset`, default mini-moe) and
the MoE with a HyperExpert of bottleneck `--hyper-dim`. Each timed round runs one training step
(forward + backward + AdamW) of each, in alternating order, on the same batch, then one no-grad
forward (the eval / prefill path) of each: machine noise hits both alike, and the ratio of the
medians (and the median of the per-round ratios) is what counts, not the absolute times.

Usage:
  python benchmarks/hypermoe_overhead.py --threads 1                  # 30 rounds, B8 x S128 (~1 min quiet)
  python benchmarks/hypermoe_overhead.py --threads 1 --data-dir /work/exp/data --rounds 60
Writes benchmarks/results/hypermoe_overhead.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit import build_model, count_params, get_preset  # noqa: E402
from moekit.checkpoint.native import atomic_write_text  # noqa: E402
from moekit.plan.spec import flops_per_token  # noqa: E402


def batches(n: int, B: int, S: int, vocab: int, data_dir: str | None):
    """Real train batches when prepared data is given (read only), else random ids (same timing)."""
    if data_dir:
        from moekit.data import load_prepared

        data = load_prepared(data_dir)
        s = data.dataset("train").sampler(B, S, seed=0)
        return [next(s) for _ in range(n)], data.vocab_size, f"train batches of {data.root}"
    g = torch.Generator().manual_seed(0)
    w = [torch.randint(0, vocab, (B, S + 1), generator=g) for _ in range(n)]
    return [(x[:, :-1], x[:, 1:]) for x in w], vocab, "random token ids"


def layer_times(model, x_BS: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median forward + backward seconds of the first MoE layer (router, experts, shared, no
    HyperExpert) and of its HyperExpert on both paths, interleaved, on that layer's real input."""
    layer, hn = model.moe_layers()[0], model.hypernet
    with torch.no_grad():
        h_BSD = model.layers[0].ffn_norm(model.embed(x_BS))  # the layer's input shape and scale
    x_TD = h_BSD.reshape(-1, h_BSD.shape[-1]).requires_grad_(True)
    ids_TK = layer.router(x_TD).topk_ids_TK
    hyper, layer.hyper = layer.hyper, None
    runs = {"moe_layer": lambda: layer(x_TD)[0].sum().backward(),
            "hyper_grouped": lambda: hn(x_TD, ids_TK, 0).sum().backward(),
            "hyper_factorised": lambda: hn.forward_factorised(x_TD, ids_TK, 0).sum().backward()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(rounds):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    finally:
        layer.hyper = hyper
        model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    """Model name plus family/model (a VM may print only "AMD EPYC") and the bf16/AMX flags."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        flags = info.get("flags", "").split()
        feats = [f for f in ("avx512_bf16", "amx_tile") if f in flags]
        return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}"
                f"{', ' + ', '.join(feats) if feats else ''}; {os.cpu_count()} cores)")
    except OSError:
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    # Plan: 1. build both models (same seed) and their optimizers; 2. warm up; 3. interleaved rounds:
    # a train step of each (order alternating), then a no-grad forward of each; 4. medians and ratios,
    # written as JSON and a markdown table.
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--hyper-dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None, help="prepared data to read batches from (never written)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hypermoe_overhead"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    base_cfg = get_preset(a.preset)
    data, vocab, source = batches(a.rounds + a.warmup, a.batch, a.seq, base_cfg.vocab_size, a.data_dir)
    base_cfg = base_cfg.replace(vocab_size=vocab)
    cfgs = {"moe": base_cfg,
            "hypermoe": base_cfg.replace(moe=dataclasses.replace(base_cfg.moe, hyper_dim=a.hyper_dim))}
    models = {k: build_model(c, seed=0).train() for k, c in cfgs.items()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    train_s: dict[str, list[float]] = {k: [] for k in models}
    fwd_s: dict[str, list[float]] = {k: [] for k in models}

    def step(k: str, x, y) -> float:
        t = time.perf_counter()
        models[k](x, labels=y).loss.backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def forward(k: str, x) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            models[k](x)
        return time.perf_counter() - t

    for i, (x, y) in enumerate(data):
        order = list(models) if i % 2 == 0 else list(models)[::-1]
        times = {k: step(k, x, y) for k in order}
        ftimes = {k: forward(k, x) for k in order}
        if i >= a.warmup:
            for k in models:
                train_s[k].append(times[k])
                fwd_s[k].append(ftimes[k])
    layer = layer_times(models["hypermoe"], data[0][0], a.rounds)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    pairs = lambda d: med([h / m for h, m in zip(d["hypermoe"], d["moe"])])  # noqa: E731
    pcs = {k: count_params(c) for k, c in cfgs.items()}
    fl = {k: flops_per_token(c, a.seq // 2) for k, c in cfgs.items()}
    res = {
        "preset": a.preset, "hyper_dim": a.hyper_dim, "batch": a.batch, "seq": a.seq, "rounds": a.rounds,
        "threads": a.threads, "batches": source, "cpu": cpu_name(), "load_avg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "train_step_s": {k: med(v) for k, v in train_s.items()},
        "forward_s": {k: med(v) for k, v in fwd_s.items()},
        "train_overhead_ratio_of_medians": med(train_s["hypermoe"]) / med(train_s["moe"]),
        "train_overhead_median_paired": pairs(train_s),
        "forward_overhead_ratio_of_medians": med(fwd_s["hypermoe"]) / med(fwd_s["moe"]),
        "forward_overhead_median_paired": pairs(fwd_s),
        "params": {k: {"total": p.total_params, "active": p.active_params, "hypernetwork": p.total["hypernetwork"]}
                   for k, p in pcs.items()},
        "flops_per_token": fl,
        "layer_fwd_bwd_s": layer,
        "raw": {"train_s": train_s, "forward_s": fwd_s},
    }
    cmd = (f"python benchmarks/hypermoe_overhead.py --preset {a.preset} --hyper-dim {a.hyper_dim} --batch {a.batch} "
           f"--seq {a.seq} --rounds {a.rounds} --threads {a.threads}"
           + (f" --data-dir {a.data_dir}" if a.data_dir else ""))
    md = [f"## HyperMoE step-time overhead ({a.preset}, hyper_dim {a.hyper_dim})", "",
          f"`{cmd}`", "",
          f"{res['cpu']}, {a.threads} thread(s), torch {torch.__version__}, 1-min load average at the end "
          f"{res['load_avg_1min']:.1f}; B{a.batch} x S{a.seq}, {source}; median of {a.rounds} interleaved rounds.", "",
          "| model | total params | active params | hypernetwork params | FLOPs/token (bound) | train step (ms) "
          "| no-grad forward (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for k in models:
        p, ms = res["params"][k], lambda d: f"{d[k] * 1e3:.1f}"  # noqa: E731
        md.append(f"| {k} | {p['total'] / 1e6:.3f}M | {p['active'] / 1e6:.3f}M | {p['hypernetwork'] / 1e3:.1f}K | "
                  f"{fl[k]['total'] / 1e6:.2f}M | {ms(res['train_step_s'])} | {ms(res['forward_s'])} |")
    md += ["", f"HyperMoE / MoE: train step {res['train_overhead_ratio_of_medians']:.3f}x (median of per-round "
           f"ratios {res['train_overhead_median_paired']:.3f}x), no-grad forward "
           f"{res['forward_overhead_ratio_of_medians']:.3f}x "
           f"(paired {res['forward_overhead_median_paired']:.3f}x).", "",
           f"One MoE layer, forward + backward on its {a.batch * a.seq} tokens (median ms): router + experts "
           f"{layer['moe_layer'] * 1e3:.1f}; HyperExpert per expert set + grouped GEMM "
           f"{layer['hyper_grouped'] * 1e3:.1f}; factorised fallback {layer['hyper_factorised'] * 1e3:.1f}.", ""]
    out = Path(a.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    atomic_write_text(out.with_suffix(".md"), "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
