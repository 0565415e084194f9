"""Benchmark report: roofline fractions, side-by-side ratios, markdown tables and the PNG plot."""

from __future__ import annotations

import math
from pathlib import Path

from moekit.bench.roofline import Machine, decode_bound, prefill_bound
from moekit.bench.verdict import Verdict, bound_ratio, judge
from moekit.config import ModelConfig

TARGETS = [
    # (label, metric, batch, engine compared against, minimum ratio)
    ("prefill b1 vs transformers", "prefill_tok_s", 1, "transformers", 2.0),
    ("decode b1 vs transformers", "decode_tok_s", 1, "transformers", 2.0),
    ("decode b1 vs llama.cpp", "decode_tok_s", 1, "llama.cpp", 1.2),
    ("decode b8 vs transformers", "decode_tok_s", 8, "transformers", 2.0),
    ("decode b8 vs llama.cpp", "decode_tok_s", 8, "llama.cpp", 2.0),
]

QUANT_TARGETS = [
    # (label, metric, batch, moekit engine, engine compared against, minimum ratio): #15's speed bars
    ("int8 decode b1 vs llama.cpp Q8_0", "decode_tok_s", 1, "moekit-int8", "llama.cpp-q8_0", 1.0),
    ("int4 decode b1 vs llama.cpp Q4_0", "decode_tok_s", 1, "moekit-int4", "llama.cpp-q4_0", 1.0),
]
"""Judged only when one of the pair ran (the quantized engines are opt-in)."""
QUANTIZED = ("moekit-int8", "moekit-int4", "llama.cpp-q8_0", "llama.cpp-q4_0")
"""Engines on quantized weights: no roofline bound (the bound model counts bf16/fp32 bytes)."""


def _bounds(cfg: ModelConfig, m: Machine, r: dict) -> tuple[dict, dict]:
    return (prefill_bound(cfg, m, r["batch"], r["prompt"]),
            decode_bound(cfg, m, r["batch"], r["prompt"] + r["new_tokens"] // 2))


def add_bounds(results: list[dict], cfgs: dict[str, ModelConfig], m: Machine,
               rounds: list[Machine] | None = None) -> None:
    """Annotate each result with its roofline bounds (from the median machine) and the fraction of
    them it reaches; with `rounds` (the machine measured in each round), also the per-round
    fractions, each sample against its own round's bound (what the verdict judges)."""
    for r in results:
        if r["engine"] in QUANTIZED:
            r.update(prefill_bound_tok_s=None, prefill_frac=float("nan"), decode_bound_tok_s=None,
                     decode_frac=float("nan"), decode_bound_kind="not modelled for quantized weights",
                     decode_frac_rounds=[])
            continue
        cfg = cfgs["dense"] if r["engine"] == "dense" else cfgs["moe"]
        pb, db = _bounds(cfg, m, r)
        r["prefill_bound_tok_s"], r["prefill_frac"] = pb["tok_s"], bound_ratio(r["prefill_tok_s"], pb["tok_s"])
        r["decode_bound_tok_s"], r["decode_frac"] = db["tok_s"], bound_ratio(r["decode_tok_s"], db["tok_s"])
        r["decode_bound_kind"] = db["bound"]
        samples = r.get("samples", {}).get("decode_tok_s") or [r["decode_tok_s"]]
        ms = rounds if rounds and len(rounds) >= len(samples) else [m] * len(samples)
        r["decode_frac_rounds"] = [bound_ratio(s, _bounds(cfg, mi, r)[1]["tok_s"]) for s, mi in zip(samples, ms)]


def _find(results, engine, batch, prompt):
    return next((r for r in results if r["engine"] == engine and r["batch"] == batch and r["prompt"] == prompt), None)


def _round_ratios(a: dict, b: dict, metric: str) -> list[float]:
    """Per-round A/B ratios (the rounds are interleaved, so round i of both ran side by side)."""
    sa = a.get("samples", {}).get(metric) or [a[metric]]
    sb = b.get("samples", {}).get(metric) or [b[metric]]
    return [x / y for x, y in zip(sa, sb)]


def ratios(results: list[dict]) -> list[dict]:
    """The issue's targets as ratios measured in this run (prefill at the longest prompt, decode
    at the shortest), each with its verdict (`moekit.bench.verdict`): yes/no only with two or more
    rounds and a margin beyond their spread; missing engines are reported as not measured."""
    prompts = sorted({r["prompt"] for r in results})
    out = []
    for label, metric, batch, other, target in TARGETS:
        prompt = prompts[-1] if metric == "prefill_tok_s" else prompts[0]
        a, b = _find(results, "moekit", batch, prompt), _find(results, other, batch, prompt)
        v = judge(_round_ratios(a, b, metric) if a and b else [], target, "ratio")
        out.append({"target": label, "prompt": prompt, "min_ratio": target, **v.to_dict()})
    ran = {r["engine"] for r in results}
    for label, metric, batch, mine, other, target in QUANT_TARGETS:
        if mine in ran or other in ran:
            prompt = prompts[0]
            a, b = _find(results, mine, batch, prompt), _find(results, other, batch, prompt)
            v = judge(_round_ratios(a, b, metric) if a and b else [], target, "ratio")
            out.append({"target": label, "prompt": prompt, "min_ratio": target, **v.to_dict()})
    a = _find(results, "moekit", 1, prompts[0])
    if a:
        v = judge(a.get("decode_frac_rounds") or [a["decode_frac"]], 0.7, "fraction_of_bound")
        out.append({"target": "decode b1 vs bandwidth roofline", "prompt": prompts[0], "min_ratio": 0.7,
                    **v.to_dict()})
    return out


def rejudge(data: dict, cfg: ModelConfig) -> dict:
    """An earlier run's results.json judged again by the current rules (bounds per round, verdicts,
    the p99/max label), from its stored per-round samples; nothing is re-measured."""
    from moekit.model.params import dense_equivalent

    for r in data["results"]:
        if "max_ms" not in r and r["new_tokens"] - 1 < 100:
            # Fewer than 100 timed steps: what was stored as p99 was the maximum.
            r["max_ms"], r["p99_ms"] = r["p99_ms"], None
            if "p99_ms" in r.get("samples", {}):
                r["samples"]["max_ms"] = r["samples"].pop("p99_ms")
    fields = set(Machine.__dataclass_fields__)
    rounds = [Machine(**{k: v for k, v in m.items() if k in fields}) for m in data.get("machine_rounds", [])]
    machine = Machine(**{k: v for k, v in data["machine"].items() if k in fields})
    data["rounds"] = len(rounds) or 1
    add_bounds(data["results"], {"moe": cfg, "dense": dense_equivalent(cfg)}, machine, rounds or None)
    data["ratios"] = ratios(data["results"])
    data["crossover"] = crossover(data["results"])
    data["machine"] = machine.to_dict()
    return data


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


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "unknown"
    s = f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"
    return s + " (bound invalid)" if x > 1 else s


def _gflops(x: float | None) -> str:
    return "unknown (not measurable)" if x is None or not math.isfinite(x) or x <= 0 else f"{x:.0f} GFLOP/s"


def _tail(r: dict) -> str:
    # p99 needs >= 100 steps; below that the highest latency is the only honest tail statistic.
    return f"{r['p99_ms']:.1f}" if r.get("p99_ms") is not None else f"max {r['max_ms']:.1f}"


def markdown(data: dict) -> str:
    m = data["machine"]
    rounds = data.get("rounds", 1)
    compute = m.get("compute_dtype", m["dtype"])
    lines = [f"# moekit bench: {data['model']}", "",
             f"Machine: {data['machine_desc']}; {m['threads']} threads; weights {m['dtype']}, compute {compute}. "
             f"Measured in this run: read bandwidth {m['read_gbs']:.1f} GB/s, matmul peak "
             f"{_gflops(m['matmul_gflops'])} ({compute}{', ' + m['peak_note'] if m.get('peak_note') else ''}).",
             f"Command: `{data['command']}`", *([data["rejudged"] + "."] if data.get("rejudged") else []), "",
             f"Rounds: {rounds}. Each figure is the median over rounds; the tail column is p99 of the timed decode "
             "steps where there are at least 100 of them, else their maximum.", "",
             "| engine | batch | prompt | prefill tok/s | TTFT ms | decode tok/s | p50 ms | p99 / max ms "
             "| prefill % roofline | decode % roofline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prompt']} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['ttft_ms']:,.0f} | {r['decode_tok_s']:,.1f} | {r['p50_ms']:.1f} | {_tail(r)} | "
                     f"{_pct(r['prefill_frac'])} | {_pct(r['decode_frac'])} ({r['decode_bound_kind']}) |")
    lines += ["", "| engine | computes in | peak RSS | load s | status |", "|---|---|---|---|---|"]
    for e in data["engines"]:
        rss = f"{e['peak_rss_bytes'] / 2**30:.2f} GiB" if e.get("peak_rss_bytes") else "-"
        load = f"{e['load_s']:.1f}" if e.get("load_s") is not None else "-"
        comp = e.get("compute") or ("weights' dtype (gguf)" if e["engine"].startswith("llama.cpp") else "-")
        lines.append(f"| {e['engine']} | {comp} | {rss} | {load} | {e['status']} |")
    lines += ["", "## Targets (ratios from this run)", "",
              "Verdicts (`moekit/bench/verdict.py`): yes/no only with 2+ rounds and the median clearing the target by "
              "more than the spread over rounds; one round is indicative; a result above 100% of its roofline means "
              "the bound was wrong for that run (bound invalid); an unmeasurable bound is unknown.", "",
              "| target | prompt | ratio (median) | spread over rounds | needed | verdict |",
              "|---|---|---|---|---|---|"]
    for t in data["ratios"]:
        ratio = "not measured" if t["ratio"] is None else f"{t['ratio']:.3g}x"
        spread = "-" if t.get("spread") is None or t["rounds"] < 2 else f"{t['spread']:.3g}"
        v = Verdict(**{k: t[k] for k in ("status", "ratio", "spread", "rounds", "needed", "kind", "side")})
        lines.append(f"| {t['target']} | {t['prompt']} | {ratio} | {spread} | {t['min_ratio']}x | {v.label()} |")
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
