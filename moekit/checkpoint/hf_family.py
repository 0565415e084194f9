"""Tensor plans and export configs for the Llama-family HF architectures: Llama, Mistral, Qwen2,
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (registered with `hf_config.register_architecture`).

A plan maps every moekit tensor to the HF tensors that fill it (`hf_pieces.Piece`): q/k/v rows
fuse into `wqkv`, gate/up rows into `w13`, and per-expert matrices stack along the expert dim
into `[E, 2F, D]` / `[E, D, F]`. The same plan read backwards is the export. Routed experts are
read from either layout a checkpoint may hold: per-expert tensors (`experts.{e}.gate_proj` /
Mixtral's `w1,w3,w2`, what `save_pretrained` writes) or transformers v5's fused
`experts.gate_up_proj` [E, 2F, D] + `experts.down_proj` [E, D, F] (its in-memory layout).
"""

from __future__ import annotations

from moekit.checkpoint.hf_config import (
    llama_config, mixtral_config, olmoe_config, qwen2_config, qwen2_moe_config, qwen3_moe_config,
    register_architecture, unsupported,
)
from moekit.checkpoint.hf_pieces import Piece, Plan, gated_mlp_pieces
from moekit.config import ConfigError, ModelConfig

# HF names of (gate, up, down) inside one expert, per architecture.
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_MOE_BLOCK = {"mixtral": "block_sparse_moe"}


def _ignore(key: str) -> bool:
    # Old checkpoints carry RoPE caches as tensors; moekit recomputes them.
    return key.endswith("rotary_emb.inv_freq")


def make_plan(cfg: ModelConfig, model_type: str, keys: set[str] | None) -> Plan:
    """moekit key -> HF pieces for a Llama-family model (`keys`: tensors in the file, or None)."""
    # Plan: 1. embeddings, final norm, head; 2. per layer: norms, fused attention, then a dense
    # FFN or an MoE block (router, experts in per-expert or fused layout, gated shared expert).
    plan: Plan = {"embed.weight": [Piece("model.embed_tokens.weight")], "norm.weight": [Piece("model.norm.weight")]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight")]
    q, kv = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
    for i in range(cfg.n_layers):
        hf, mk = f"model.layers.{i}.", f"layers.{i}."
        plan[mk + "attn_norm.weight"] = [Piece(hf + "input_layernorm.weight")]
        plan[mk + "ffn_norm.weight"] = [Piece(hf + "post_attention_layernorm.weight")]
        a = hf + "self_attn."
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            plan[mk + f"attn.wqkv.{part}"] = [Piece(f"{a}q_proj.{part}", rows=(0, q)),
                                              Piece(f"{a}k_proj.{part}", rows=(q, q + kv)),
                                              Piece(f"{a}v_proj.{part}", rows=(q + kv, q + 2 * kv))]
        plan[mk + "attn.wo.weight"] = [Piece(a + "o_proj.weight")]
        if cfg.qk_norm:
            plan[mk + "attn.q_norm.weight"] = [Piece(a + "q_norm.weight")]
            plan[mk + "attn.k_norm.weight"] = [Piece(a + "k_norm.weight")]
        if cfg.is_moe_layer(i):
            _moe_plan(plan, cfg, model_type, hf, mk, keys)
        else:
            gated_mlp_pieces(plan, mk + "ffn.", hf + "mlp.", cfg.ffn_dim)
    return plan


def _moe_plan(plan: Plan, cfg: ModelConfig, model_type: str, hf: str, mk: str, keys: set[str] | None) -> None:
    m = cfg.moe
    assert m is not None
    block = hf + _MOE_BLOCK.get(model_type, "mlp") + "."
    if keys is not None and hf + "mlp.gate.weight" in keys:
        block = hf + "mlp."  # transformers v5 renamed Mixtral's block_sparse_moe to mlp
    plan[mk + "ffn.router.weight"] = [Piece(block + "gate.weight")]
    g, u, d = _EXPERT_NAMES.get(model_type, ("gate_proj", "up_proj", "down_proj"))
    F = m.expert_dim
    fused = hf + "mlp.experts."
    if keys is not None and fused + "gate_up_proj" in keys and f"{block}experts.0.{g}.weight" not in keys:
        # transformers v5 layout: already stacked exactly like moekit (gate rows first).
        plan[mk + "ffn.experts.w13"] = [Piece(fused + "gate_up_proj")]
        plan[mk + "ffn.experts.w2"] = [Piece(fused + "down_proj")]
    else:
        e_ = range(m.num_experts)
        plan[mk + "ffn.experts.w13"] = (
            [Piece(f"{block}experts.{e}.{g}.weight", expert=e, rows=(0, F)) for e in e_]
            + [Piece(f"{block}experts.{e}.{u}.weight", expert=e, rows=(F, 2 * F)) for e in e_])
        plan[mk + "ffn.experts.w2"] = [Piece(f"{block}experts.{e}.{d}.weight", expert=e) for e in e_]
    if m.num_shared_experts:
        gated_mlp_pieces(plan, mk + "ffn.shared.", block + "shared_expert.", m.shared_expert_dim)
        if m.shared_expert_gate:
            plan[mk + "ffn.shared_gate.weight"] = [Piece(block + "shared_expert_gate.weight")]


def _plan_fn(model_type: str):
    def fn(cfg: ModelConfig, hf: dict | None = None, keys: set[str] | None = None) -> Plan:
        return make_plan(cfg, model_type, keys)
    return fn


# ------------------------------------------------------------------------------ export
def _common_export(cfg: ModelConfig, arch: str, model_type: str) -> dict:
    """HF fields shared by the family; raises ConfigError for moekit features HF lacks."""
    if cfg.attention != "gqa":
        raise unsupported("attention", cfg.attention, f"{arch} uses grouped-query attention")
    extras = {"no_rope_layers": cfg.no_rope_layers, "attention_chunk_size": cfg.attention_chunk_size,
              "qk_l2_norm": getattr(cfg, "qk_l2_norm", False),
              "attn_temperature_tuning": getattr(cfg, "attn_temperature_tuning", False)}
    for k, v in extras.items():
        if v:
            raise unsupported(k, v, f"{arch} has no such attention feature")
    d = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True, "sliding_window": None, "use_sliding_window": False,
        "torch_dtype": "float32",
    }
    m = cfg.moe
    if m is not None and cfg.is_moe:
        bad = {"expert_act": m.expert_act != "swiglu", "router_bias": m.router_bias,
               "score_correction_bias": m.score_correction_bias, "n_group": m.n_group > 1,
               "routed_scaling_factor": m.routed_scaling_factor != 1.0, "weight_on_input": m.weight_on_input,
               "capacity_factor": m.capacity_factor is not None}
        for k, v in bad.items():
            if v:
                raise unsupported(f"moe.{k}", getattr(m, k), f"{arch} routing has no equivalent")
        d.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False)
    return d


def _need(cond: bool, field: str, value, arch: str, why: str) -> None:
    if not cond:
        raise unsupported(field, value, f"{arch} {why}")


def _dense_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if not cfg.is_moe_layer(i) and (i + 1) % cfg.moe_every == 0]


def _renormalised(cfg: ModelConfig) -> bool:
    """True when the routing weights equal a softmax over the chosen k logits (Mixtral's rule)."""
    m = cfg.moe
    return m.router == "topk_softmax" or (m.router == "softmax_topk" and m.norm_topk_prob)


def export_llama(cfg: ModelConfig) -> dict:
    arch = "LlamaForCausalLM"
    _need(not cfg.is_moe, "moe", "MoE layers", arch, "is dense")
    _need(not cfg.qk_norm and not cfg.attn_bias, "qk_norm/attn_bias", True, arch, "has no q/k norm or qkv bias")
    return {**_common_export(cfg, arch, "llama"), "attention_bias": False, "mlp_bias": False}


def export_qwen2(cfg: ModelConfig) -> dict:
    arch = "Qwen2ForCausalLM"
    _need(not cfg.is_moe, "moe", "MoE layers", arch, "is dense")
    _need(cfg.attn_bias and not cfg.qk_norm, "attn_bias", cfg.attn_bias, arch, "always has a qkv bias, no q/k norm")
    return _common_export(cfg, arch, "qwen2")


def export_mixtral(cfg: ModelConfig) -> dict:
    arch = "MixtralForCausalLM"
    _need(cfg.is_moe and not cfg.moe.num_shared_experts, "moe", "shared experts", arch, "has routed experts only")
    _need(len(cfg.moe_layers) == cfg.n_layers, "dense_layers", _dense_layers(cfg), arch, "makes every layer MoE")
    _need(_renormalised(cfg), "moe.router", cfg.moe.router, arch, "renormalises over the chosen k")
    _need(not cfg.qk_norm and not cfg.attn_bias, "qk_norm/attn_bias", True, arch, "has no q/k norm or qkv bias")
    d = _common_export(cfg, arch, "mixtral")
    d.update(intermediate_size=cfg.moe.expert_dim, num_local_experts=cfg.moe.num_experts, router_jitter_noise=0.0)
    return d


def _export_qwen_moe(cfg: ModelConfig, arch: str, model_type: str) -> dict:
    m = cfg.moe
    _need(cfg.is_moe, "moe", None, arch, "needs MoE layers")
    _need(m.router in ("softmax_topk", "topk_softmax"), "moe.router", m.router, arch, "uses softmax top-k")
    d = _common_export(cfg, arch, model_type)
    mlp_only = sorted(set(cfg.dense_layers) | set(range(cfg.first_k_dense)))
    d.update(num_experts=m.num_experts, moe_intermediate_size=m.expert_dim, decoder_sparse_step=cfg.moe_every,
             mlp_only_layers=mlp_only, norm_topk_prob=m.router == "topk_softmax" or m.norm_topk_prob)
    return d


def export_qwen2_moe(cfg: ModelConfig) -> dict:
    arch = "Qwen2MoeForCausalLM"
    m = cfg.moe
    _need(m is not None and m.num_shared_experts > 0 and m.shared_expert_gate, "moe.shared_expert_gate",
          None if m is None else m.shared_expert_gate, arch, "always has one sigmoid-gated shared expert")
    _need(not cfg.qk_norm, "qk_norm", cfg.qk_norm, arch, "has no q/k norm")
    d = _export_qwen_moe(cfg, arch, "qwen2_moe")
    d.update(shared_expert_intermediate_size=m.shared_expert_dim, qkv_bias=cfg.attn_bias)
    return d


def export_qwen3_moe(cfg: ModelConfig) -> dict:
    arch = "Qwen3MoeForCausalLM"
    _need(cfg.moe is not None and not cfg.moe.num_shared_experts, "moe.num_shared_experts",
          None if cfg.moe is None else cfg.moe.num_shared_experts, arch, "has no shared expert")
    _need(cfg.qk_norm and not cfg.qk_norm_full, "qk_norm", cfg.qk_norm, arch, "always has a per-head q/k norm")
    _need(not cfg.attn_bias, "attn_bias", cfg.attn_bias, arch, "has no qkv-only bias")
    return {**_export_qwen_moe(cfg, arch, "qwen3_moe"), "attention_bias": False}


def export_olmoe(cfg: ModelConfig) -> dict:
    arch = "OlmoeForCausalLM"
    m = cfg.moe
    _need(cfg.is_moe and not m.num_shared_experts, "moe.num_shared_experts", None if m is None else m.num_shared_experts,
          arch, "has routed experts only")
    _need(len(cfg.moe_layers) == cfg.n_layers, "dense_layers", _dense_layers(cfg), arch, "makes every layer MoE")
    _need(cfg.qk_norm and cfg.qk_norm_full and cfg.head_dim in (None, cfg.dim // cfg.n_heads), "qk_norm_full",
          cfg.qk_norm_full, arch, "normalises the full q/k projections, head_dim = hidden/heads")
    _need(m.router in ("softmax_topk", "topk_softmax"), "moe.router", m.router, arch, "uses softmax top-k")
    d = _common_export(cfg, arch, "olmoe")
    d.update(num_experts=m.num_experts, intermediate_size=m.expert_dim, attention_bias=False, clip_qkv=None,
             norm_topk_prob=m.router == "topk_softmax" or m.norm_topk_prob)
    _need(not cfg.attn_bias, "attn_bias", cfg.attn_bias, arch, "has no qkv-only bias")
    return d


EXPORT_ORDER = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM",
                "LlamaForCausalLM", "Qwen2ForCausalLM")
"""Tried in this order for moekit-native models: the closest HF layout that expresses the model."""

for _name, _mt, _cfg_fn, _exp in (
    ("LlamaForCausalLM", "llama", llama_config, export_llama),
    ("MistralForCausalLM", "mistral", llama_config, None),
    ("Qwen2ForCausalLM", "qwen2", qwen2_config, export_qwen2),
    ("MixtralForCausalLM", "mixtral", mixtral_config, export_mixtral),
    ("Qwen2MoeForCausalLM", "qwen2_moe", qwen2_moe_config, export_qwen2_moe),
    ("Qwen3MoeForCausalLM", "qwen3_moe", qwen3_moe_config, export_qwen3_moe),
    ("OlmoeForCausalLM", "olmoe", olmoe_config, export_olmoe),
):
    register_architecture(_name, _mt, _cfg_fn, _plan_fn(_mt), _exp, _ignore)

__all__ = ["EXPORT_ORDER", "ConfigError", "make_plan"]
