"""Assemble a capacity plan (one JSON-ready dict), print it as tables, and plot memory vs FLOPs."""

from __future__ import annotations

from pathlib import Path

from moekit.config import ModelConfig
from moekit.model.params import COMPONENTS
from moekit.plan.hardware import GIB, Hardware
from moekit.plan.roofline import (decode_step, devices_needed, load_telemetry, memory_need, prefill_bound,
                                  suggest_layout)
from moekit.plan.spec import (PUBLISHED, WEIGHT_DTYPES, PlanError, dense_same_total, dense_twin, flops_per_token,
                              kv_bytes_per_token, param_summary, weight_memory)

REAL_PRESETS = tuple(PUBLISHED)


def build_plan(cfg: ModelConfig, hw: Hardware, batches: list[int], context: int, dtype: str = "bf16",
               kv_dtype: str = "bf16", devices: int | None = None, reserve_gib: float | None = None,
               telemetry: str | Path | None = None) -> dict:
    """The whole plan for one model on one kind of hardware.

    1. parameters, FLOPs per token, weight and KV memory (hardware independent);
    2. per batch size: memory needed and the fewest devices that hold it, with a layout;
    3. decode-step and prefill roofline bounds on one device count (given, or the fit for the
       largest batch) for the model, its dense twin (equal active) and a dense model of equal total.
    """
    if not batches or min(batches) < 1:
        raise PlanError("--batch values must be >= 1")
    if context < 1:
        raise PlanError("--context must be >= 1")
    s = param_summary(cfg)
    twin, big = dense_twin(cfg), dense_same_total(cfg)
    p_LE = load_telemetry(telemetry, cfg) if telemetry else None
    reserve = 0.1 * hw.mem_gib if reserve_gib is None else reserve_gib
    kv = kv_bytes_per_token(cfg, kv_dtype)
    fit = []
    for b in batches:
        need = memory_need(cfg, b, context, dtype, kv_dtype)
        n = devices_needed(need["total"], hw, reserve)
        fit.append({"batch": b, "need_bytes": need, "devices_min": n, "layout": suggest_layout(cfg, n)})
    n_dev = devices or max(f["layout"]["devices"] for f in fit)
    decode = []
    for b in batches:
        row = {"batch": b,
               "moe": decode_step(cfg, hw, b, context, dtype, kv_dtype, n_dev, p_LE).to_dict(),
               "dense_equal_active": decode_step(twin, hw, b, context, dtype, kv_dtype, n_dev).to_dict(),
               "dense_equal_total": decode_step(big, hw, b, context, dtype, kv_dtype, n_dev).to_dict()}
        if p_LE is not None:
            row["moe_uniform"] = decode_step(cfg, hw, b, context, dtype, kv_dtype, n_dev).to_dict()
        if hw.gemv_bandwidth_gbs:
            row["moe_at_gemv_bandwidth"] = decode_step(cfg, hw, b, context, dtype, kv_dtype, n_dev, p_LE,
                                                       bandwidth_gbs=hw.gemv_bandwidth_gbs).to_dict()
        decode.append(row)
    warnings = []
    short = [f["batch"] for f in fit if f["devices_min"] > n_dev]
    if short:
        warnings.append(f"{n_dev} device(s) do not hold weights + KV at batch {', '.join(map(str, short))}; "
                        "the speed bounds there assume memory that is not there")
    if context > cfg.max_seq_len:
        warnings.append(f"context {context:,} exceeds the model's max_seq_len {cfg.max_seq_len:,}")
    if cfg.attention_chunk_size and context > cfg.attention_chunk_size:
        warnings.append(f"KV sizes assume full caches; the chunked-attention layers only need "
                        f"{cfg.attention_chunk_size:,} tokens each (attention FLOPs already use the chunk)")
    return {
        "model": cfg.name, "source": cfg.source, "warnings": warnings, "config": cfg.to_dict(),
        "params": s.to_dict(cfg.name),
        "flops_per_token": {"context": context, "moe": flops_per_token(cfg, context),
                            "dense_equal_active": flops_per_token(twin, context)},
        "weight_bytes": weight_memory(cfg),
        "dense_equal_active_weight_bytes": weight_memory(twin),
        "kv": {"dtype": kv_dtype, "bytes_per_token": kv,
               "per_batch": {str(b): b * context * kv["model"] for b in batches}},
        "hardware": {**hw.to_dict(), "reserve_gib_per_device": reserve},
        "dtype": dtype, "fit": fit, "devices": n_dev, "telemetry": str(telemetry) if telemetry else None,
        "decode": decode,
        "prefill": {"moe": prefill_bound(cfg, hw, 1, context, dtype, n_dev),
                    "dense_equal_active": prefill_bound(twin, hw, 1, context, dtype, n_dev)},
    }


def fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def print_plan(plan: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:  # piped into a file or a doc: don't squeeze the tables into 80 columns
        con = Console(width=140)
    con.print(f"[bold]{plan['model']}[/bold]  ({plan['source'] or 'no source'})")
    for w in plan["warnings"]:
        con.print(f"[yellow]warning:[/yellow] {w}")
    p = plan["params"]
    t = Table(title="parameters")
    for col in ("component", "total", "active / token"):
        t.add_column(col, justify="right" if col != "component" else "left")
    for comp in COMPONENTS:
        if p["total"].get(comp):
            t.add_row(comp.replace("_", " "), fmt_count(p["total"][comp]), fmt_count(p["active"][comp]))
    for e in p["extras"]:
        t.add_row(f"+ {e['name']}" + ("" if e["in_memory"] else " (not loaded)"), fmt_count(e["total"]),
                  fmt_count(e["active"]))
    t.add_row("[bold]all (loaded)[/bold]", f"[bold]{fmt_count(p['total_with_extras'])}[/bold]",
              f"[bold]{fmt_count(p['active_with_extras'])}[/bold]")
    t.add_row("active without input embedding", "", fmt_count(p["active_no_embedding_with_extras"]))
    con.print(t)
    if "published" in p:
        pub = p["published"]
        conv = "with" if pub["active_embedding"] else "without"
        ok = lambda b: "[green]ok[/green]" if b else "[red]off[/red]"  # noqa: E731
        con.print(f"published: {pub['total']} total ({pub['total_covers']}) vs ours {fmt_count(pub['ours_total'])} "
                  f"{ok(pub['total_ok'])}; {pub['active']} active ({conv} input embedding) vs ours "
                  f"{fmt_count(pub['ours_active'])} {ok(pub['active_ok'])}  [{pub['source']}]")
    f = plan["flops_per_token"]
    t = Table(title=f"forward FLOPs per token at context {f['context']:,}")
    cols = ("matmul", "attention", "hypernetwork", "total") if f["moe"].get("hypernetwork") else (
        "matmul", "attention", "total")
    for col in ("model", *cols):
        t.add_column(col, justify="right")
    for k, label in (("moe", plan["model"]), ("dense_equal_active", "dense, equal active")):
        t.add_row(label, *(f"{f[k].get(x, 0) / 1e9:,.4f} G" if "hypernetwork" in cols else
                           f"{f[k][x] / 1e9:,.2f} G" for x in cols))
    con.print(t)
    t = Table(title="memory (GiB)")
    for col in ("weights", *WEIGHT_DTYPES):
        t.add_column(col, justify="right")
    t.add_row(plan["model"], *(gib(plan["weight_bytes"][d]) for d in WEIGHT_DTYPES))
    t.add_row("dense, equal active", *(gib(plan["dense_equal_active_weight_bytes"][d]) for d in WEIGHT_DTYPES))
    con.print(t)
    kv = plan["kv"]
    bpt = kv["bytes_per_token"]
    parts = [f"{k.upper()} {v / 1024:,.1f} KiB" for k, v in bpt.items() if k != "model" and v is not None]
    con.print(f"KV cache per token ({kv['dtype']}): this model {bpt['model'] / 1024:,.1f} KiB; " + ", ".join(parts))
    hw = plan["hardware"]
    con.print(f"hardware: {hw['name']} ({hw['mem_gib']} GiB, {hw['bandwidth_gbs']:,} GB/s, "
              f"{hw['bf16_tflops']:,} bf16 TFLOP/s; {hw['source']}); reserve {hw['reserve_gib_per_device']:.1f} "
              f"GiB per device; weights {plan['dtype']}")
    t = Table(title=f"fit at context {f['context']:,}")
    for col in ("batch", "weights GiB", "KV GiB", "devices (min)", "suggested layout"):
        t.add_column(col, justify="right" if col != "suggested layout" else "left")
    for row in plan["fit"]:
        nb = row["need_bytes"]
        t.add_row(str(row["batch"]), gib(nb["weights"]), gib(nb["kv"]), str(row["devices_min"]), row["layout"]["text"])
    con.print(t)
    t = Table(title=f"decode step lower bound on {plan['devices']} x {hw['name']} (ms / step, tok/s)")
    # dense(act): dense model with equal active parameters; dense(tot): equal total parameters.
    cols = ["batch", "E/layer", "MoE ms", "tok/s", "bound", "dense(act) ms", "dense(tot) ms", "MoE/dense(act)"]
    gemv = "moe_at_gemv_bandwidth" in plan["decode"][0]
    if gemv:
        cols.insert(5, "ms @GEMV bw")
    for col in cols:
        t.add_column(col, justify="right")
    for row in plan["decode"]:
        m, d, big = row["moe"], row["dense_equal_active"], row["dense_equal_total"]
        cells = [str(row["batch"]), f"{m['distinct_experts_per_layer']:.1f}", f"{m['ms']:.3f}",
                 f"{m['tokens_per_s']:,.0f}", m["bound"], f"{d['ms']:.3f}", f"{big['ms']:.3f}",
                 f"{m['ms'] / d['ms']:.2f}x"]
        if gemv:
            cells.insert(5, f"{row['moe_at_gemv_bandwidth']['ms']:.3f}")
        t.add_row(*cells)
    con.print(t)
    pf = plan["prefill"]
    con.print(f"prefill bound, one {f['context']:,}-token prompt: {pf['moe']['tokens_per_s']:,.0f} tok/s "
              f"({pf['moe']['bound']}-bound); dense equal-active {pf['dense_equal_active']['tokens_per_s']:,.0f} tok/s")


def plot_presets(out: str | Path, context: int = 4096, extra: ModelConfig | None = None) -> Path:
    """Weight memory (bf16) vs active FLOPs per token for the real-model presets and their dense
    twins; `extra` (the planned model) is added and highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moekit.checkpoint.native import atomic_write
    from moekit.presets import get_preset

    cfgs = [get_preset(n) for n in REAL_PRESETS]
    if extra is not None and extra.name not in REAL_PRESETS:
        cfgs.append(extra)
    fig, ax = plt.subplots(figsize=(9, 6.5))
    for cfg in cfgs:
        twin = dense_twin(cfg)
        x0, y0 = flops_per_token(cfg, context)["total"] / 1e9, weight_memory(cfg)["bf16"] / GIB
        x1, y1 = flops_per_token(twin, context)["total"] / 1e9, weight_memory(twin)["bf16"] / GIB
        hl = extra is not None and cfg.name == extra.name
        ax.plot([x0, x1], [y0, y1], color="0.7", lw=0.8, zorder=1)
        ax.scatter([x0], [y0], s=60 if hl else 36, color="crimson" if hl else "tab:blue", zorder=3,
                   label="MoE" if cfg is cfgs[0] else None)
        ax.scatter([x1], [y1], s=30, marker="x", color="tab:orange", zorder=2,
                   label="dense, equal active params" if cfg is cfgs[0] else None)
        ax.annotate(cfg.name, (x0, y0), textcoords="offset points", xytext=(5, 4), fontsize=8,
                    fontweight="bold" if hl else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"forward GFLOPs per token (context {context:,}, attention included)")
    ax.set_ylabel("bf16 weight memory (GiB)")
    ax.set_title("MoE: memory follows total parameters, compute follows active ones")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return out
