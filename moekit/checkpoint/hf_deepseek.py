"""DeepSeek-V3 (and V2) Hugging Face checkpoints: config mapping, streaming import, export.

Shape legend: E routed experts, F expert width, D model dim, H heads, C kv_lora_rank,
R qk_rope_head_dim, N qk_nope_head_dim.

What changes the math, and where it lands in moekit:
- MLA attention (q_lora_rank / kv_lora_rank / rope-nope split / v_head_dim) -> `moekit.model.mla`;
  `rope_interleave` (V3 default True; V2 always interleaved) is undone by permuting the rope rows
  of q_b_proj (or q_proj) and kv_a_proj_with_mqa at load and redone at export.
- V3 routing: sigmoid scores, `e_score_correction_bias` for selection only (router `score_bias`),
  group-limited top-k (n_group / topk_group, groups scored by their top-2 sum), norm_topk_prob,
  routed_scaling_factor. V2: softmax scores, greedy or group-limited (group max), no renormalisation.
- Shared experts (n_shared_experts * moe_intermediate_size wide, ungated); first_k_dense_replace.
- The multi-token-prediction layers (`num_nextn_predict_layers`, stored as layers N..N+k-1) are not
  part of next-token inference: they are skipped with a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint.hf_pieces import Piece, Plan, SkippingPlan, deinterleave_rows, gated_mlp_pieces
from moekit.config import ConfigError, ModelConfig, MoEConfig

ARCHITECTURES = ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM")


def _rope(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, moekit rope_scaling) from HF v5 `rope_parameters` or legacy `rope_theta`/`rope_scaling`."""
    rp = d.get("rope_parameters") or {}
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"} or d.get("rope_scaling")
    if scaling:
        scaling = dict(scaling)
        rt = scaling.pop("type", None)
        scaling.setdefault("rope_type", rt or "default")
        if scaling["rope_type"] == "default":
            return theta, None
        if scaling["rope_type"] == "yarn" and "original_max_position_embeddings" not in scaling:
            raise ConfigError("config field `rope_scaling.original_max_position_embeddings`: yarn needs it; add it "
                              "to config.json")
    return theta, scaling or None


def _fail(field: str, msg: str) -> None:
    raise ConfigError(f"config field `{field}`: {msg}")


def config_from_hf(d: dict[str, Any], source: str = "") -> ModelConfig:
    """Map a DeepSeek-V2/V3 HF config dict to a moekit `ModelConfig` (every field that changes math)."""
    v3 = d.get("model_type", "deepseek_v3") != "deepseek_v2" and "DeepseekV2ForCausalLM" not in (d.get("architectures") or [])
    if d.get("hidden_act", "silu") != "silu":
        _fail("hidden_act", f"{d['hidden_act']!r} is not supported for DeepSeek (only 'silu')")
    if d.get("moe_layer_freq", 1) != 1:
        _fail("moe_layer_freq", f"{d['moe_layer_freq']} is not supported (transformers ignores it; only 1 is exact)")
    if d.get("mlp_bias"):
        _fail("mlp_bias", "biased MLPs are not supported")
    scoring = d.get("scoring_func", "sigmoid" if v3 else "softmax")
    method = d.get("topk_method", "noaux_tc" if v3 else "greedy")
    if v3 and (scoring != "sigmoid" or method != "noaux_tc"):
        _fail("scoring_func", f"DeepSeek-V3 import expects sigmoid / noaux_tc routing, got {scoring!r} / {method!r}")
    if not v3 and method not in ("greedy", "group_limited_greedy"):
        _fail("topk_method", f"{method!r} is not supported for DeepSeek-V2; use greedy or group_limited_greedy")
    if d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)):
        warnings.warn("DeepSeek multi-token-prediction (MTP) layers are skipped: moekit runs next-token "
                      "inference only", stacklevel=2)
    n_routed = d.get("n_routed_experts", d.get("num_experts"))
    moe_dim = d["moe_intermediate_size"]
    n_shared = d.get("n_shared_experts") or 0
    n_group = d.get("n_group") or 1
    grouped = v3 or method == "group_limited_greedy"
    moe = None
    if n_routed:
        moe = MoEConfig(
            num_experts=n_routed, top_k=d.get("num_experts_per_tok", 8), expert_dim=moe_dim, expert_act="swiglu",
            router="sigmoid_topk" if v3 else "softmax_topk",
            # HF's V2 router never renormalises, whatever norm_topk_prob says.
            norm_topk_prob=bool(d.get("norm_topk_prob", True)) if v3 else False,
            routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            n_group=n_group if grouped else 1, topk_group=(d.get("topk_group") or 1) if grouped else 1,
            group_score="top2_sum" if v3 else "max", score_correction_bias=v3,
            num_shared_experts=n_shared, shared_expert_dim=n_shared * moe_dim,
            aux_loss_coef=float(d.get("aux_loss_alpha", 0.0) or 0.0), seq_aux_loss=bool(d.get("seq_aux", v3)),
        )
    theta, scaling = _rope(d)
    return ModelConfig(
        name=d.get("_name_or_path") or ("deepseek-v3" if v3 else "deepseek-v2"), vocab_size=d["vocab_size"],
        dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        ffn_dim=d["intermediate_size"], max_seq_len=d.get("max_position_embeddings", 4096),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), attn_bias=bool(d.get("attention_bias", False)),
        attention="mla", q_lora_rank=d.get("q_lora_rank"), kv_lora_rank=d["kv_lora_rank"],
        qk_rope_head_dim=d["qk_rope_head_dim"], qk_nope_head_dim=d["qk_nope_head_dim"], v_head_dim=d["v_head_dim"],
        moe=moe, first_k_dense=min(d.get("first_k_dense_replace", 0) or 0, d["num_hidden_layers"]),
        source=f"{source} ({'DeepseekV3ForCausalLM' if v3 else 'DeepseekV2ForCausalLM'})",
    )


def _interleaved(d: dict[str, Any]) -> bool:
    v2 = d.get("model_type") == "deepseek_v2" or "DeepseekV2ForCausalLM" in (d.get("architectures") or [])
    return True if v2 else bool(d.get("rope_interleave", True))


def weight_plan(cfg: ModelConfig, interleaved: bool, prefix: str = "model.", fused_experts: bool = False) -> Plan:
    """moekit key -> HF pieces for a DeepSeek MLA model. Experts are per-expert tensors (the hub
    layout, and what `save_pretrained` writes) or, with `fused_experts`, transformers' in-memory
    `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj` [E, D, F] (moekit's own layout)."""
    H, N, R, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_perm = deinterleave_rows(H, N + R, N, R) if interleaved else (None, None)
    kv_perm = deinterleave_rows(1, C + R, C, R) if interleaved else (None, None)
    plan: Plan = {"embed.weight": [Piece(f"{prefix}embed_tokens.weight")], "norm.weight": [Piece(f"{prefix}norm.weight")]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight")]
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"{prefix}layers.{i}."
        plan[m + "attn_norm.weight"] = [Piece(h + "input_layernorm.weight")]
        plan[m + "ffn_norm.weight"] = [Piece(h + "post_attention_layernorm.weight")]
        a, ha = m + "attn.", h + "self_attn."
        if cfg.q_lora_rank:
            for n in ("q_a_proj.weight", "q_a_layernorm.weight"):
                plan[a + n] = [Piece(ha + n)]
            plan[a + "q_b_proj.weight"] = [Piece(ha + "q_b_proj.weight", fwd=q_perm[0], inv=q_perm[1])]
            if cfg.attn_bias:
                plan[a + "q_a_proj.bias"] = [Piece(ha + "q_a_proj.bias")]
        else:
            plan[a + "q_proj.weight"] = [Piece(ha + "q_proj.weight", fwd=q_perm[0], inv=q_perm[1])]
        plan[a + "kv_a_proj_with_mqa.weight"] = [Piece(ha + "kv_a_proj_with_mqa.weight", fwd=kv_perm[0], inv=kv_perm[1])]
        for n in ("kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"):
            plan[a + n] = [Piece(ha + n)]
        if cfg.attn_bias:
            plan[a + "kv_a_proj_with_mqa.bias"] = [Piece(ha + "kv_a_proj_with_mqa.bias", fwd=kv_perm[0], inv=kv_perm[1])]
            plan[a + "o_proj.bias"] = [Piece(ha + "o_proj.bias")]
        f, hm = m + "ffn.", h + "mlp."
        if cfg.is_moe_layer(i):
            mc = cfg.moe
            F_ = mc.expert_dim
            plan[f + "router.weight"] = [Piece(hm + "gate.weight")]
            if mc.score_correction_bias:
                plan[f + "router.score_bias"] = [Piece(hm + "gate.e_score_correction_bias")]
            w13, w2 = [], []
            for e in range(mc.num_experts):
                if fused_experts:
                    w13.append(Piece(hm + "experts.gate_up_proj", expert=e, src_index=e))
                    w2.append(Piece(hm + "experts.down_proj", expert=e, src_index=e))
                    continue
                he = f"{hm}experts.{e}."
                w13 += [Piece(he + "gate_proj.weight", expert=e, rows=(0, F_)),
                        Piece(he + "up_proj.weight", expert=e, rows=(F_, 2 * F_))]
                w2.append(Piece(he + "down_proj.weight", expert=e))
            plan[f + "experts.w13"], plan[f + "experts.w2"] = w13, w2
            if mc.num_shared_experts:
                gated_mlp_pieces(plan, f + "shared.", hm + "shared_experts.", mc.shared_expert_dim)
        else:
            gated_mlp_pieces(plan, f, hm, cfg.ffn_dim)
    return plan


def _skippable(n_layers: int):
    def ignore(key: str) -> bool:
        # MTP layers live at layer indices >= n_layers; rotary caches in old exports are derived data.
        parts = key.split(".")
        if key.endswith("rotary_emb.inv_freq"):
            return True
        return len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and int(parts[2]) >= n_layers
    return ignore


def load_deepseek(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a DeepSeek-V2/V3 HF directory into a moekit `Transformer` (streamed, dtype kept);
    the same as `moekit.load_model(path)`, which dispatches here through the architecture registry."""
    from moekit.checkpoint.hf import load_hf

    return load_hf(path, dtype=dtype, device=device)


def hf_config_for(cfg: ModelConfig) -> dict[str, Any]:
    """The DeepSeek-V3 HF config dict for a moekit MLA model (raises if it cannot be expressed)."""
    m = cfg.moe
    problems = []
    if cfg.attention != "mla":
        problems.append("attention must be 'mla'")
    if m is None or not cfg.moe_layers:
        problems.append("DeepSeek-V3 export needs MoE layers")
    else:
        if m.router != "sigmoid_topk" or m.expert_act != "swiglu" or m.weight_on_input or m.shared_expert_gate:
            problems.append("router must be sigmoid_topk with swiglu experts, no weight_on_input, no shared gate")
        if m.n_group > 1 and m.group_score != "top2_sum":
            problems.append("group_score must be top2_sum")
        if not m.num_shared_experts or m.shared_expert_dim % m.expert_dim:
            problems.append("shared_expert_dim must be a positive multiple of expert_dim")
    if cfg.moe_every != 1 or cfg.dense_layers or cfg.no_rope_layers or cfg.attention_chunk_size:
        problems.append("only leading dense layers (first_k_dense) are expressible")
    if problems:
        raise ConfigError(f"cannot export {cfg.name!r} as DeepseekV3ForCausalLM: " + "; ".join(problems))
    rope = {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "moe_intermediate_size": m.expert_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": m.shared_expert_dim // m.expert_dim, "n_routed_experts": m.num_experts,
        "routed_scaling_factor": m.routed_scaling_factor, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": m.n_group, "topk_group": m.topk_group,
        "num_experts_per_tok": m.top_k, "first_k_dense_replace": cfg.first_k_dense, "norm_topk_prob": m.norm_topk_prob,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope, "rope_interleave": True,
        "attention_bias": cfg.attn_bias, "num_nextn_predict_layers": 0, "dtype": None,
    }


def export_deepseek(model, out_dir: str | Path, dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write `model` as a DeepseekV3ForCausalLM directory that transformers loads with the same logits."""
    from moekit.checkpoint.hf_export import export_hf

    return export_hf(model, out_dir, arch="DeepseekV3ForCausalLM", dtype=dtype, max_shard_size=max_shard_size)


# ------------------------------------------------------------------ registry (moekit.checkpoint.hf_config)
def plan_fn(cfg: ModelConfig, hf: dict, keys: set[str] | None = None) -> Plan:
    """The tensor plan; on import it also skips the MTP layers (indices >= num_hidden_layers)."""
    fused = keys is not None and any(k.endswith("mlp.experts.gate_up_proj") for k in keys)
    plan = weight_plan(cfg, _interleaved(hf) if hf else True, fused_experts=fused)
    return SkippingPlan(plan, _skippable(cfg.n_layers)) if keys is not None else plan


def ignore_fn(key: str) -> bool:
    """Derived rotary caches in old exports (the MTP layers are skipped by `plan_fn`'s plan)."""
    return key.endswith("rotary_emb.inv_freq")


def _register() -> None:
    try:
        from moekit.checkpoint.hf_config import register_architecture
    except ImportError:  # the registry is optional: load_deepseek/export_deepseek work without it
        return
    register_architecture("DeepseekV3ForCausalLM", "deepseek_v3", config_from_hf, plan_fn, hf_config_for, ignore_fn)
    register_architecture("DeepseekV2ForCausalLM", "deepseek_v2", config_from_hf, plan_fn, None, ignore_fn)


_register()
