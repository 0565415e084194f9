"""Quality vs expert compute of inference-time routing choices: val bits per byte against the expert
FLOPs each token actually spends, for plain top-k at k = 1, 2, 3 (an inference-time k override),
cost-aware routing at several lambdas, dynamic-k (top-p) thresholds, per-token cost budgets and
NAEE-style skipping, each as mean +- std over several trained checkpoints (one per seed).

    python benchmarks/routing_pareto.py runs/s0 runs/s1 runs/s2 --data-dir /work/exp/data \
        --eval-tokens 32768 --out benchmarks/results/routing_pareto

Each CKPT_DIR is a `moekit train` run directory (its latest checkpoint) or a model directory.
Writes pareto.json, pareto.md and pareto.png to --out (each atomically). FLOPs per token are summed
over MoE layers and counted by `moekit.moe.cost.FlopsMeter` (the assignments that really ran: unused
dynamic-k slots excluded, real widths for heterogeneous experts; skipped assignments at the layer's
mean expert FLOPs). "cost" settings use dynamic-k with p = 1 so that the lambda rule alone decides
(an extra expert runs only while its probability exceeds lambda x its normalised cost): with equal
widths FLOPs costs are all equal and a fixed-k penalty would not change the choice. Models with
heterogeneous widths (`moekit train --expert-dims ...`) also get fixed-k cost-aware points ("cost-k").
bpb values are exact for the tokens evaluated; nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write_text, load_native  # noqa: E402
from moekit.errors import MoekitError  # noqa: E402
from moekit.memory.skip import clear_skipping, set_skipping  # noqa: E402
from moekit.moe.cost import FlopsMeter, clear_routing_cost, set_routing_cost  # noqa: E402
from moekit.train.evaluate import data_for_checkpoint, evaluate_split, resolve_checkpoint  # noqa: E402

FAMILIES = ("top-k", "cost", "cost-k", "dynamic-k", "budget", "naee")


def cpu_name() -> str:
    """The machine as `moekit doctor` names it (CPU family/model, ISA tier, bf16) and the load average."""
    try:
        from moekit.train.pairs import machine

        return machine()
    except Exception:  # doctor's facts unavailable: the bare model name
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor()


def settings(args, hetero: bool) -> list[tuple[str, str, dict]]:
    """(family, label, options) for every point; options: set_routing_cost kwargs or {"beta": b}."""
    pts = [("top-k", f"k={k}", {"top_k": k}) for k in args.ks]
    km = args.k_max or max(args.ks)
    pts += [("cost", f"lambda={lam:g}", {"lam": lam, "dynamic_k": 1.0, "top_k": km}) for lam in args.lambdas]
    if hetero:
        pts += [("cost-k", f"lambda={lam:g}", {"lam": lam}) for lam in args.lambdas]
    pts += [("dynamic-k", f"p={p:g}", {"dynamic_k": p, "top_k": km}) for p in args.dynamic_k]
    pts += [("budget", f"budget={b:g}", {"budget": b, "top_k": km}) for b in args.budgets]
    pts += [("naee", f"beta={b:g}", {"beta": b}) for b in args.betas]
    return pts


def measure(model, data, opts: dict, eval_tokens: int, seq_len: int) -> dict:
    """bpb and expert FLOPs/token of one setting (routing restored afterwards)."""
    clear_routing_cost(model)
    clear_skipping(model)
    if "beta" in opts:
        set_skipping(model, beta=opts["beta"])
    else:
        set_routing_cost(model, **opts)
    meter = FlopsMeter(model)
    try:
        r = evaluate_split(model, data, "val", max_tokens=eval_tokens, seq_len=seq_len)
    finally:
        meter.close()
        clear_routing_cost(model)
        clear_skipping(model)
    return {"bpb": r["bpb"], **meter.stats()}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(per_ckpt: list[dict], ref_keys: list[str]) -> list[dict]:
    """One row per setting: mean and std over checkpoints of bpb, FLOPs/token and experts/token, and
    of the paired bpb difference to each checkpoint's own trained top-k (`ref_keys`): seeds shift
    every setting of a checkpoint alike, so the paired spread is the one that resolves settings."""
    rows = []
    for key in per_ckpt[0]:
        runs = [(c[key], c[ref]) for c, ref in zip(per_ckpt, ref_keys) if key in c]
        fam, label = key.split("|", 1)
        row = {"family": fam, "setting": label, "n": len(runs)}
        for m in ("bpb", "expert_flops_per_token", "experts_per_token_per_layer"):
            row[m], row[m + "_std"] = _mean_std([r[m] for r, _ in runs])
        row["dbpb"], row["dbpb_std"] = _mean_std([r["bpb"] - ref["bpb"] for r, ref in runs])
        rows.append(row)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Routing quality vs expert FLOPs ({meta['n_checkpoints']} checkpoints)", "",
             f"Command: `{meta['command']}`", "",
             f"Machine: {meta['cpu']}. val bpb on the first {meta['eval_tokens']} tokens; mean +- std over "
             "checkpoints (seeds). Expert FLOPs per token are summed over MoE layers.", "",
             "Δ bpb: paired difference to the same checkpoint's trained top-k (mean +- std over checkpoints).", "",
             "| family | setting | val bpb | Δ bpb vs trained top-k | expert MFLOPs / token | experts / token / layer |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['setting']} | {r['bpb']:.4f} +- {r['bpb_std']:.4f} | "
                     f"{r['dbpb']:+.4f} +- {r['dbpb_std']:.4f} | "
                     f"{r['expert_flops_per_token'] / 1e6:.3f} +- {r['expert_flops_per_token_std'] / 1e6:.3f} | "
                     f"{r['experts_per_token_per_layer']:.2f} +- {r['experts_per_token_per_layer_std']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    marks = dict(zip(FAMILIES, "osD^vx"))
    for fam in FAMILIES:
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["expert_flops_per_token"])
        if not rs:
            continue
        x = [r["expert_flops_per_token"] / 1e6 for r in rs]
        ax.errorbar(x, [r["bpb"] for r in rs], yerr=[r["bpb_std"] for r in rs],
                    xerr=[r["expert_flops_per_token_std"] / 1e6 for r in rs], marker=marks[fam], capsize=3,
                    linestyle="-" if fam != "top-k" else "--", label=fam)
        if fam == "top-k":
            for r, xi in zip(rs, x):
                ax.annotate(r["setting"], (xi, r["bpb"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("expert MFLOPs per token (all MoE layers)")
    ax.set_ylabel("val bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    # Atomic: render to a temp file in the same directory, then rename over the target.
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="moekit train run directories (one per seed) or model dirs")
    ap.add_argument("--data-dir", default=None, help="prepared data (default: the one each run recorded)")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    ap.add_argument("--dynamic-k", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--budgets", type=float, nargs="*", default=[],
                    help="per-token budgets in normalised cost units (useful with heterogeneous widths)")
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    ap.add_argument("--k-max", type=int, default=None,
                    help="most experts a token may run under cost / dynamic-k / budget (default: max of --ks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/routing_pareto"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Plan: 1. per checkpoint: load, evaluate every setting; 2. mean/std per setting across
    # checkpoints; 3. JSON, markdown and plot, each written atomically.
    per_ckpt, names, refs = [], [], []
    for ck in args.checkpoints:
        path = resolve_checkpoint(ck)
        model = load_native(path).eval()
        if not model.moe_layers():
            raise MoekitError(f"{path}: a dense model; the Pareto script needs MoE checkpoints")
        data = data_for_checkpoint(path, args.data_dir)
        hetero = bool(model.config.moe.expert_dims)
        res = {}
        for fam, label, opts in settings(args, hetero):
            if opts.get("top_k", 0) > model.config.moe.num_experts:
                continue
            r = measure(model, data, opts, args.eval_tokens, args.seq_len)
            res[f"{fam}|{label}"] = r
            print(f"{ck} {fam} {label}: bpb {r['bpb']:.4f}, {r['expert_flops_per_token'] / 1e6:.3f} MFLOPs/token",
                  file=sys.stderr)
        per_ckpt.append(res)
        names.append(str(path))
        refs.append(f"top-k|k={model.config.moe.top_k}")
        if refs[-1] not in res:  # the trained k was not among --ks: measure it as the reference
            res[refs[-1]] = measure(model, data, {"top_k": model.config.moe.top_k}, args.eval_tokens, args.seq_len)
    rows = aggregate(per_ckpt, refs)
    meta = {"command": "python benchmarks/routing_pareto.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": cpu_name(), "eval_tokens": args.eval_tokens, "n_checkpoints": len(per_ckpt), "checkpoints": names}
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "rows": rows, "per_checkpoint": per_ckpt}
    atomic_write_text(args.out / "pareto.json", json.dumps(payload, indent=1))
    md = markdown(rows, meta)
    atomic_write_text(args.out / "pareto.md", md)
    plot(rows, args.out / "pareto.png", f"bpb vs expert FLOPs, mean +- std over {len(per_ckpt)} checkpoints")
    print(md)
    print(f"wrote {args.out}/pareto.json, pareto.md, pareto.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MoekitError as e:
        print(f"routing_pareto: error: {e}", file=sys.stderr)
        sys.exit(2)
