"""Roofline bounds: how fast a decode step or a prefill can possibly go, and what fits where.

A decode step for B sequences at context C must (a) read every weight it uses once: the
non-expert weights, plus, per MoE layer, each *distinct* expert the B tokens were routed to, and
(b) read the B x C cached keys/values, and (c) do B x FLOPs-per-token of arithmetic. The bound
is max(bytes / bandwidth, FLOPs / peak): real engines sit above it (kernel efficiency, launch
overhead, communication), never below.

Distinct experts per layer: a token picks expert e with probability p_e (sum_e p_e = k). With B
independent tokens, e is untouched with probability (1 - p_e)^B, so
E[distinct] = sum_e 1 - (1 - p_e)^B, which under uniform routing (p_e = k/E) is
E * (1 - (1 - k/E)^B). With a telemetry file the measured per-layer p_e are used instead.

Shape legend: L MoE layers, E experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.model.params import weight_bytes
from moekit.plan.hardware import GIB, Hardware
from moekit.plan.spec import flops_per_token, kv_bytes_per_token, param_summary, weight_memory


class TelemetryError(MoekitError, ValueError):
    """A routing telemetry file the planner cannot use."""


def expected_distinct_uniform(num_experts: int, top_k: int, batch: int) -> float:
    """E * (1 - (1 - k/E)^B): experts a batch of B tokens touches in one layer, uniform routing."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def expected_distinct(p_E: list[float], batch: int) -> float:
    """sum_e 1 - (1 - p_e)^B for per-token selection probabilities p_e (summing to k)."""
    return sum(1.0 - (1.0 - min(1.0, max(0.0, p))) ** batch for p in p_E)


def load_telemetry(path: str | Path, cfg: ModelConfig) -> list[list[float]]:
    """Per-MoE-layer selection probabilities p_E from routing telemetry.

    Accepts moekit's training telemetry JSONL (records with "layers": [{"counts": [...]}, ...],
    summed over all records) or one JSON object of that shape. counts are assignments per expert,
    so p_e = k * counts_e / sum(counts)."""
    p = Path(path)
    if not p.is_file():
        raise TelemetryError(f"{p}: telemetry file not found")
    m = cfg.moe
    if m is None:
        raise TelemetryError(f"{p}: the model has no MoE layers, a routing telemetry file does not apply")
    text = p.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
        records = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:  # JSONL, possibly with a torn last line from a killed run
        records = []
        for line in text.splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    sums: list[list[float]] | None = None
    for rec in records:
        layers = rec.get("layers") if isinstance(rec, dict) else None
        if not layers:
            continue
        counts = [lay.get("counts") for lay in layers]
        if any(not isinstance(c, list) for c in counts):
            raise TelemetryError(f"{p}: each entry of `layers` needs a `counts` list (assignments per expert)")
        if sums is None:
            sums = [[0.0] * len(c) for c in counts]
        if len(counts) != len(sums):
            raise TelemetryError(f"{p}: records disagree on the number of layers")
        for s, c in zip(sums, counts):
            for e, v in enumerate(c):
                s[e] += float(v)
    if not sums:
        raise TelemetryError(f"{p}: no records with `layers[].counts`; expected moekit routing telemetry (JSONL)")
    n_moe = len(cfg.moe_layers)
    if len(sums) != n_moe or any(len(s) != m.num_experts for s in sums):
        raise TelemetryError(f"{p}: telemetry has {len(sums)} layers x {len(sums[0])} experts but the model has "
                             f"{n_moe} MoE layers x {m.num_experts} experts; use telemetry from this model")
    out = []
    for s in sums:
        tot = sum(s)
        out.append([m.top_k * v / tot if tot else m.top_k / m.num_experts for v in s])
    return out


@dataclass
class StepBound:
    batch: int
    weight_bytes: float
    kv_bytes: float
    flops: float
    time_s: float
    bound: str
    """"memory" or "compute": which side of the roofline sets the time."""
    distinct_experts: float
    """Mean distinct routed experts touched per MoE layer (0 for a dense model)."""

    @property
    def tokens_per_s(self) -> float:
        return self.batch / self.time_s

    def to_dict(self) -> dict:
        return {"batch": self.batch, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "flops": self.flops, "time_s": self.time_s, "ms": self.time_s * 1e3, "bound": self.bound,
                "tokens_per_s": self.tokens_per_s, "distinct_experts_per_layer": self.distinct_experts}


def _bytes_per_param(cfg: ModelConfig, dtype: str) -> float:
    pc = param_summary(cfg).count
    return weight_bytes(pc, dtype) / pc.total_params


def decode_step(cfg: ModelConfig, hw: Hardware, batch: int, context: int, dtype: str = "bf16",
                kv_dtype: str = "bf16", devices: int = 1, p_LE: list[list[float]] | None = None,
                bandwidth_gbs: float | None = None) -> StepBound:
    """Lower bound on one decode step: B new tokens, each attending `context` cached tokens.

    1. weights read: everything a token uses except the routed experts (input embedding: only B
       rows), plus the expected distinct experts per MoE layer;
    2. KV read: B x context x bytes per token; 3. FLOPs: B x forward FLOPs per token;
    4. devices split bytes and FLOPs evenly (ideal parallelism, no communication cost)."""
    s = param_summary(cfg)
    pc = s.count
    bpp = _bytes_per_param(cfg, dtype)
    extras_active = sum(e.active for e in s.extras)
    fixed = pc.active_params - pc.active["routed_experts"] - pc.active["embedding"] + extras_active
    fixed += min(pc.active["embedding"], batch * cfg.dim) if not cfg.tie_embeddings else pc.active["embedding"]
    distinct = 0.0
    expert_params = 0.0
    m = cfg.moe
    n_moe = len(cfg.moe_layers)
    if m is not None and n_moe:
        per_expert = pc.total["routed_experts"] / (n_moe * m.num_experts)
        if m.router == "soft":
            per_layer = [float(m.num_experts)] * n_moe
        elif p_LE is not None:
            per_layer = [expected_distinct(p, batch) for p in p_LE]
        else:
            per_layer = [expected_distinct_uniform(m.num_experts, m.top_k, batch)] * n_moe
        distinct = sum(per_layer) / n_moe
        expert_params = per_expert * sum(per_layer)
    wbytes = (fixed + expert_params) * bpp
    kv = batch * context * kv_bytes_per_token(cfg, kv_dtype)["model"]
    flops = batch * flops_per_token(cfg, context)["total"]
    bw = (bandwidth_gbs or hw.bandwidth_gbs) * 1e9 * devices
    peak = hw.peak_tflops(dtype) * 1e12 * devices
    t_mem, t_cmp = (wbytes + kv) / bw, flops / peak
    return StepBound(batch, wbytes, kv, flops, max(t_mem, t_cmp), "memory" if t_mem >= t_cmp else "compute", distinct)


def prefill_bound(cfg: ModelConfig, hw: Hardware, batch: int, context: int, dtype: str = "bf16",
                  devices: int = 1) -> dict:
    """Prefill of B prompts of `context` tokens: compute (mean attention context C/2) against one
    read of all weights (a long prompt touches every expert)."""
    flops = batch * context * flops_per_token(cfg, max(1, context // 2))["total"]
    wbytes = weight_memory(cfg)[dtype]
    t_cmp = flops / (hw.peak_tflops(dtype) * 1e12 * devices)
    t_mem = wbytes / (hw.bandwidth_gbs * 1e9 * devices)
    t = max(t_cmp, t_mem)
    return {"batch": batch, "context": context, "flops": flops, "time_s": t,
            "tokens_per_s": batch * context / t, "bound": "compute" if t_cmp >= t_mem else "memory"}


# --------------------------------------------------------------------------------- fitting
def memory_need(cfg: ModelConfig, batch: int, context: int, dtype: str, kv_dtype: str) -> dict[str, int]:
    w = weight_memory(cfg)[dtype]
    kv = batch * context * kv_bytes_per_token(cfg, kv_dtype)["model"]
    return {"weights": w, "kv": kv, "total": w + kv}


def devices_needed(need_bytes: int, hw: Hardware, reserve_gib: float) -> int:
    """Smallest device count whose memory, after a per-device reserve for activations and the
    runtime, holds `need_bytes` split evenly (weights sharded by expert / tensor parallelism)."""
    usable = (hw.mem_gib - reserve_gib) * GIB
    if usable <= 0:
        raise MoekitError(f"the reserve of {reserve_gib} GiB leaves no room on a {hw.mem_gib} GiB {hw.name}; "
                          "lower --reserve-gib")
    return max(1, math.ceil(need_bytes / usable))


def suggest_layout(cfg: ModelConfig, n_min: int) -> dict:
    """An expert-parallel layout for at least `n_min` devices: the next power of two (so experts
    and heads divide evenly); routed experts spread by EP, attention by tensor parallelism up to
    the KV-head count and data parallelism beyond it."""
    n = 1 << max(0, math.ceil(math.log2(n_min)))
    m = cfg.moe
    out: dict = {"devices": n}
    if n == 1:
        out["text"] = "1 device: no parallelism needed"
        return out
    heads = cfg.n_heads if cfg.attention == "mla" else cfg.kv_heads
    tp = 1
    while tp * 2 <= min(n, 8, heads) and heads % (tp * 2) == 0:
        tp *= 2
    out["attention"] = {"tp": tp, "dp": n // tp}
    if m is not None and cfg.moe_layers:
        ep = min(n, m.num_experts)
        out["ep"] = ep
        out["experts_per_device"] = math.ceil(m.num_experts / ep)
        per = out["experts_per_device"]
        txt = f"EP{ep}: {per} routed expert{'s' if per > 1 else ''} per device per layer"
        if n > m.num_experts:
            txt += f", each expert replicated x{n // m.num_experts}"
    else:
        txt = f"TP{tp}" + (f" x PP{n // tp}" if n > tp else "")
    txt += f"; attention TP{tp}" + (f" x DP{n // tp}" if n > tp and m is not None else "")
    if n > 8:
        txt += f"; spans {math.ceil(n / 8)} nodes of 8"
    out["text"] = txt
    return out
