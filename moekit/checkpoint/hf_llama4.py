"""Llama 4 (text part) Hugging Face checkpoints: config mapping, streaming import, export.

Shape legend: E experts, F expert width, D model dim, H q heads, G kv heads, Dh head dim.

What changes the math, and where it lands in moekit:
- MoE layers (`moe_layers`, default every `interleave_moe_layer_step`-th): top-k (Llama 4: 1) of the
  router logits, weight = sigmoid(logit) applied to the expert *input* (`weight_on_input`), plus an
  ungated shared expert of width `intermediate_size`; dense layers use `intermediate_size_mlp`.
- Attention: RoPE only where `no_rope_layers[i] == 1` (HF's list is a use-RoPE mask); those layers
  use chunked local attention (`attention_chunk_size`) and, with `use_qk_norm`, a weightless L2 norm
  of q and k after RoPE; the no-RoPE layers scale q by the temperature-tuning factor.
- Llama 4's RoPE rotates interleaved pairs (complex form): q_proj/k_proj rows of each head are
  permuted to rotate-half order at load (exactly equivalent: q.k and the L2 norm do not change under
  the same permutation of q and k) and permuted back at export.
- Fused experts: HF stores `gate_up_proj` [E, D, 2F] and `down_proj` [E, F, D] (transposed against
  F.linear); they are transposed per expert into moekit's [E, 2F, D] / [E, D, F].
`Llama4ForConditionalGeneration` checkpoints load their language model; vision tensors are skipped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint.hf_pieces import Piece, Plan, deinterleave_rows, gated_mlp_pieces
from moekit.config import ConfigError, ModelConfig, MoEConfig

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"config field `{field}`: value {value!r} is not supported ({why})")


def text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The text-model config: `text_config` of a multimodal Llama 4 config, else the dict itself."""
    return d["text_config"] if isinstance(d.get("text_config"), dict) else d


def rope_use_mask(t: dict[str, Any]) -> list[int]:
    """HF's `no_rope_layers`: 1 = layer uses RoPE (default: every `no_rope_layer_interval`-th layer not)."""
    n = t["num_hidden_layers"]
    mask = t.get("no_rope_layers") or [int((i + 1) % t.get("no_rope_layer_interval", 4) != 0) for i in range(n)]
    if len(mask) != n:
        _fail("no_rope_layers", mask, f"needs one entry per layer ({n})")
    return [int(x) for x in mask]


def config_from_hf(d: dict[str, Any], source: str = "") -> ModelConfig:
    """Map a Llama 4 (text) HF config dict to a moekit `ModelConfig`."""
    from moekit.checkpoint.hf_config import rope_from_hf

    # Plan: 1. shapes and norms; 2. RoPE / chunked / no-RoPE layers and their extras; 3. MoE layers.
    t = text_config(d)
    if t.get("hidden_act", "silu") not in ("silu", "swish"):
        _fail("hidden_act", t["hidden_act"], "only SiLU-gated FFNs are supported")
    if t.get("attention_bias"):
        _fail("attention_bias", True, "it adds an o_proj bias that moekit's attention does not have")
    n = t["num_hidden_layers"]
    dim, heads = t["hidden_size"], t["num_attention_heads"]
    head_dim = t.get("head_dim") or dim // heads
    if "rope_parameters" not in t and "rope_theta" not in t:
        t = {**t, "rope_theta": 500000.0}  # Llama4TextConfig.default_theta
    theta, scaling = rope_from_hf(t, "llama4_text")
    use_rope = rope_use_mask(t)
    no_rope = [i for i, r in enumerate(use_rope) if not r]
    chunk = t.get("attention_chunk_size", 8192)
    types = t.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in use_rope]
    if not chunk or "chunked_attention" not in types:
        chunk = None
    elif types != ["chunked_attention" if r else "full_attention" for r in use_rope]:
        _fail("layer_types", types, "moekit chunks exactly the RoPE layers (Llama 4's default pattern)")
    moe_layers = t.get("moe_layers")
    step = int(t.get("interleave_moe_layer_step", 1))
    if moe_layers is None:
        moe_layers = list(range(step - 1, n, step))
    if moe_layers == list(range(step - 1, n, step)):
        moe_every, dense = step, []
    else:
        moe_every, dense = 1, [i for i in range(n) if i not in moe_layers]
    E, F_ = t.get("num_local_experts", 16), t.get("intermediate_size", 8192)
    moe = MoEConfig(num_experts=E, top_k=t.get("num_experts_per_tok", 1), expert_dim=F_, router="sigmoid_topk",
                    weight_on_input=True, num_shared_experts=1, shared_expert_dim=F_,
                    aux_loss_coef=float(t.get("router_aux_loss_coef", 0.001) or 0.0)) if (moe_layers and E) else None
    return ModelConfig(
        name=d.get("_name_or_path") or "llama4", vocab_size=t["vocab_size"], dim=dim, n_layers=n, n_heads=heads,
        n_kv_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim if head_dim != dim // heads else None,
        ffn_dim=t.get("intermediate_size_mlp", 16384), max_seq_len=t.get("max_position_embeddings", 131072),
        norm_eps=float(t.get("rms_norm_eps", 1e-5)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(t.get("tie_word_embeddings", False)), no_rope_layers=no_rope,
        attention_chunk_size=chunk, qk_l2_norm=bool(t.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(t.get("attn_temperature_tuning", True)),
        floor_scale=float(t.get("floor_scale", 8192)), attn_scale=float(t.get("attn_scale", 0.1)),
        moe=moe, moe_every=moe_every, dense_layers=dense,
        source=f"{source} (Llama4ForCausalLM)" if source else "Llama4ForCausalLM",
    )


def _prefixes(hf: dict | None, keys: set[str] | None) -> tuple[str, str]:
    """(decoder prefix, lm_head key) for text-only, v4 multimodal and v5 multimodal layouts."""
    candidates = [("model.", "lm_head.weight"), ("language_model.model.", "language_model.lm_head.weight"),
                  ("model.language_model.", "lm_head.weight")]
    if keys:
        for pre, head in candidates:
            if f"{pre}embed_tokens.weight" in keys:
                return pre, head
    multimodal = bool(hf) and "Llama4ForConditionalGeneration" in (hf.get("architectures") or [])
    return candidates[1] if multimodal else candidates[0]


def weight_plan(cfg: ModelConfig, prefix: str = "model.", head_key: str = "lm_head.weight") -> Plan:
    """moekit key -> HF pieces for a Llama 4 text model."""
    H, G, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    qf, qi = deinterleave_rows(H, hd, 0, hd)
    kf, ki = deinterleave_rows(G, hd, 0, hd)
    plan: Plan = {"embed.weight": [Piece(f"{prefix}embed_tokens.weight")], "norm.weight": [Piece(f"{prefix}norm.weight")]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [Piece(head_key)]
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"{prefix}layers.{i}."
        rope = i not in cfg.no_rope_layers
        plan[m + "attn_norm.weight"] = [Piece(h + "input_layernorm.weight")]
        plan[m + "ffn_norm.weight"] = [Piece(h + "post_attention_layernorm.weight")]
        a = h + "self_attn."
        plan[m + "attn.wqkv.weight"] = [
            Piece(a + "q_proj.weight", rows=(0, H * hd), fwd=qf if rope else None, inv=qi if rope else None),
            Piece(a + "k_proj.weight", rows=(H * hd, (H + G) * hd), fwd=kf if rope else None, inv=ki if rope else None),
            Piece(a + "v_proj.weight", rows=((H + G) * hd, (H + 2 * G) * hd)),
        ]
        plan[m + "attn.wo.weight"] = [Piece(a + "o_proj.weight")]
        f, hf = m + "ffn.", h + "feed_forward."
        if cfg.is_moe_layer(i):
            mc = cfg.moe
            plan[f + "router.weight"] = [Piece(hf + "router.weight")]
            plan[f + "experts.w13"] = [Piece(hf + "experts.gate_up_proj", expert=e, src_index=e, transpose=True)
                                       for e in range(mc.num_experts)]
            plan[f + "experts.w2"] = [Piece(hf + "experts.down_proj", expert=e, src_index=e, transpose=True)
                                      for e in range(mc.num_experts)]
            gated_mlp_pieces(plan, f + "shared.", hf + "shared_expert.", mc.shared_expert_dim)
        else:
            gated_mlp_pieces(plan, f, hf, cfg.ffn_dim)
    return plan


def plan_fn(cfg: ModelConfig, hf: dict | None = None, keys: set[str] | None = None) -> Plan:
    return weight_plan(cfg, *_prefixes(hf, keys))


def ignore_fn(key: str, cfg: ModelConfig | None = None) -> bool:
    """Vision tower / projector tensors of a multimodal checkpoint and derived rotary caches."""
    return key.startswith(_VISION_PREFIXES) or key.endswith("rotary_emb.inv_freq")


def load_llama4(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a Llama 4 HF directory (text model) into a moekit `Transformer` (streamed, dtype kept);
    the same as `moekit.load_model(path)`, which dispatches here through the architecture registry."""
    from moekit.checkpoint.hf import load_hf

    path = Path(path)
    d = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "Llama4ForConditionalGeneration" in (d.get("architectures") or []):
        warnings.warn(f"{path}: vision tower skipped; moekit loads the Llama 4 language model only", stacklevel=2)
    return load_hf(path, dtype=dtype, device=device)


def hf_config_for(cfg: ModelConfig) -> dict[str, Any]:
    """The Llama4ForCausalLM (llama4_text) config dict for a moekit model (raises if not expressible)."""
    m = cfg.moe
    problems = []
    if cfg.attention != "gqa" or cfg.qk_norm or cfg.attn_bias:
        problems.append("attention must be GQA without per-head RMS q/k norm or biases")
    if m is not None and cfg.moe_layers:
        if (m.router != "sigmoid_topk" or not m.weight_on_input or m.norm_topk_prob or m.n_group > 1
                or m.score_correction_bias or m.routed_scaling_factor != 1.0 or m.expert_act != "swiglu"):
            problems.append("router must be Llama 4's (sigmoid top-k, weight on input, no renormalisation/groups)")
        if m.num_shared_experts != 1 or m.shared_expert_dim != m.expert_dim or m.shared_expert_gate:
            problems.append("needs one ungated shared expert as wide as a routed expert")
    if cfg.first_k_dense:
        problems.append("first_k_dense is not expressible (use dense_layers)")
    if problems:
        raise ConfigError(f"cannot export {cfg.name!r} as Llama4ForCausalLM: " + "; ".join(problems))
    use_rope = [int(i not in cfg.no_rope_layers) for i in range(cfg.n_layers)]
    chunked = cfg.attention_chunk_size is not None
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": m.expert_dim if m else cfg.ffn_dim,
        "intermediate_size_mlp": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "num_experts_per_tok": m.top_k if m else 1,
        "num_local_experts": m.num_experts if m else 0, "moe_layers": cfg.moe_layers,
        "interleave_moe_layer_step": cfg.moe_every, "use_qk_norm": cfg.qk_l2_norm,
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "no_rope_layers": use_rope, "attention_chunk_size": cfg.attention_chunk_size or 8192,
        "layer_types": ["chunked_attention" if (r and chunked) else "full_attention" for r in use_rope],
        "attn_temperature_tuning": cfg.attn_temperature_tuning, "floor_scale": int(cfg.floor_scale),
        "attn_scale": cfg.attn_scale, "attention_bias": False,
    }


def export_llama4(model, out_dir: str | Path, dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB") -> Path:
    """Write `model` as a Llama4ForCausalLM directory that transformers loads with the same logits."""
    from moekit.checkpoint.hf_export import export_hf

    return export_hf(model, out_dir, arch="Llama4ForCausalLM", dtype=dtype, max_shard_size=max_shard_size)


def _register() -> None:
    try:
        from moekit.checkpoint.hf_config import register_architecture
    except ImportError:
        return
    for name in ARCHITECTURES:
        register_architecture(name, "llama4_text" if name == "Llama4ForCausalLM" else "llama4", config_from_hf,
                              plan_fn, hf_config_for if name == "Llama4ForCausalLM" else None, ignore_fn)


_register()
