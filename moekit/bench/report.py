"""Benchmark report: roofline fractions, side-by-side ratios, markdown tables and the PNG plot."""

from __future__ import annotations

from pathlib import Path

from moekit.bench.roofline import Machine, decode_bound, prefill_bound
from moekit.config import ModelConfig

TARGETS = [
    # (label, metric, batch, engine compared against, minimum ratio)
    ("prefill b1 vs transformers", "prefill_tok_s", 1, "transformers", 2.0),
    ("decode b1 vs transformers", "decode_tok_s", 1, "transformers", 2.0),
    ("decode b1 vs llama.cpp", "decode_tok_s", 1, "llama.cpp", 1.2),
    ("decode b8 vs transformers", "decode_tok_s", 8, "transformers", 2.0),
    ("decode b8 vs llama.cpp", "decode_tok_s", 8, "llama.cpp", 2.0),
]


def add_bounds(results: list[dict], cfgs: dict[str, ModelConfig], m: Machine) -> None:
    """Annotate each result with its roofline bounds and the fraction of them it reaches."""
    for r in results:
        cfg = cfgs["dense"] if r["engine"] == "dense" else cfgs["moe"]
        pb = prefill_bound(cfg, m, r["batch"], r["prompt"])
        db = decode_bound(cfg, m, r["batch"], r["prompt"] + r["new_tokens"] // 2)
        r["prefill_bound_tok_s"], r["prefill_frac"] = pb["tok_s"], r["prefill_tok_s"] / pb["tok_s"]
        r["decode_bound_tok_s"], r["decode_frac"] = db["tok_s"], r["decode_tok_s"] / db["tok_s"]
        r["decode_bound_kind"] = db["bound"]


def _find(results, engine, batch, prompt):
    return next((r for r in results if r["engine"] == engine and r["batch"] == batch and r["prompt"] == prompt), None)


def ratios(results: list[dict]) -> list[dict]:
    """The issue's targets as ratios measured in this run (prefill at the longest prompt, decode
    at the shortest); missing engines are reported as not measured."""
    prompts = sorted({r["prompt"] for r in results})
    out = []
    for label, metric, batch, other, target in TARGETS:
        prompt = prompts[-1] if metric == "prefill_tok_s" else prompts[0]
        a, b = _find(results, "moekit", batch, prompt), _find(results, other, batch, prompt)
        row = {"target": label, "prompt": prompt, "min_ratio": target, "ratio": None, "met": None}
        if a and b:
            row["ratio"] = a[metric] / b[metric]
            row["met"] = row["ratio"] >= target
        out.append(row)
    a = _find(results, "moekit", 1, prompts[0])
    if a:
        out.append({"target": "decode b1 vs bandwidth roofline", "prompt": prompts[0], "min_ratio": 0.7,
                    "ratio": a["decode_frac"], "met": a["decode_frac"] >= 0.7})
    return out


def crossover(results: list[dict]) -> list[dict]:
    """MoE vs its dense equivalent (same active parameters) per batch size, decode and prefill."""
    rows = []
    for r in results:
        if r["engine"] != "moekit":
            continue
        d = _find(results, "dense", r["batch"], r["prompt"])
        if d:
            rows.append({"batch": r["batch"], "prompt": r["prompt"], "moe_decode": r["decode_tok_s"],
                         "dense_decode": d["decode_tok_s"], "decode_ratio": r["decode_tok_s"] / d["decode_tok_s"],
                         "moe_prefill": r["prefill_tok_s"], "dense_prefill": d["prefill_tok_s"],
                         "prefill_ratio": r["prefill_tok_s"] / d["prefill_tok_s"]})
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# moekit bench: {data['model']}", "",
             f"Machine: {data['machine_desc']}; {m['threads']} threads; {m['dtype']}. Measured in this run: "
             f"read bandwidth {m['read_gbs']:.1f} GB/s, matmul peak {m['matmul_gflops']:.0f} GFLOP/s.",
             f"Command: `{data['command']}`", "",
             "| engine | batch | prompt | prefill tok/s | TTFT ms | decode tok/s | p50 ms | p99 ms "
             "| prefill % roofline | decode % roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prompt']} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['ttft_ms']:,.0f} | {r['decode_tok_s']:,.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{_pct(r['prefill_frac'])} | {_pct(r['decode_frac'])} ({r['decode_bound_kind']}) |")
    lines += ["", "| engine | peak RSS | load s | status |", "|---|---|---|---|"]
    for e in data["engines"]:
        rss = f"{e['peak_rss_bytes'] / 2**30:.2f} GiB" if e.get("peak_rss_bytes") else "-"
        load = f"{e['load_s']:.1f}" if e.get("load_s") is not None else "-"
        lines.append(f"| {e['engine']} | {rss} | {load} | {e['status']} |")
    lines += ["", "## Targets (ratios from this run)", "", "| target | prompt | ratio | needed | met |",
              "|---|---|---|---|---|"]
    for t in data["ratios"]:
        ratio = "not measured" if t["ratio"] is None else f"{t['ratio']:.3g}x"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['prompt']} | {ratio} | {t['min_ratio']}x | {met} |")
    if data["crossover"]:
        lines += ["", "## MoE vs dense equivalent (same active parameters)", "",
                  "| batch | prompt | MoE decode tok/s | dense decode tok/s | MoE/dense decode | MoE/dense prefill |",
                  "|---|---|---|---|---|---|"]
        for c in data["crossover"]:
            lines.append(f"| {c['batch']} | {c['prompt']} | {c['moe_decode']:,.1f} | {c['dense_decode']:,.1f} | "
                         f"{c['decode_ratio']:.2f}x | {c['prefill_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    """Decode and prefill throughput vs batch size, one line per engine and prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.checkpoint.native import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, title in ((axes[0], "decode_tok_s", "decode"), (axes[1], "prefill_tok_s", "prefill")):
        for eng in dict.fromkeys(r["engine"] for r in data["results"]):
            for prompt in sorted({r["prompt"] for r in data["results"]}):
                rs = sorted((r for r in data["results"] if r["engine"] == eng and r["prompt"] == prompt),
                            key=lambda r: r["batch"])
                if rs:
                    ax.plot([r["batch"] for r in rs], [r[metric] for r in rs], marker="o",
                            label=f"{eng} (prompt {prompt})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{title} throughput, {data['model']}")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
