"""Analytic parameter counts by component, and the dense model with matched active parameters.

Counts are computed from the config alone (no model is built), mirroring the modules exactly:
a test checks `count_params(cfg).total == sum(p.numel() for p in build_model(cfg).parameters())`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.config import GATED_ACTS, ModelConfig, MoEConfig
from moekit.moe import hypermoe

COMPONENTS = ("embedding", "attention", "norms", "router", "routed_experts", "shared_experts", "hypernetwork",
              "dense_ffn", "lm_head")


@dataclass
class ParamCount:
    total: dict[str, int] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)
    """Parameters touched per token: routed experts count k/E of their total (all for `soft`)."""
    tied: bool = False
    """Input embedding shared with the head: it is counted once, under "embedding"."""

    @property
    def total_params(self) -> int:
        return sum(self.total.values())

    @property
    def active_params(self) -> int:
        return sum(self.active.values())

    @property
    def active_params_no_embedding(self) -> int:
        """Active parameters excluding the input embedding (a lookup, not a matmul); the
        convention most MoE papers use for "activated parameters" varies, so both are given."""
        # A tied table still does the head's matmul, so it stays in.
        return self.active_params - (0 if self.tied else self.active.get("embedding", 0))

    def to_dict(self) -> dict:
        return {"total": dict(self.total), "active": dict(self.active), "total_params": self.total_params,
                "active_params": self.active_params, "active_params_no_embedding": self.active_params_no_embedding}


def ffn_params(dim: int, hidden: int, act: str = "swiglu", bias: bool = False) -> int:
    n = (3 if act in GATED_ACTS else 2) * dim * hidden
    if bias:  # b13 [H] + b2 [D] (gpt-oss experts)
        n += (2 * hidden if act in GATED_ACTS else hidden) + dim
    return n


def attention_params(cfg: ModelConfig) -> int:
    """One attention block's parameters (including its q/k norms)."""
    if cfg.attention == "mla":
        return mla_params(cfg)
    q_out, kv_out = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
    n = cfg.dim * (q_out + 2 * kv_out) + q_out * cfg.dim
    if cfg.attn_bias:
        n += q_out + 2 * kv_out
    if cfg.attn_out_bias:
        n += cfg.dim
    if cfg.attn_sinks:
        n += cfg.n_heads
    if cfg.qk_norm:
        n += (q_out + kv_out) if cfg.qk_norm_full else 2 * cfg.hd
    return n


def mla_params(cfg: ModelConfig) -> int:
    """Multi-head latent attention (DeepSeek-V2/V3), HF module layout:
    q_a_proj [q_lora, D] + q_a_layernorm [q_lora] + q_b_proj [H*(nope+rope), q_lora] (or q_proj
    [H*(nope+rope), D] without q_lora_rank), kv_a_proj_with_mqa [kv_lora+rope, D],
    kv_a_layernorm [kv_lora], kv_b_proj [H*(nope+v), kv_lora], o_proj [D, H*v]."""
    H, D = cfg.n_heads, cfg.dim
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = (cfg.q_lora_rank * D + cfg.q_lora_rank + H * qk * cfg.q_lora_rank) if cfg.q_lora_rank else H * qk * D
    kv = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * D + cfg.kv_lora_rank
    kv += H * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank
    return q + kv + D * H * cfg.v_head_dim


def router_params(dim: int, m: MoEConfig) -> int:
    n = m.num_experts * dim
    if m.router_bias:
        n += m.num_experts
    if m.noisy_gating:
        n += m.num_experts * dim
    return n


def _widths(m: MoEConfig) -> list[int]:
    return list(m.expert_dims) if m.expert_dims else [m.expert_dim] * m.num_experts


def padded_expert_params(cfg: ModelConfig) -> int:
    """Zero parameters the padded storage of heterogeneous experts holds (0 for equal widths):
    the module has count_params(cfg).total_params + this many elements."""
    m = cfg.moe
    if m is None or not m.expert_dims:
        return 0
    full = ffn_params(cfg.dim, m.expert_dim, m.expert_act) * m.num_experts
    return len(cfg.moe_layers) * (full - sum(ffn_params(cfg.dim, w, m.expert_act) for w in m.expert_dims))


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameter counts by component for a config."""
    total = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    total["embedding"] = cfg.vocab_size * cfg.dim
    total["lm_head"] = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    total["attention"] = cfg.n_layers * attention_params(cfg)
    total["norms"] = (2 * cfg.n_layers + 1) * cfg.dim
    m = cfg.moe
    n_moe = len(cfg.moe_layers)
    total["dense_ffn"] = (cfg.n_layers - n_moe) * ffn_params(cfg.dim, cfg.ffn_dim)
    if m is not None and n_moe:
        total["router"] = sum(router_params(cfg.dim, cfg.layer_moe(i)) for i in cfg.moe_layers)
        # Real (unpadded) widths: heterogeneous experts are stored padded to expert_dim with zeros.
        per_layer = sum(ffn_params(cfg.dim, w, m.expert_act, m.expert_bias) for w in _widths(m))
        total["routed_experts"] = n_moe * per_layer
        if cfg.moe_layer_experts:  # pruned per layer: equal widths, a count per layer
            total["routed_experts"] = sum(cfg.moe_layer_experts) * ffn_params(cfg.dim, m.expert_dim, m.expert_act,
                                                                              m.expert_bias)
        if m.num_shared_experts:
            shared = ffn_params(cfg.dim, m.shared_expert_dim, m.expert_act) + (cfg.dim if m.shared_expert_gate else 0)
            total["shared_experts"] = n_moe * shared
        # HyperMoE's generator is shared by the layers: counted once. Every token's adapter comes
        # from all of it, so it is all active.
        total["hypernetwork"] = hypermoe.generator_params(cfg.dim, n_moe, m)
    active.update(total)
    if m is not None and n_moe:
        # The noise projection only runs in training; the router proper is always active.
        k = m.num_experts if m.router == "soft" else m.top_k
        # Heterogeneous widths: k experts of the mean width (the expectation under uniform routing).
        active["routed_experts"] = n_moe * (k * sum(ffn_params(cfg.dim, w, m.expert_act, m.expert_bias)
                                                    for w in _widths(m)) // m.num_experts)
    return ParamCount(total, active, tied=cfg.tie_embeddings)


def dense_equivalent(cfg: ModelConfig) -> ModelConfig:
    """The dense model with the same active parameters per token.

    Each MoE layer becomes a dense SwiGLU FFN whose width matches the active FFN parameters of
    that layer: k routed experts + shared experts + the router (rounded to the nearest width).
    With several MoE layers the widths are the same, so one `ffn_dim` is used for every layer
    that was MoE; layers that were already dense keep their own width only if equal (otherwise
    the average width is used, which keeps the total active count equal up to rounding).
    """
    m = cfg.moe
    if m is None or not cfg.moe_layers:
        return cfg.replace(name=f"{cfg.name}-dense" if not cfg.name.endswith("-dense") else cfg.name)
    k = m.num_experts if m.router == "soft" else m.top_k
    mult = 3 if m.gated else 2
    active_ffn = k * mult * cfg.dim * sum(_widths(m)) // m.num_experts + router_params(cfg.dim, m)
    if m.num_shared_experts:
        active_ffn += ffn_params(cfg.dim, m.shared_expert_dim, m.expert_act) + (cfg.dim if m.shared_expert_gate else 0)
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    # HyperMoE's shared generator is active for every token: its parameters count too.
    total_ffn = n_moe * active_ffn + n_dense * 3 * cfg.dim * cfg.ffn_dim + hypermoe.generator_params(cfg.dim, n_moe, m)
    width = round(total_ffn / (cfg.n_layers * 3 * cfg.dim))
    return cfg.replace(name=f"{cfg.name}-dense", moe=None, ffn_dim=max(1, width), first_k_dense=0, dense_layers=[],
                       moe_every=1, moe_layer_experts=[])


DTYPE_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0, "int4": 4.0}


def weight_bytes(count: ParamCount, dtype: str = "bf16", group_size: int = 128) -> int:
    """Bytes to hold the weights at `dtype`.

    Integer formats are group-wise: each `group_size` weights carry a 16-bit scale (int8) or a
    16-bit scale and 16-bit zero point (int4), as in llama.cpp's Q8_0 / Q4_1 and most GPTQ/AWQ
    layouts. fp8 carries one scale per tensor (negligible). Router and norms stay bf16 in every
    format: they are tiny, and quantising the router changes which experts run.
    """
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BITS)}")
    bits = DTYPE_BITS[dtype]
    if dtype == "int8":
        bits += 16 / group_size
    elif dtype == "int4":
        bits += 32 / group_size
    keep = count.total.get("router", 0) + count.total.get("norms", 0)
    quant = count.total_params - keep
    keep_bits = 32.0 if dtype == "fp32" else 16.0
    return int(round(quant * bits / 8 + keep * keep_bits / 8))
