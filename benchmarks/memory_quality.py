"""Quality of fewer experts: pruning criteria (frequency, REAP, random) vs experts kept, NAEE
skipping (expert-FLOPs saved vs bpb) and PESF (prefill speed and bpb), in bits per byte on a
prepared split. Writes JSON, markdown and a plot.

    python benchmarks/memory_quality.py --model /work/wt-quant/runs/small-moe-long \
        --data /work/wt-quant/data/en-prose-bpe8192 --eval-tokens 32768 --calib-tokens 32768

Numbers are indicative on a shared machine: the bpb values are exact for the tokens evaluated,
the prefill timings are medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moekit  # noqa: E402
from moekit.data import load_prepared  # noqa: E402
from moekit.memory import calibrate, choose_experts, clear_skipping, prune_model, set_skipping, skip_stats  # noqa: E402
from moekit.memory.prune import allocate_experts  # noqa: E402
from moekit.train.evaluate import evaluate_split, resolve_checkpoint  # noqa: E402


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def bpb(model, data, split, n):
    return evaluate_split(model, data, split, max_tokens=n, seq_len=256)["bpb"]


@torch.inference_mode()
def prefill_ms(model, ids_1S, settings, reps):
    """Median prefill time per setting, settings interleaved rep by rep (load noise hits all alike)."""
    times = {k: [] for k in settings}
    for _ in range(reps):
        for name, (beta, alpha) in settings.items():
            set_skipping(model, beta=beta, alpha=alpha)
            for layer in model.moe_layers():
                layer.loss_stats = False
            t = time.perf_counter()
            model(ids_1S)
            times[name].append(1e3 * (time.perf_counter() - t))
            clear_skipping(model)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--keep", type=int, nargs="+", default=None, help="experts kept (default: E-1 .. top_k)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.7])
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--criteria", nargs="+", default=["frequency", "reap", "random", "reap-budget"],
                    help="pruning criteria; reap-budget = REAP with --per-layer-budget (same total kept)")
    ap.add_argument("--only-prune", action="store_true", help="skip the NAEE / PESF measurements")
    ap.add_argument("--out", default="benchmarks/results/memory_quality")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.model)
    model = moekit.load_model(ckpt).eval()
    data = load_prepared(a.data)
    E, K = model.config.moe.num_experts, model.config.moe.top_k
    res = {"model": str(ckpt), "data": a.data, "split": a.split, "eval_tokens": a.eval_tokens,
           "calib_tokens": a.calib_tokens, "cpu": cpu_name(), "threads": a.threads, "num_experts": E, "top_k": K}
    t0 = time.time()
    res["base_bpb"] = bpb(model, data, a.split, a.eval_tokens)
    print(f"base bpb {res['base_bpb']:.4f}", flush=True)
    # 1. pruning curves
    stats = calibrate(model, data.dataset("train").tokens[: a.calib_tokens + 1], seq_len=256)
    keeps = a.keep or list(range(E - 1, K - 1, -1))
    res["prune"] = {}
    res["kept_per_layer"] = {}
    for crit in a.criteria:
        res["prune"][crit] = {}
        for n in keeps:
            if crit == "reap-budget":
                chosen = allocate_experts(stats, n, "reap", K)
                res["kept_per_layer"][n] = [len(k) for k in chosen]
            else:
                chosen = choose_experts(stats, n, crit, E, len(stats.layers), seed=0)
            v = bpb(prune_model(model, chosen), data, a.split, a.eval_tokens)
            res["prune"][crit][n] = v
            print(f"prune {crit:9s} keep {n}/{E}: bpb {v:.4f}", flush=True)
    if a.only_prune:
        res["naee"], res["pesf"], res["prefill_ms"] = {}, {}, {}
        res["seconds"] = time.time() - t0
        write(res, Path(a.out))
        return 0
    # 2. NAEE
    res["naee"] = {}
    for beta in a.betas:
        set_skipping(model, beta=beta)
        v = bpb(model, data, a.split, a.eval_tokens)
        res["naee"][beta] = {"bpb": v, "flops_saved": skip_stats(model)["flops_saved"]}
        clear_skipping(model)
        print(f"NAEE beta {beta}: bpb {v:.4f}, expert FLOPs saved {res['naee'][beta]['flops_saved']:.3f}", flush=True)
    # 3. PESF (eval windows are prefills of 256 tokens)
    res["pesf"] = {}
    for alpha in a.alphas:
        set_skipping(model, alpha=alpha)
        v = bpb(model, data, a.split, a.eval_tokens)
        res["pesf"][alpha] = {"bpb": v, "flops_saved_prefill": skip_stats(model)["flops_saved_prefill"]}
        clear_skipping(model)
    toks = torch.as_tensor(data.dataset(a.split).tokens[: a.prefill_len].astype("int64")).unsqueeze(0)
    settings = {"auto": (0.0, 0.0), "skip-backend noop": (1e-12, 0.0),
                **{f"alpha {al}": (0.0, al) for al in a.alphas}}
    ms = prefill_ms(model, toks, settings, a.reps)
    res["prefill_ms"] = ms
    for alpha in a.alphas:
        res["pesf"][alpha]["prefill_speedup_vs_auto"] = ms["auto"] / ms[f"alpha {alpha}"]
        res["pesf"][alpha]["prefill_speedup_vs_noop"] = ms["skip-backend noop"] / ms[f"alpha {alpha}"]
        print(f"PESF alpha {alpha}: {res['pesf'][alpha]}", flush=True)
    res["seconds"] = time.time() - t0
    write(res, Path(a.out))
    return 0


def write(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    E = res["num_experts"]
    lines = [f"# Memory wall: quality ({res['model']}, {res['split']} first {res['eval_tokens']} tokens, {res['cpu']})",
             "", f"Base bpb: {res['base_bpb']:.4f}", "", "| experts kept | " + " | ".join(res["prune"]) + " |",
             "|---:|" + "---:|" * len(res["prune"])]
    keeps = list(next(iter(res["prune"].values())))
    for n in keeps:
        lines.append(f"| {n}/{E} | " + " | ".join(f"{res['prune'][c][n]:.4f}" for c in res["prune"]) + " |")
    lines += ["", "| NAEE beta | expert FLOPs saved | bpb |", "|---:|---:|---:|"]
    lines += [f"| {b} | {v['flops_saved']:.3f} | {v['bpb']:.4f} |" for b, v in res["naee"].items()]
    lines += ["", "| PESF alpha | prefill expert FLOPs saved | bpb | prefill speedup vs auto | vs skip backend no-op |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {al} | {v['flops_saved_prefill']:.3f} | {v['bpb']:.4f} | {v['prefill_speedup_vs_auto']:.2f}x | "
              f"{v['prefill_speedup_vs_noop']:.2f}x |" for al, v in res["pesf"].items()]
    lines += ["", "Prefill ms (median): " + ", ".join(f"{k} {v:.1f}" for k, v in res["prefill_ms"].items())]
    if res.get("kept_per_layer"):
        lines += ["", "reap-budget experts kept per MoE layer: " + "; ".join(
            f"{n}: {v}" for n, v in res["kept_per_layer"].items())]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for c, vals in res["prune"].items():
        ks = sorted(vals, key=int)
        ax[0].plot([int(k) for k in ks], [vals[k] for k in ks], marker="o", label=c)
    ax[0].axhline(res["base_bpb"], color="0.5", ls="--", label="all experts")
    ax[0].set_xlabel(f"experts kept of {E}")
    ax[0].set_ylabel("bpb")
    ax[0].legend()
    ax[0].set_title("pruning criteria")
    if not res["naee"]:
        ax[1].set_visible(False)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
        return
    fs = [v["flops_saved"] for v in res["naee"].values()]
    ax[1].plot([0] + fs, [res["base_bpb"]] + [v["bpb"] for v in res["naee"].values()], marker="o", label="NAEE (beta)")
    ax[1].plot([0] + [v["flops_saved_prefill"] for v in res["pesf"].values()],
               [res["base_bpb"]] + [v["bpb"] for v in res["pesf"].values()], marker="s", label="PESF (alpha)")
    ax[1].set_xlabel("routed-expert FLOPs saved")
    ax[1].set_ylabel("bpb")
    ax[1].legend()
    ax[1].set_title("dynamic skipping")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
