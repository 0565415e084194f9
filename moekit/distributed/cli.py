"""`moekit simulate-ep`: replay a routing trace at large EP degrees; report, JSON and plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from moekit.checkpoint.native import atomic_write, atomic_write_text


def _plots(rep: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = {int(g): r for g, r in rep["results"].items()}
    if not ok:
        return made
    # 1. load per rank, layer 0, at the largest simulated degree: contiguous vs EPLB.
    G = max(ok)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for name, style in (("contiguous", dict(alpha=0.6)), ("eplb", dict(alpha=0.8))):
        if name in ok[G]:
            load = ok[G][name]["layers"][0]["load_per_rank"]
            b = ok[G][name]["layers"][0]["balancedness"]
            ax.bar(range(len(load)), load, label=f"{name} (balancedness {b:.3f})", **style)
    ax.set_xlabel("rank")
    ax.set_ylabel("rows per step (layer 0)")
    ax.set_title(f"load per rank at EP={G}")
    ax.legend()
    made.append(out / "load_per_rank.png")
    atomic_write(made[-1], lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    # 2. estimated all-to-all time per layer vs EP degree.
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("contiguous", "eplb"):
        gs = [g for g in sorted(ok) if name in ok[g]]
        if gs:
            ax.plot(gs, [ok[g][name]["summary"]["dispatch_us"] + ok[g][name]["summary"]["combine_us"] for g in gs],
                    marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("EP degree")
    ax.set_ylabel("dispatch + combine (us, est.)")
    ax.set_title(f"all-to-all time per layer, {rep['network']['name']}")
    ax.legend()
    made.append(out / "time_vs_ep.png")
    atomic_write(made[-1], lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return made


def simulate_ep_cli(trace: str, ep: list[int] | None = None, nodes: int | None = None, redundant: int = 0,
                    groups: int = 1, hardware: Literal["h800", "h100-80gb", "h200-141gb", "a100-80gb", "mi300x", "h800-deepep-ll"] = "h800",
                    hidden: int | None = None, dispatch_dtype: Literal["bf16", "fp8", "fp32", "fp16"] = "bf16",
                    combine_dtype: Literal["bf16", "fp32", "fp16"] = "bf16", tokens_per_rank: int | None = None,
                    node_limit: int | None = None, num_experts: int | None = None, out: str = "runs/simulate-ep",
                    plots: bool = True) -> int:
    """Replay a routing trace at EP degrees this machine cannot run: bytes, load, balancedness, time.

    TRACE is a run's telemetry.jsonl (or its run directory), an ids JSONL
    (`moekit.distributed.trace.record_ids`), Megatron's router trace (a router_trace_rank0.jsonl or the
    directory of one file per rank), or `synthetic:E=256,k=8,tokens=4096,zipf=1.0`. Per EP
    degree and layer: dispatch/combine bytes per rank intra- vs inter-node, max/mean rank load,
    straggler ratio, SGLang balancedness before (contiguous experts) and after EPLB, nodes per
    token against --node-limit, and an all-to-all time estimate from the --hardware link model.
    Writes report.json, load_per_rank.png and time_vs_ep.png to --out.

    Args:
        trace: telemetry.jsonl / run directory / ids JSONL / synthetic:... spec.
        ep: EP degrees to simulate (default 8 16 64 256).
        nodes: nodes per EP group (default: 8 ranks per node).
        redundant: redundant expert slots (EPLB replicas); E + redundant is rounded up to a multiple of each EP degree.
        groups: expert groups for EPLB's hierarchical policy (1 = global policy).
        hardware: link model (NVLink/RDMA bandwidth per GPU).
        hidden: model dim (default: from the trace header).
        dispatch_dtype: wire dtype of dispatched rows (fp8 adds one fp32 scale per 128 values).
        combine_dtype: wire dtype of combined rows.
        tokens_per_rank: resample each step to this many tokens per rank (replay a small trace at a large EP).
        node_limit: DeepSeek-V3 node-limited routing M (report tokens reaching more than M nodes).
        num_experts: experts per layer (Megatron traces do not record it; default: largest id + 1).
        out: output directory.
        plots: write the PNG plots.
    """
    from moekit.distributed.simulate import simulate
    from moekit.distributed.trace import read_trace

    tr = read_trace(trace, num_experts)
    rep = simulate(tr, ep or [8, 16, 64, 256], hidden=hidden, network=hardware, nodes=nodes, redundant=redundant,
                   groups=groups, dispatch_dtype=dispatch_dtype, combine_dtype=combine_dtype,
                   tokens_per_rank=tokens_per_rank, node_limit=node_limit)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    atomic_write_text(o / "report.json", json.dumps(rep, indent=1))
    print(f"trace {tr.source}: {len(tr.layers)} MoE layers, {tr.num_experts} experts, top-{tr.top_k}, "
          f"hidden {rep['hidden']}, {hardware}, {redundant} redundant")
    print(f"{'EP':>5} {'nodes':>5} {'layout':>10} {'balanced':>9} {'max/mean':>9} {'straggler':>9} "
          f"{'disp MB/rank':>12} {'disp us':>8} {'comb us':>8} {'nodes/tok':>9}")
    for G, r in rep["results"].items():
        for name in ("contiguous", "eplb"):
            if name in r:
                s = r[name]["summary"]
                print(f"{G:>5} {r['nodes']:>5} {name:>10} {s['balancedness']:>9.3f} {s['load_max_over_mean']:>9.3f} "
                      f"{s['straggler_ratio']:>9.3f} {s['dispatch_bytes_max_rank'] / 1e6:>12.3f} "
                      f"{s['dispatch_us']:>8.1f} {s['combine_us']:>8.1f} {s.get('nodes_per_token_mean', float('nan')):>9.2f}")
    if plots:
        for p in _plots(rep, o):
            print(f"wrote {p}")
    print(f"wrote {o / 'report.json'}")
    return 0
