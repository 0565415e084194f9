"""`moekit info`: what a model is, how many parameters it has (total and active), and how much
memory its weights take at each precision."""

from __future__ import annotations

import json as _json

from moekit.model.params import COMPONENTS, count_params, dense_equivalent, weight_bytes

GIB = 1024**3


def model_info(model: str) -> dict:
    """Info as a JSON-ready dict for a preset name, config.json or model directory."""
    from moekit import resolve_config

    cfg = resolve_config(model)
    pc = count_params(cfg)
    dense = count_params(dense_equivalent(cfg)) if cfg.is_moe else None
    return {
        "name": cfg.name,
        "config": cfg.to_dict(),
        "params": pc.to_dict(),
        "weight_bytes": {dt: weight_bytes(pc, dt) for dt in ("bf16", "int8", "int4")},
        "moe_layers": cfg.moe_layers,
        "dense_equivalent_active_params": dense.active_params if dense else None,
        "routed_expert_flops": _expert_flops(cfg),
    }


def _expert_flops(cfg) -> dict | None:
    """FLOPs of one token through each routed expert (real widths) and per token over MoE layers."""
    if not cfg.is_moe:
        return None
    from moekit.moe.cost import expert_flops

    m = cfg.moe
    per = expert_flops(m, cfg.dim)
    k = m.num_experts if m.router == "soft" else m.top_k
    return {"per_expert": per, "per_token_all_layers": len(cfg.moe_layers) * k * sum(per) // len(per)}


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def info(model: str, json: bool = False) -> int:
    """Show a model's config, total and active parameters by component, and weight memory.

    Args:
        model: a preset name (see `moekit info --help`), a config.json, or a model directory.
        json: print JSON instead of tables.
    """
    d = model_info(model)
    if json:
        print(_json.dumps(d, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    cfg = d["config"]
    moe = cfg.get("moe")
    desc = f"{cfg['n_layers']} layers, dim {cfg['dim']}, {cfg['n_heads']} heads ({cfg['n_kv_heads'] or cfg['n_heads']} kv), vocab {cfg['vocab_size']}"
    if moe:
        wide = moe["expert_dims"] or moe["expert_dim"]  # heterogeneous: the list of real widths
        desc += (f"; MoE in layers {d['moe_layers']}: {moe['num_experts']} experts x {wide} wide, "
                 f"top-{moe['top_k']} ({moe['router']})")
        if moe["num_shared_experts"]:
            desc += f", shared expert {moe['shared_expert_dim']} wide"
        if moe.get("expert_act", "swiglu") != "swiglu" or moe.get("expert_bias"):
            desc += f", {moe['expert_act']}{' + biases' if moe.get('expert_bias') else ''}"
    if cfg.get("sliding_window"):
        desc += f"; sliding window {cfg['sliding_window']} in layers {cfg['sliding_layers']}"
    if cfg.get("attn_sinks"):
        desc += "; attention sinks"
    con.print(f"[bold]{d['name']}[/bold]: {desc}")
    if cfg.get("source"):
        con.print(f"source: {cfg['source']}")
    t = Table(title="parameters")
    t.add_column("component")
    t.add_column("total", justify="right")
    t.add_column("active / token", justify="right")
    p = d["params"]
    for c in COMPONENTS:
        if p["total"].get(c):
            t.add_row(c, _fmt(p["total"][c]), _fmt(p["active"][c]))
    t.add_row("[bold]all[/bold]", f"[bold]{_fmt(p['total_params'])}[/bold]", f"[bold]{_fmt(p['active_params'])}[/bold]")
    t.add_row("all, without input embedding", "", _fmt(p["active_params_no_embedding"]))
    con.print(t)
    m = Table(title="weight memory")
    for col in ("precision", "bytes", "GiB"):
        m.add_column(col, justify="right")
    for dt, b in d["weight_bytes"].items():
        m.add_row(dt, f"{b:,}", f"{b / GIB:.3f}")
    con.print(m)
    if d["routed_expert_flops"]:
        f = d["routed_expert_flops"]
        per = sorted(set(f["per_expert"]))
        con.print(f"routed-expert FLOPs per token: {_fmt(f['per_token_all_layers'])} over the MoE layers (one expert: "
                  + " / ".join(_fmt(x) for x in per) + ")")
    if d["dense_equivalent_active_params"]:
        con.print(f"dense equivalent (same active params): {_fmt(d['dense_equivalent_active_params'])} params")
    return 0
