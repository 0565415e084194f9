"""Typed, serialisable model configs.

A `ModelConfig` describes a decoder-only LM; its optional `moe` field (a `MoEConfig`) turns some or
all feed-forward layers into Mixture-of-Experts layers. Both are plain dataclasses that round-trip
through JSON (`to_dict` / `from_dict`) and are validated at construction, so a bad value fails with
a message that names the field instead of surfacing later as a shape error deep in a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError

ROUTERS = ("topk_softmax", "softmax_topk", "sigmoid_topk", "soft")
"""Router scoring variants.

- ``topk_softmax``: pick top-k logits, softmax over just those (Mixtral, gpt-oss).
- ``softmax_topk``: softmax over all experts, take top-k probabilities, optionally renormalise
  (``norm_topk_prob``; Qwen-MoE, OLMoE, Switch with k=1, DeepSeek-V2).
- ``sigmoid_topk``: independent sigmoid scores, selection may add a correction bias and be
  group-limited, weights optionally renormalised and scaled (DeepSeek-V3, Llama 4 with k=1).
- ``soft``: every expert runs, outputs mixed by the full softmax (dense "soft MoE" baseline).
"""
EXPERT_ACTS = ("swiglu", "geglu", "gelu", "clamped_swiglu")
"""`clamped_swiglu` is gpt-oss's: gate clamped above at `swiglu_limit`, up clamped to +-limit,
out = (up + 1) * gate * sigmoid(swiglu_alpha * gate)."""
GATED_ACTS = ("swiglu", "geglu", "clamped_swiglu")
"""Activations whose first projection is fused gate + up ([2F, D], gate rows first)."""
DROP_POLICIES = ("score", "position")
GROUP_SCORES = ("top2_sum", "max")
COST_SOURCES = ("flops", "vector")
"""Config-level expert cost sources; live ones (offload-cache misses) are set at run time with
`moekit.moe.cost.set_routing_cost` / `--cost-source offload_misses`."""
ATTENTIONS = ("gqa", "mla")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class ConfigError(MoekitError, ValueError):
    """A config value moekit cannot use; the message names the field and the fix."""


def _fail(field_name: str, msg: str) -> None:
    raise ConfigError(f"config field `{field_name}`: {msg}")


@dataclass
class MoEConfig:
    """The MoE part of a layer: router, experts, dispatch and balancing."""

    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 1024
    """Hidden width of one routed expert (HF: `moe_intermediate_size` / `intermediate_size`)."""
    expert_act: str = "swiglu"
    router: str = "topk_softmax"
    norm_topk_prob: bool = False
    """Renormalise the chosen k weights to sum to 1 (softmax_topk / sigmoid_topk)."""
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    """Group-limited routing: experts split into n_group groups, only topk_group groups eligible."""
    topk_group: int = 1
    group_score: str = "top2_sum"
    """How a group is scored: sum of its top-2 scores (DeepSeek-V3) or its max (DeepSeek-V2)."""
    router_bias: bool = False
    """A learned bias on the router logits (rare; gpt-oss)."""
    score_correction_bias: bool = False
    """Per-expert bias added to scores for *selection only* (DeepSeek-V3 `e_score_correction_bias`);
    it is what aux-loss-free balancing adjusts."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing step size gamma (0 = off). Needs `score_correction_bias`."""
    noisy_gating: bool = False
    """Shazeer 2017 noisy top-k gating: learned per-expert noise std, active in training only."""
    jitter_eps: float = 0.0
    """Multiplicative input jitter U(1-eps, 1+eps) on the router input in training (Switch)."""
    weight_on_input: bool = False
    """Scale the expert *input* by the routing weight instead of its output (Llama 4)."""
    num_shared_experts: int = 0
    shared_expert_dim: int = 0
    """Total hidden width of the shared expert FFN (all shared experts fused into one)."""
    shared_expert_gate: bool = False
    """Sigmoid gate on the shared expert output (Qwen2-MoE)."""
    capacity_factor: float | None = None
    """None = dropless. Else each expert takes at most ceil(cf * T * k / E) assignments."""
    drop_policy: str = "score"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    seq_aux_loss: bool = False
    """Compute the balance loss per sequence and average (DeepSeek-V3's sequence-wise loss)."""
    expert_bias: bool = False
    """Biases on every routed expert's projections: b13 [E, H] and b2 [E, D] (gpt-oss)."""
    swiglu_alpha: float = 1.702
    """Sigmoid gain of `clamped_swiglu` (unused by the other activations)."""
    swiglu_limit: float = 7.0
    """Clamp of `clamped_swiglu`: gate <= limit, -limit <= up <= limit."""
    # Cost-aware routing (moekit.moe.cost; docs/routing.md). All off by default.
    cost_lambda: float = 0.0
    """Select experts by score - cost_lambda * normalised cost (weights still from the scores); 0 = off."""
    cost_source: str = "flops"
    """Where expert costs come from: flops (real FLOPs by width) or vector (`cost_vector`)."""
    cost_vector: list[float] | None = None
    """One cost per expert (any unit, >= 0) for cost_source = vector."""
    cost_budget: float | None = None
    """Per-token cost budget in normalised units (1.0 = the most expensive expert); None = off."""
    dynamic_k: float = 0.0
    """Dynamic-k: run experts in score order until their probability reaches this (top-p); 0 = off."""
    cost_loss_coef: float = 0.0
    """Weight of the expected-cost penalty in the training loss."""
    expert_dims: list[int] | None = None
    """Heterogeneous experts: the hidden width of each routed expert (max = expert_dim; stored padded)."""
    hyper_dim: int = 0
    """HyperMoE (arXiv 2402.12656): bottleneck width of the HyperExpert adapter that a hypernetwork
    shared across layers generates from the token's *unselected* experts (0 = off; `moekit.moe.hypermoe`)."""
    hyper_emb_dim: int = 32
    """HyperMoE: width of the learned expert and layer embeddings and of the generator's hidden layer."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.num_experts < 1:
            _fail("moe.num_experts", f"must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            _fail("moe.top_k", f"must be between 1 and num_experts={self.num_experts}, got {self.top_k}; "
                  "lower top_k or add experts")
        if self.expert_dim < 1:
            _fail("moe.expert_dim", f"must be >= 1, got {self.expert_dim}")
        if self.router not in ROUTERS:
            _fail("moe.router", f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.expert_act not in EXPERT_ACTS:
            _fail("moe.expert_act", f"unknown activation {self.expert_act!r}; choose one of {', '.join(EXPERT_ACTS)}")
        if self.drop_policy not in DROP_POLICIES:
            _fail("moe.drop_policy", f"unknown policy {self.drop_policy!r}; choose one of {', '.join(DROP_POLICIES)}")
        if self.group_score not in GROUP_SCORES:
            _fail("moe.group_score", f"unknown {self.group_score!r}; choose one of {', '.join(GROUP_SCORES)}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            _fail("moe.n_group", f"must divide num_experts={self.num_experts}, got {self.n_group}")
        if self.n_group > 1:
            if not 1 <= self.topk_group <= self.n_group:
                _fail("moe.topk_group", f"must be in 1..n_group={self.n_group}, got {self.topk_group}")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                _fail("moe.topk_group", "top_k exceeds the experts in the eligible groups; raise topk_group")
            if self.group_score == "top2_sum" and self.num_experts // self.n_group < 2:
                _fail("moe.group_score", "top2_sum needs at least 2 experts per group; use 'max'")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            _fail("moe.capacity_factor", f"must be > 0 or null (dropless), got {self.capacity_factor}")
        if self.bias_update_rate and not self.score_correction_bias:
            _fail("moe.bias_update_rate", "aux-loss-free balancing needs score_correction_bias=true")
        if self.shared_expert_dim < 0 or (self.num_shared_experts > 0) != (self.shared_expert_dim > 0):
            _fail("moe.shared_expert_dim", "set num_shared_experts > 0 together with shared_expert_dim > 0")
        if self.router == "soft" and self.top_k != self.num_experts:
            _fail("moe.top_k", "the soft router runs every expert: set top_k = num_experts")
        if not 0 <= self.jitter_eps < 1:
            _fail("moe.jitter_eps", f"must be in [0, 1), got {self.jitter_eps}")
        if self.expert_act == "clamped_swiglu" and not (self.swiglu_limit > 0 and self.swiglu_alpha > 0):
            _fail("moe.swiglu_limit", f"clamped_swiglu needs swiglu_limit > 0 and swiglu_alpha > 0, got "
                  f"{self.swiglu_limit} / {self.swiglu_alpha}")
        if self.hyper_dim < 0:
            _fail("moe.hyper_dim", f"must be >= 0 (0 = HyperMoE off), got {self.hyper_dim}")
        if self.hyper_dim and self.hyper_emb_dim < 1:
            _fail("moe.hyper_emb_dim", f"must be >= 1 when hyper_dim > 0, got {self.hyper_emb_dim}")
        if self.hyper_dim and self.top_k >= self.num_experts:
            _fail("moe.hyper_dim", f"HyperMoE needs unselected experts, but top_k={self.top_k} selects all "
                  f"{self.num_experts}; lower top_k or set hyper_dim=0")
        self._validate_cost()

    def _validate_cost(self) -> None:
        if not (self.cost_lambda >= 0 and math.isfinite(self.cost_lambda)):
            _fail("moe.cost_lambda", f"must be a finite number >= 0 (0 = off), got {self.cost_lambda}")
        if self.cost_source not in COST_SOURCES:
            _fail("moe.cost_source", f"unknown {self.cost_source!r}; choose one of {', '.join(COST_SOURCES)}")
        if (self.cost_source == "vector") != (self.cost_vector is not None):
            _fail("moe.cost_vector", "give cost_vector together with cost_source = 'vector' (one cost per expert)")
        if self.cost_vector is not None and (len(self.cost_vector) != self.num_experts
                                             or any(not (c >= 0 and math.isfinite(c)) for c in self.cost_vector)):
            _fail("moe.cost_vector", f"needs {self.num_experts} finite costs >= 0, got {self.cost_vector}")
        if self.cost_budget is not None and not self.cost_budget > 0:
            _fail("moe.cost_budget", f"must be > 0 (normalised units, 1.0 = the costliest expert) or null, "
                  f"got {self.cost_budget}")
        if not 0 <= self.dynamic_k <= 1:
            _fail("moe.dynamic_k", f"is a probability threshold in [0, 1] (0 = off), got {self.dynamic_k}")
        if self.cost_loss_coef < 0:
            _fail("moe.cost_loss_coef", f"must be >= 0, got {self.cost_loss_coef}")
        variable = self.cost_budget is not None or self.dynamic_k > 0
        if self.router == "soft" and (variable or self.cost_lambda):
            _fail("moe.router", "the soft router runs every expert: cost-aware routing does not apply")
        if variable and self.capacity_factor is not None:
            _fail("moe.capacity_factor", "dynamic-k and cost budgets need dropless routing: set it to null")
        if self.expert_dims is not None:
            if len(self.expert_dims) != self.num_experts or any(d < 1 for d in self.expert_dims):
                _fail("moe.expert_dims", f"needs {self.num_experts} widths >= 1, got {self.expert_dims}")
            if self.expert_bias:
                _fail("moe.expert_dims", "heterogeneous widths with expert biases are not supported (a padded unit "
                      "would see its bias); use equal widths or expert_bias = false")
            if max(self.expert_dims) != self.expert_dim:
                _fail("moe.expert_dim", f"must equal max(expert_dims) = {max(self.expert_dims)} (the padded "
                      f"storage width), got {self.expert_dim}")

    @property
    def gated(self) -> bool:
        return self.expert_act in GATED_ACTS


@dataclass
class ModelConfig:
    """A decoder-only transformer LM, dense or MoE."""

    name: str = "custom"
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_dim: int = 1024
    """Width of dense SwiGLU FFN layers (dense model, leading dense layers, interleaved layers)."""
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    """HF-style rope_scaling dict: {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ...}."""
    tie_embeddings: bool = False
    qk_norm: bool = False
    """RMSNorm on each head's q and k (Qwen3, OLMoE applies it over the full projection: see qk_norm_full)."""
    qk_norm_full: bool = False
    """q/k norm over the whole projected vector rather than per head (OLMoE)."""
    attn_bias: bool = False
    """Bias on q/k/v projections (Qwen2)."""
    attention: str = "gqa"
    # Multi-head latent attention (DeepSeek-V2/V3); used when attention == "mla".
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    # Llama 4: layers without RoPE (they use temperature tuning / chunked attention in HF).
    no_rope_layers: list[int] = field(default_factory=list)
    attention_chunk_size: int | None = None
    """Chunked local attention on the layers that use RoPE (Llama 4): a query sees only earlier keys
    of its own chunk of this many positions. None = full causal attention everywhere."""
    qk_l2_norm: bool = False
    """Weightless L2 (RMS) norm of each head's q and k *after* RoPE, on RoPE layers only (Llama 4
    `use_qk_norm`)."""
    attn_temperature_tuning: bool = False
    """Llama 4: on no-RoPE layers scale q by 1 + attn_scale * log1p(floor((pos + 1) / floor_scale))."""
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    sliding_window: int | None = None
    """Sliding-window attention on the layers in `sliding_layers`: a query at position p sees keys at
    p - sliding_window < k <= p (HF's rule). None = full causal attention everywhere."""
    sliding_layers: list[int] = field(default_factory=list)
    """Layers that use the sliding window (gpt-oss: every other layer, from HF `layer_types`)."""
    attn_sinks: bool = False
    """A learned per-head logit added to the softmax denominator (gpt-oss `sinks` [H])."""
    attn_out_bias: bool = False
    """Bias on the attention output projection (gpt-oss `o_proj.bias`)."""
    moe: MoEConfig | None = None
    first_k_dense: int = 0
    """The first k layers use a dense FFN (DeepSeek `first_k_dense_replace`)."""
    moe_every: int = 1
    """Layer i is MoE when (i + 1) % moe_every == 0 (Qwen `decoder_sparse_step`, Llama 4 interleave)."""
    dense_layers: list[int] = field(default_factory=list)
    """Explicit dense layers (Qwen `mlp_only_layers`)."""
    moe_layer_experts: list[int] = field(default_factory=list)
    """Routed experts of each MoE layer, in layer order, where they differ (`moekit prune
    --per-layer-budget`); empty = moe.num_experts in every layer, which is then their maximum."""
    init_std: float = 0.02
    source: str = ""
    """Where the numbers come from (e.g. the HF config.json a preset copies)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.validate()

    # ----------------------------------------------------------------- derived
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hd(self) -> int:
        """Per-head dim of q/k/v for GQA attention."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.moe is not None
            and i >= self.first_k_dense
            and i not in self.dense_layers
            and (i + 1) % self.moe_every == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    def layer_moe(self, i: int) -> MoEConfig:
        """The MoE config of block i: `moe`, with that layer's own expert count when the counts differ."""
        if not self.moe_layer_experts:
            return self.moe
        n = self.moe_layer_experts[self.moe_layers.index(i)]
        return self.moe if n == self.moe.num_experts else dataclasses.replace(self.moe, num_experts=n)

    def experts_per_layer(self) -> list[int]:
        """Routed experts of every MoE layer, in order."""
        if self.moe is None:
            return []
        return list(self.moe_layer_experts) or [self.moe.num_experts] * len(self.moe_layers)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, f) < 1:
                _fail(f, f"must be >= 1, got {getattr(self, f)}")
        if self.attention not in ATTENTIONS:
            _fail("attention", f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.attention == "gqa":
            if self.head_dim is None and self.dim % self.n_heads:
                _fail("n_heads", f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                      "change n_heads or set head_dim explicitly")
            if self.kv_heads < 1 or self.n_heads % self.kv_heads:
                _fail("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
            if self.hd % 2:
                _fail("head_dim", f"RoPE needs an even head dim, got {self.hd}")
        else:
            if self.qk_rope_head_dim % 2:
                _fail("qk_rope_head_dim", f"RoPE needs an even dim, got {self.qk_rope_head_dim}")
        if self.rope_scaling is not None:
            rt = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rt not in ROPE_TYPES:
                _fail("rope_scaling.rope_type", f"unsupported {rt!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.attention_chunk_size is not None and self.attention_chunk_size < 1:
            _fail("attention_chunk_size", f"must be >= 1 or null, got {self.attention_chunk_size}")
        if self.sliding_window is not None and self.sliding_window < 1:
            _fail("sliding_window", f"must be >= 1 or null, got {self.sliding_window}")
        if bool(self.sliding_layers) != (self.sliding_window is not None):
            _fail("sliding_layers", "set sliding_window together with the list of layers that use it "
                  f"(got sliding_window={self.sliding_window}, sliding_layers={self.sliding_layers})")
        bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
        if bad:
            _fail("sliding_layers", f"layer indices {bad} are outside 0..n_layers-1={self.n_layers - 1}")
        if (self.sliding_window is not None or self.attn_sinks or self.attn_out_bias) and self.attention != "gqa":
            _fail("attention", "sliding_window, attn_sinks and attn_out_bias need grouped-query attention (gqa)")
        if self.moe_every < 1:
            _fail("moe_every", f"must be >= 1, got {self.moe_every}")
        if not 0 <= self.first_k_dense <= self.n_layers:
            _fail("first_k_dense", f"must be in 0..n_layers={self.n_layers}, got {self.first_k_dense}")
        if self.moe is not None:
            self.moe.validate()
        if self.moe_layer_experts:
            n_moe = len(self.moe_layers)
            if len(self.moe_layer_experts) != n_moe:
                _fail("moe_layer_experts", f"gives {len(self.moe_layer_experts)} counts for {n_moe} MoE layers")
            bad = [n for n in self.moe_layer_experts if not self.moe.top_k <= n <= self.moe.num_experts]
            if bad:
                _fail("moe_layer_experts", f"counts {bad} are outside top_k={self.moe.top_k}..moe.num_experts="
                      f"{self.moe.num_experts}")
            if self.moe.expert_dims or self.moe.cost_vector or self.moe.n_group > 1:
                _fail("moe_layer_experts", "per-layer expert counts do not combine with per-expert widths/costs "
                      "(moe.expert_dims, moe.cost_vector) or group-limited routing")

    # --------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d.pop("moekit_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        moe = d.get("moe")
        if isinstance(moe, dict):
            mknown = {f.name for f in dataclasses.fields(MoEConfig)}
            bad = sorted(set(moe) - mknown)
            if bad:
                raise ConfigError(f"unknown moe config field(s) {bad}; known fields: {sorted(mknown)}")
            d["moe"] = MoEConfig(**moe)
        try:
            return cls(**d)
        except TypeError as e:  # wrong value types that dataclasses can't catch
            raise ConfigError(f"bad config: {e}") from None

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"moekit_version": 1, **self.to_dict()}, indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        s = str(path_or_text)
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def capacity(num_tokens: int, cfg: MoEConfig) -> int:
    """Per-expert capacity in assignments: ceil(capacity_factor * T * k / E)."""
    assert cfg.capacity_factor is not None
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))
