"""What a model *is*, for planning: parameters (total / active, by component), FLOPs per token,
weight memory per precision and KV-cache bytes per token.

Every parameter count goes through `moekit.count_params` (one counting path for the package).
The few things a `ModelConfig` cannot express for real checkpoints (Llama 4's vision tower,
DeepSeek-V3's multi-token-prediction layer) are counted
here as named `Extra`s, reported separately and never silently folded into the main count.

Units: parameters and FLOPs are plain counts; bytes are bytes (GiB = 2**30 in reports).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from moekit.config import ModelConfig
from moekit.errors import MoekitError
from moekit.moe import hypermoe
from moekit.model.params import ParamCount, attention_params, count_params, dense_equivalent, weight_bytes

WEIGHT_DTYPES = ("bf16", "fp8", "int8", "int4")
KV_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


class PlanError(MoekitError, ValueError):
    """Planner input that cannot be used (batch sizes, context, device counts)."""


@dataclass(frozen=True)
class Extra:
    """Parameters of a real checkpoint that the `ModelConfig` does not describe."""

    name: str
    total: int
    active: int
    """Parameters a text token touches."""
    in_memory: bool
    """Loaded when serving text (counted in the weight memory)."""
    in_published_total: bool
    """Part of the vendor's headline total."""
    note: str


# ------------------------------------------------------------------------------------- extras
# Llama 4 vision encoder (34 layers, width 1408, MLP 5632, 336 px / 14 px patches) + pixel-shuffle
# adapter + projector into the text width: counted with transformers' Llama4VisionModel and
# Llama4MultiModalProjector built on the meta device from the checkpoint's vision_config
# (transformers' Llama4VisionConfig defaults differ: width 768, 448 px, vision_output_dim 7680).
# tests/test_plan.py recomputes it.
LLAMA4_VISION_PARAMS = 871_932_416


def _llama4_extras(cfg: ModelConfig) -> list[Extra]:
    return [Extra("vision tower + projector", LLAMA4_VISION_PARAMS, 0, True, True,
                  "image encoder of the multimodal checkpoint; idle for text tokens")]


def _deepseek_mtp_extras(cfg: ModelConfig) -> list[Extra]:
    # One extra MoE decoder layer + eh_proj [D, 2D] + enorm/hnorm/final norm + its own copies of
    # the embedding and the head, as stored in the hub checkpoint (layer 61).
    pc = count_params(cfg)
    n_moe = len(cfg.moe_layers)
    layer = (attention_params(cfg) + 2 * cfg.dim
             + (pc.total["routed_experts"] + pc.total["shared_experts"] + pc.total["router"]) // n_moe)
    mtp = layer + 2 * cfg.dim * cfg.dim + 3 * cfg.dim + 2 * cfg.vocab_size * cfg.dim
    return [Extra("multi-token-prediction layer", mtp, 0, False, False,
                  "on the hub (685B = 671B + MTP) but not needed for ordinary decoding")]


EXTRAS: dict[str, Callable[[ModelConfig], list[Extra]]] = {
    "llama4-scout": _llama4_extras, "llama4-maverick": _llama4_extras,
    "deepseek-v3": _deepseek_mtp_extras,
}


def extras_for(cfg: ModelConfig) -> list[Extra]:
    fn = EXTRAS.get(cfg.name)
    return fn(cfg) if fn is not None else []


# ---------------------------------------------------------------------------- published figures
@dataclass(frozen=True)
class Published:
    """A vendor's headline figures, as printed (the string keeps the stated precision)."""

    total: str
    active: str
    total_covers: str
    """What the vendor's total includes: "text" (decoder only) or "text+vision"."""
    active_embedding: bool
    """Whether the vendor's active figure includes the input embedding table."""
    source: str
    rounding: str = "round"
    """How the vendor shortened the figure: "round" or "truncate"."""


PUBLISHED: dict[str, Published] = {
    "mixtral-8x7b": Published("46.7B", "12.9B", "text", True, "Mistral AI, Mixtral of experts (2024)"),
    "mixtral-8x22b": Published("141B", "39B", "text", True, "Mistral AI, Mixtral 8x22B announcement (2024)"),
    "deepseek-v3": Published("671B", "37B", "text", False,
                             "DeepSeek-V3 technical report (main model; the hub's 685B adds the 14B MTP module)"),
    "qwen3-30b-a3b": Published("30.5B", "3.3B", "text", True, "Qwen/Qwen3-30B-A3B model card", "truncate"),
    "qwen3-235b-a22b": Published("235B", "22B", "text", True, "Qwen/Qwen3-235B-A22B model card"),
    "olmoe-1b-7b": Published("6.9B", "1.3B", "text", True, "OLMoE paper (Muennighoff et al., 2024)"),
    "llama4-scout": Published("109B", "17B", "text+vision", True, "Meta Llama 4 model card"),
    "llama4-maverick": Published("400B", "17B", "text+vision", True, "Meta Llama 4 model card"),
    "gpt-oss-20b": Published("20.91B", "3.61B", "text", False, "OpenAI gpt-oss model card (2025), table 1"),
    "gpt-oss-120b": Published("116.83B", "5.13B", "text", False, "OpenAI gpt-oss model card (2025), table 1"),
}


def parse_count(s: str) -> float:
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[s[-1]]
    return float(s[:-1]) * mult


def matches_published(ours: int, published: str, rounding: str = "round", rel: float = 0.01) -> bool:
    """Within `rel` of the published figure, or equal to it at the precision it was printed with
    (a two-digit "17B" cannot be checked to 1%: it stands for anything in [16.5B, 17.5B))."""
    pub = parse_count(published)
    if abs(ours - pub) <= rel * pub:
        return True
    decimals = len(published[:-1].partition(".")[2])
    unit = parse_count("1" + published[-1]) / 10**decimals
    shortened = math.floor(ours / unit) if rounding == "truncate" else round(ours / unit)
    return math.isclose(shortened * unit, pub, rel_tol=1e-9)


# ------------------------------------------------------------------------------ the numbers
@dataclass
class ParamSummary:
    count: ParamCount
    extras: list[Extra]

    @property
    def total(self) -> int:
        """The decoder's parameters plus extras that are loaded for text serving."""
        return self.count.total_params + sum(e.total for e in self.extras if e.in_memory)

    @property
    def active(self) -> int:
        return self.count.active_params + sum(e.active for e in self.extras)

    @property
    def active_no_embedding(self) -> int:
        return self.count.active_params_no_embedding + sum(e.active for e in self.extras)

    def published_convention(self) -> tuple[int, int]:
        """(total, active) counted the way the vendor counts them (see `PUBLISHED`)."""
        return self.count.total_params + sum(e.total for e in self.extras if e.in_published_total), self.active

    def to_dict(self, name: str) -> dict:
        d = self.count.to_dict()
        d["extras"] = [asdict(e) for e in self.extras]
        d["total_with_extras"] = self.total
        d["active_with_extras"] = self.active
        d["active_no_embedding_with_extras"] = self.active_no_embedding
        pub = PUBLISHED.get(name)
        if pub is not None:
            tot = self.count.total_params + sum(e.total for e in self.extras if e.in_published_total)
            act = self.active if pub.active_embedding else self.active_no_embedding
            d["published"] = {**asdict(pub), "ours_total": tot, "ours_active": act,
                              "total_ok": matches_published(tot, pub.total, pub.rounding),
                              "active_ok": matches_published(act, pub.active, pub.rounding)}
        return d


def param_summary(cfg: ModelConfig) -> ParamSummary:
    return ParamSummary(count_params(cfg), extras_for(cfg))


def matmul_params(cfg: ModelConfig) -> int:
    """Active weights that take part in a matmul per token: no input-embedding lookup (a tied
    table still does the head's matmul), no norm weights (block norms, q/k norms, MLA's latent
    norms) and no biases (extras are all biases or idle towers, so they are left out too)."""
    pc = count_params(cfg)
    n = pc.active_params_no_embedding - pc.active.get("norms", 0)
    if cfg.attention == "mla":
        n -= cfg.n_layers * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank)
    else:
        q_out, kv_out = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
        if cfg.qk_norm:
            n -= cfg.n_layers * ((q_out + kv_out) if cfg.qk_norm_full else 2 * cfg.hd)
        if cfg.attn_bias:
            n -= cfg.n_layers * (q_out + 2 * kv_out)
    if cfg.moe is not None and cfg.moe.router_bias:
        n -= sum(cfg.experts_per_layer())
    # HyperMoE's generator is not one matmul per token (see `hypermoe_flops`): counted on its own.
    return n - pc.active.get("hypernetwork", 0)


def hypermoe_flops(cfg: ModelConfig) -> int:
    """HyperMoE's forward FLOPs per token (generator at one expert set per token, plus the adapter)."""
    return hypermoe.flops_per_token(cfg.dim, len(cfg.moe_layers), cfg.moe) if cfg.moe is not None else 0


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """Score and value FLOPs for one token attending `context` keys, summed over layers.

    Layers with chunked attention (Llama 4's RoPE layers) see at most `attention_chunk_size` keys."""
    if cfg.attention == "mla":
        per_key = 2 * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    else:
        per_key = 4 * cfg.n_heads * cfg.hd
    total = 0
    for i in range(cfg.n_layers):
        ctx = context
        if cfg.attention_chunk_size and i not in cfg.no_rope_layers:
            ctx = min(context, cfg.attention_chunk_size)
        total += per_key * ctx
    return total


def flops_per_token(cfg: ModelConfig, context: int) -> dict[str, int]:
    """Forward FLOPs for one token at position `context` (2 per multiply-add); "hypernetwork" is
    HyperMoE's generator and adapter (0 without it), an upper bound when tokens share expert sets."""
    mm = 2 * matmul_params(cfg)
    att = attention_flops(cfg, context)
    hyper = hypermoe_flops(cfg)
    return {"matmul": mm, "attention": att, "hypernetwork": hyper, "total": mm + att + hyper}


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str = "bf16") -> dict[str, int | None]:
    """KV-cache bytes one token adds across all layers: for this model's attention, and what MHA
    (every head keeps K and V), GQA (shared KV heads) and MLA (the compressed latent plus the
    shared RoPE key) would need with the same layers and heads."""
    b = KV_BYTES[kv_dtype]
    L = cfg.n_layers
    if cfg.attention == "mla":
        mha = L * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * b
        mla = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
        return {"model": mla, "mha": mha, "gqa": None, "mla": mla}
    mha = 2 * L * cfg.n_heads * cfg.hd * b
    gqa = 2 * L * cfg.kv_heads * cfg.hd * b
    return {"model": gqa, "mha": mha, "gqa": gqa, "mla": None}


def weight_memory(cfg: ModelConfig) -> dict[str, int]:
    """Weight bytes per precision (group-wise scales for int8/int4, see `weight_bytes`), extras
    that are loaded for serving included at the same precision."""
    s = param_summary(cfg)
    extra = sum(e.total for e in s.extras if e.in_memory)
    out = {}
    for dt in WEIGHT_DTYPES:
        b = weight_bytes(s.count, dt)
        out[dt] = b + int(round(extra * b / max(1, s.count.total_params)))
    return out


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense model with equal active parameters (`moekit.dense_equivalent`)."""
    return dense_equivalent(cfg)


def dense_same_total(cfg: ModelConfig) -> ModelConfig:
    """A dense model with the same *total* parameters (the memory-matched comparison): every
    FFN becomes a dense SwiGLU of the width that keeps the FFN parameter total."""
    if not cfg.is_moe:
        return cfg
    pc = count_params(cfg)
    ffn = sum(pc.total[c] for c in ("router", "routed_experts", "shared_experts", "dense_ffn"))
    width = max(1, round(ffn / (cfg.n_layers * 3 * cfg.dim)))
    return cfg.replace(name=f"{cfg.name}-dense-total", moe=None, ffn_dim=width, first_k_dense=0, dense_layers=[],
                       moe_every=1, moe_layer_experts=[])
