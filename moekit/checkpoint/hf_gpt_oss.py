"""gpt-oss (`GptOssForCausalLM`, model_type `gpt_oss`) Hugging Face checkpoints: config mapping and
streaming import, with MXFP4 experts kept as MXFP4.

Shape legend: E experts, F expert width, D model dim, H = 2F (gate + up), I a matrix's input dim,
O its output dim, B = I / 32 MX blocks per row.

What changes the math, and where it lands in moekit:
- Attention: q/k/v and o_proj biases (`attn_bias`, `attn_out_bias`), a learned sink logit per head
  (`attn_sinks`), a sliding window (`sliding_window`) on the layers HF's `layer_types` marks
  `sliding_attention` (`sliding_layers`), YaRN RoPE (moekit.model.rope, `truncate` honoured).
- Router: linear with bias, top-k on the logits, softmax over the chosen k (`topk_softmax`,
  `router_bias`).
- Experts: biases on both projections (`expert_bias`) and the clamped SwiGLU
  (`clamped_swiglu` with `swiglu_alpha` / `swiglu_limit`).

Layouts. HF keeps `gate_up_proj` as [E, D, 2F] (x @ W) with gate and up *interleaved* along the
last dim (gate = [..., 0::2], up = [..., 1::2]) and `down_proj` as [E, F, D]. moekit wants
[E, 2F, D] with the gate rows first and [E, D, F]: each expert is transposed and its rows
de-interleaved at load (the biases' columns likewise).

MXFP4. The hub checkpoints store the experts as `{gate_up,down}_proj_blocks` uint8 [E, O, B, 16]
and `_scales` uint8 [E, O, B] in the de-transposed [E, O, I] orientation (transformers'
`integrations/mxfp4.py` dequantizes value = FP4_VALUES[nibble] * 2^(scale - 127), the low nibble of
byte j being element 2j and the high nibble element 2j + 1, then transposes to [E, I, O]). moekit's
MXFP4 (`moekit.quant`) uses the same E2M1 code table and the same biased E8M0 scale, one per 32
inputs of a row; only the nibble order inside a 32-element block differs (moekit keeps GGUF's
order: byte j holds elements j and j + 16). Import re-packs the nibbles and de-interleaves the
rows of codes and scales: bit-exact, and no float expert weight is ever built. The model then
holds `QuantizedExperts` (scheme mxfp4) and `model.quant_config` says so; `moekit convert` writes
it as a moekit quantized checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.checkpoint.hf_pieces import Piece, Plan, build_meta
from moekit.config import ConfigError, ModelConfig, MoEConfig

ARCH = "GptOssForCausalLM"
MX_BLOCK_BYTES = 16
"""One MX block of 32 FP4 values, two per byte."""
_ROPE_DEFAULT = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
"""`GptOssConfig`'s RoPE when config.json gives none."""


def _fail(field: str, value: Any, why: str) -> None:
    raise ConfigError(f"config field `{field}`: value {value!r} is not supported ({why})")


def _layer_types(d: dict, n: int) -> list[str]:
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(types) != n:
        _fail("layer_types", types, f"needs one entry per layer ({n})")
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if bad:
        _fail("layer_types", bad, "gpt-oss layers are sliding_attention or full_attention")
    return list(types)


def config_from_hf(d: dict[str, Any], source: str = "") -> ModelConfig:
    """Map a gpt-oss HF config dict to a moekit `ModelConfig` (defaults are GptOssConfig's)."""
    from moekit.checkpoint.hf_config import get, rope_from_hf

    # Plan: 1. shapes and norms; 2. RoPE (YaRN by default) and the per-layer window; 3. attention
    # biases and sinks; 4. the MoE block (router bias, expert biases, clamped SwiGLU).
    q = d.get("quantization_config") or {}
    if q and q.get("quant_method") != "mxfp4":
        _fail("quantization_config.quant_method", q.get("quant_method"), "gpt-oss import reads mxfp4 or float experts")
    n = int(get(d, "num_hidden_layers", 36))
    dim, heads = int(get(d, "hidden_size", 2880)), int(get(d, "num_attention_heads", 64))
    head_dim = int(get(d, "head_dim", dim // heads))
    if not d.get("rope_parameters") and not d.get("rope_scaling") and "rope_theta" not in d:
        d = {**d, "rope_parameters": dict(_ROPE_DEFAULT)}
    elif not (d.get("rope_parameters") or {}).get("rope_theta") and "rope_theta" not in d:
        d = {**d, "rope_theta": _ROPE_DEFAULT["rope_theta"]}
    theta, scaling = rope_from_hf(d, "gpt_oss")
    types = _layer_types(d, n)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = get(d, "sliding_window", 128)
    if not window:
        sliding = []
    bias = bool(get(d, "attention_bias", True))
    moe = MoEConfig(num_experts=int(get(d, "num_local_experts", 128)), top_k=int(get(d, "num_experts_per_tok", 4)),
                    expert_dim=int(get(d, "intermediate_size", 2880)), router="topk_softmax", router_bias=True,
                    expert_bias=True, expert_act="clamped_swiglu", swiglu_alpha=float(get(d, "swiglu_alpha", 1.702)),
                    swiglu_limit=float(get(d, "swiglu_limit", 7.0)),
                    aux_loss_coef=float(get(d, "router_aux_loss_coef", 0.001)))
    return ModelConfig(
        name=d.get("_name_or_path") or "gpt-oss", vocab_size=int(get(d, "vocab_size", 201088)), dim=dim, n_layers=n,
        n_heads=heads, n_kv_heads=int(get(d, "num_key_value_heads", heads)),
        head_dim=head_dim if head_dim != dim // heads else None, ffn_dim=moe.expert_dim,
        max_seq_len=int(get(d, "max_position_embeddings", 131072)), norm_eps=float(get(d, "rms_norm_eps", 1e-5)),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(get(d, "tie_word_embeddings", False)),
        attn_bias=bias, attn_out_bias=bias, attn_sinks=True,
        sliding_window=int(window) if sliding else None, sliding_layers=sliding, moe=moe,
        source=f"{source} ({ARCH})" if source else ARCH,
    )


# ------------------------------------------------------------------------------ layouts
def _deinterleave(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse): index i of moekit's [gate | up] order reads HF's interleaved index perm[i]."""
    perm = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(n)
    return perm, inv


def mx_blocks_to_codes(blocks_OB16: torch.Tensor) -> torch.Tensor:
    """HF MXFP4 blocks [..., O, B, 16] (byte j: element 2j low nibble, 2j+1 high) -> moekit's packed
    codes [..., O, B * 16] (GGUF block order: byte j holds elements j and j + 16). Same codes."""
    from moekit.quant.formats import pack_nibbles

    b = blocks_OB16.to(torch.uint8)
    codes_OBk = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # [..., O, B, 32] in element order
    return pack_nibbles(codes_OBk.flatten(-2))


def codes_to_mx_blocks(q_OI2: torch.Tensor) -> torch.Tensor:
    """Inverse of `mx_blocks_to_codes`: moekit packed codes [..., O, I/2] -> HF blocks [..., O, B, 16]."""
    from moekit.quant.formats import unpack_nibbles

    c = unpack_nibbles(q_OI2).unflatten(-1, (-1, 32))  # [..., O, B, 32]
    return c[..., 0::2] | (c[..., 1::2] << 4)


def _quantized(keys: set[str] | None, hf: dict | None = None) -> bool:
    if keys is None:  # export: the config says whether the experts go out as MXFP4
        return ((hf or {}).get("quantization_config") or {}).get("quant_method") == "mxfp4"
    return any(k.endswith("experts.gate_up_proj_blocks") for k in keys)


def plan_fn(cfg: ModelConfig, hf: dict | None = None, keys: set[str] | None = None) -> Plan:
    """moekit key -> HF pieces for a gpt-oss model (float or MXFP4 experts: chosen from `keys` on
    import, from the config's `quantization_config` on export)."""
    # Plan: 1. embeddings, final norm, head; 2. per layer: norms, fused q/k/v (+ biases), o_proj,
    # sinks; 3. router; 4. experts per expert: float (transpose + de-interleave) or MXFP4
    # (nibble re-pack + row de-interleave of codes and scales), and their biases.
    m = cfg.moe
    assert m is not None
    E, F_, D = m.num_experts, m.expert_dim, cfg.dim
    perm, inv = _deinterleave(2 * F_)
    rows_fwd = lambda t: t.index_select(0, perm)  # noqa: E731
    rows_inv = lambda t: t.index_select(0, inv)  # noqa: E731
    plan: Plan = {"embed.weight": [Piece("model.embed_tokens.weight")], "norm.weight": [Piece("model.norm.weight")]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [Piece("lm_head.weight")]
    q, kv = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
    mx = _quantized(keys, hf)
    for i in range(cfg.n_layers):
        h, k = f"model.layers.{i}.", f"layers.{i}."
        plan[k + "attn_norm.weight"] = [Piece(h + "input_layernorm.weight")]
        plan[k + "ffn_norm.weight"] = [Piece(h + "post_attention_layernorm.weight")]
        a = h + "self_attn."
        for part in ("weight", "bias") if cfg.attn_bias else ("weight",):
            plan[k + f"attn.wqkv.{part}"] = [Piece(f"{a}q_proj.{part}", rows=(0, q)),
                                             Piece(f"{a}k_proj.{part}", rows=(q, q + kv)),
                                             Piece(f"{a}v_proj.{part}", rows=(q + kv, q + 2 * kv))]
        plan[k + "attn.wo.weight"] = [Piece(a + "o_proj.weight")]
        if cfg.attn_out_bias:
            plan[k + "attn.wo.bias"] = [Piece(a + "o_proj.bias")]
        plan[k + "attn.sinks"] = [Piece(a + "sinks")]
        mh, mk = h + "mlp.", k + "ffn."
        plan[mk + "router.weight"] = [Piece(mh + "router.weight")]
        plan[mk + "router.bias"] = [Piece(mh + "router.bias")]
        ex, x = mh + "experts.", mk + "experts."
        if mx:
            gu_shape, dn_shape = (2 * F_, D // 32, MX_BLOCK_BYTES), (D, F_ // 32, MX_BLOCK_BYTES)
            gu_fwd = lambda t: rows_fwd(mx_blocks_to_codes(t))  # noqa: E731
            gu_inv = lambda t: codes_to_mx_blocks(rows_inv(t))  # noqa: E731
            plan[x + "qw13.q"] = [Piece(ex + "gate_up_proj_blocks", expert=e, src_index=e, src_shape=gu_shape,
                                        fwd=gu_fwd, inv=gu_inv) for e in range(E)]
            plan[x + "qw13.scale"] = [Piece(ex + "gate_up_proj_scales", expert=e, src_index=e, fwd=rows_fwd,
                                            inv=rows_inv) for e in range(E)]
            plan[x + "qw2.q"] = [Piece(ex + "down_proj_blocks", expert=e, src_index=e, src_shape=dn_shape,
                                       fwd=mx_blocks_to_codes, inv=codes_to_mx_blocks) for e in range(E)]
            plan[x + "qw2.scale"] = [Piece(ex + "down_proj_scales", expert=e, src_index=e) for e in range(E)]
        else:
            plan[x + "w13"] = [Piece(ex + "gate_up_proj", expert=e, src_index=e, transpose=True, fwd=rows_fwd,
                                     inv=rows_inv) for e in range(E)]
            plan[x + "w2"] = [Piece(ex + "down_proj", expert=e, src_index=e, transpose=True) for e in range(E)]
        plan[x + "b13"] = [Piece(ex + "gate_up_proj_bias", expert=e, src_index=e, fwd=rows_fwd, inv=rows_inv)
                           for e in range(E)]
        plan[x + "b2"] = [Piece(ex + "down_proj_bias")]
    return plan


def mxfp4_quant_config():
    """The `QuantConfig` of an imported MXFP4 gpt-oss (experts only; attention, router, embeddings
    and head stay as stored)."""
    from moekit.quant.config import QuantConfig

    return QuantConfig(scheme="mxfp4", group_size=32, calibration={
        "source": "gpt-oss checkpoint: MXFP4 experts imported bit-exact (codes re-packed, not re-quantized)"})


def build_fn(cfg: ModelConfig, hf: dict | None = None, keys: set[str] | None = None):
    """The meta model to load into: MXFP4 `QuantizedExperts` when the checkpoint stores blocks/scales."""
    model = build_meta(cfg)
    if _quantized(keys):
        from moekit.quant.apply import empty_structure

        qcfg = mxfp4_quant_config()
        empty_structure(model, qcfg)
        model.quant_config = qcfg
    return model


def ignore_fn(key: str) -> bool:
    return key.endswith("rotary_emb.inv_freq")


MXFP4_HF_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
"""The `quantization_config` of the hub checkpoints: only the experts are MXFP4."""


def export_config(cfg: ModelConfig) -> dict[str, Any]:
    """The GptOssForCausalLM config.json for a moekit model (raises ConfigError if it does not fit)."""
    m = cfg.moe
    problems = []
    if cfg.attention != "gqa" or cfg.qk_norm or cfg.qk_l2_norm or cfg.no_rope_layers or cfg.attention_chunk_size:
        problems.append("attention must be plain GQA (no q/k norm, chunking or no-RoPE layers)")
    if not cfg.attn_sinks or cfg.attn_bias != cfg.attn_out_bias:
        problems.append("needs attention sinks, and q/k/v biases exactly when o_proj has one")
    if m is None or len(cfg.moe_layers) != cfg.n_layers or m.num_shared_experts:
        problems.append("every layer must be MoE with routed experts only")
    elif (m.router != "topk_softmax" or not m.router_bias or not m.expert_bias or m.expert_act != "clamped_swiglu"
          or m.n_group > 1 or m.score_correction_bias or m.routed_scaling_factor != 1.0 or m.weight_on_input
          or m.capacity_factor is not None):
        problems.append("the MoE must be gpt-oss's (top-k softmax router with bias, biased clamped-SwiGLU experts)")
    if problems:
        raise ConfigError(f"cannot export {cfg.name!r} as {ARCH}: " + "; ".join(problems))
    slide = set(cfg.sliding_layers)
    return {
        "architectures": [ARCH], "model_type": "gpt_oss", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": m.expert_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd, "num_local_experts": m.num_experts,
        "num_experts_per_tok": m.top_k, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        # With no sliding layer the window is unused; HF still builds its mask, so give it a length.
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "layer_types": ["sliding_attention" if i in slide else "full_attention" for i in range(cfg.n_layers)],
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {"rope_type": "default"})},
        "tie_word_embeddings": cfg.tie_embeddings, "swiglu_alpha": m.swiglu_alpha, "swiglu_limit": m.swiglu_limit,
        "router_aux_loss_coef": m.aux_loss_coef, "attention_bias": cfg.attn_bias, "attention_dropout": 0.0,
        "hidden_act": "silu", "initializer_range": cfg.init_std, "use_cache": True,
    }


def _register() -> None:
    from moekit.checkpoint.hf_config import register_architecture

    register_architecture(ARCH, "gpt_oss", config_from_hf, plan_fn, export_config, ignore_fn, build_fn)


_register()

__all__ = ["ARCH", "build_fn", "codes_to_mx_blocks", "config_from_hf", "mx_blocks_to_codes", "plan_fn"]
