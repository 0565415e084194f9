"""This machine's roofline, measured in the same run as the benchmark, and each workload's bound.

Shape legend: M, N, K matmul dims. B batch, P prompt length, E experts, K_top experts per token.

Read bandwidth is the best of several `sum`s over a buffer far larger than the caches (what a
decode step does to its weights: stream them once); matmul peak is the best of several large
GEMMs in the dtype the engine computes in (oneDNN/AMX for bf16 on CPUs with native bf16; fp32
elsewhere, since bf16 weights are computed in fp32 there; time-bounded: seconds); both come from
`moekit.plan.measure`, shared with the planner. A result's roofline
bound is the smaller of the compute bound and the bandwidth bound for the bytes it must read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from moekit.config import ModelConfig
from moekit.model.params import count_params
from moekit.plan import measure
from moekit.plan.roofline import expected_distinct_uniform
from moekit.plan.spec import kv_bytes_per_token


@dataclass
class Machine:
    read_gbs: float
    """Sustained DRAM read bandwidth, GB/s (1e9 bytes)."""
    matmul_gflops: float | None
    """Large-GEMM peak in the compute dtype, GFLOP/s; None (or <= 0) when it could not be measured,
    which makes every compute bound, and so every roofline, unknown."""
    dtype: str
    """Weight dtype (bytes per parameter read)."""
    threads: int
    device: str
    compute_dtype: str = ""
    """The dtype the matmuls really run in (`moekit.plan.measure.compute_dtype`); the peak's dtype."""
    peak_note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def measure_machine(dtype: torch.dtype, quick: bool = False) -> Machine:
    """Read bandwidth and the matmul peak of the dtype the engine computes `dtype` weights in (fp32
    for bf16 weights where bf16 is not native), in seconds (time-bounded probes)."""
    cdt = measure.compute_dtype(dtype)
    bw = measure.read_bandwidth_gbs(256 if quick else 1024, 3 if quick else 5)
    peak = measure.matmul_peak_gflops(cdt, 1024 if quick else 2048, 3 if quick else 5, 2.0 if quick else 6.0)
    note = "" if cdt == dtype else "bf16 is not native on this CPU: bf16 weights are computed in fp32"
    return Machine(round(bw, 2), round(peak, 1) if peak > 0 else None, str(dtype).removeprefix("torch."),
                   torch.get_num_threads(), "cpu", str(cdt).removeprefix("torch."), note)


def _known(x: float | None) -> bool:
    return x is not None and math.isfinite(x) and x > 0


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Mean number of distinct experts `tokens` tokens select (uniform routing): E(1-(1-k/E)^T)."""
    return expected_distinct_uniform(num_experts, top_k, tokens)


def decode_bytes(cfg: ModelConfig, batch: int, context: int, bytes_per_param: float) -> float:
    """Bytes one decode step must read: the non-expert weights, every expert the batch touches
    (uniform routing), and the KV cache of `context` tokens per row (the planner's per-token KV
    size, so bench and plan agree)."""
    pc = count_params(cfg)
    static = pc.active_params_no_embedding - pc.active.get("routed_experts", 0)
    experts = 0.0
    if cfg.moe is not None and pc.total.get("routed_experts"):
        per_expert = pc.total["routed_experts"] / cfg.moe.num_experts
        experts = per_expert * expected_experts_touched(cfg.moe.num_experts, cfg.moe.top_k, batch)
    kv_dtype = "fp32" if bytes_per_param >= 4 else "bf16"
    kv_bytes = kv_bytes_per_token(cfg, kv_dtype)["model"] * context * batch
    return (static + experts) * bytes_per_param + kv_bytes


def flops_per_token(cfg: ModelConfig, context: float, with_head: bool = True) -> float:
    """Matmul FLOPs for one token attending to `context` keys (2 per multiply-add)."""
    pc = count_params(cfg)
    params = pc.active_params_no_embedding - (0 if with_head else pc.active.get("lm_head", 0))
    attn = 4 * cfg.n_layers * cfg.n_heads * cfg.hd * context
    return 2 * params + attn


def decode_bound(cfg: ModelConfig, m: Machine, batch: int, context: int) -> dict:
    """Roofline tokens/s for one decode step of `batch` rows at `context` tokens (NaN, bound
    "unknown", when the bandwidth or the peak could not be measured)."""
    bpp = 4 if m.dtype == "float32" else 2
    if not (_known(m.read_gbs) and _known(m.matmul_gflops)):
        return {"tok_s": float("nan"), "bound": "unknown", "bytes": decode_bytes(cfg, batch, context, bpp)}
    t_mem = decode_bytes(cfg, batch, context, bpp) / (m.read_gbs * 1e9)
    t_cmp = batch * flops_per_token(cfg, context) / (m.matmul_gflops * 1e9)
    return {"tok_s": batch / max(t_mem, t_cmp), "bound": "bandwidth" if t_mem >= t_cmp else "compute",
            "bytes": decode_bytes(cfg, batch, context, bpp)}


def prefill_bound(cfg: ModelConfig, m: Machine, batch: int, prompt: int) -> dict:
    """Roofline tokens/s for prefilling `batch` prompts of `prompt` tokens (head only at the end);
    NaN, bound "unknown", when the bandwidth or the peak could not be measured."""
    bpp = 4 if m.dtype == "float32" else 2
    if not (_known(m.read_gbs) and _known(m.matmul_gflops)):
        return {"tok_s": float("nan"), "bound": "unknown"}
    pc = count_params(cfg)
    t_mem = pc.total_params * bpp / (m.read_gbs * 1e9)
    flops = batch * prompt * flops_per_token(cfg, prompt / 2, with_head=False) + batch * 2 * pc.active.get("lm_head", 0)
    t_cmp = flops / (m.matmul_gflops * 1e9)
    return {"tok_s": batch * prompt / max(t_mem, t_cmp), "bound": "bandwidth" if t_mem >= t_cmp else "compute"}
