"""Named model configs. Tiny ones are for tests and demos; real ones copy a published
config.json (noted in `source`) and are used for planning and as shapes for benchmarks."""

from __future__ import annotations

from typing import Callable

from moekit.config import ConfigError, ModelConfig, MoEConfig

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str):
    def deco(fn: Callable[[], ModelConfig]):
        _PRESETS[name] = fn
        return fn
    return deco


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """Return a fresh copy of a named config."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    cfg = _PRESETS[name]()
    cfg.name = name
    return cfg


# --------------------------------------------------------------------------- tiny (tests, demos)
@register("tiny-moe")
def _tiny_moe() -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_dim=64), source="moekit test model")


@register("tiny-dense")
def _tiny_dense() -> ModelConfig:
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=256,
                       source="moekit test model")


@register("tiny-deepseek")
def _tiny_deepseek() -> ModelConfig:
    """DeepSeek-V3-style routing at toy size: sigmoid, 4 groups choose 2, bias balancing, shared
    expert, leading dense layer, fine-grained experts."""
    return ModelConfig(vocab_size=512, dim=64, n_layers=3, n_heads=4, ffn_dim=128, max_seq_len=256, first_k_dense=1,
                       moe=MoEConfig(num_experts=16, top_k=4, expert_dim=32, router="sigmoid_topk",
                                     norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                     score_correction_bias=True, bias_update_rate=1e-3, num_shared_experts=1,
                                     shared_expert_dim=32, aux_loss_coef=0.0),
                       source="moekit test model (DeepSeek-V3 routing)")


@register("tiny-qwen-moe")
def _tiny_qwen() -> ModelConfig:
    """Qwen2-MoE-style: softmax top-k with renormalisation, gated shared expert, q/k norm."""
    return ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                       qk_norm=True, moe=MoEConfig(num_experts=8, top_k=2, expert_dim=32, router="softmax_topk",
                                                   norm_topk_prob=True, num_shared_experts=1, shared_expert_dim=64,
                                                   shared_expert_gate=True),
                       source="moekit test model (Qwen2-MoE routing)")


# ------------------------------------------------------------------- small (demo / main job)
@register("small-moe")
def _small_moe() -> ModelConfig:
    """~8M-active-parameter MoE for CPU training runs (8 experts, top-2)."""
    return ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, ffn_dim=1024, max_seq_len=512,
                       tie_embeddings=True, moe=MoEConfig(num_experts=8, top_k=2, expert_dim=512, aux_loss_coef=0.01),
                       source="moekit default training model")


# ---------------------------------------------------------------------------- real model shapes
@register("mixtral-8x7b")
def _mixtral_8x7b() -> ModelConfig:
    return ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       max_seq_len=32768, rope_theta=1e6, norm_eps=1e-5,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_dim=14336, router="topk_softmax", aux_loss_coef=0.02),
                       source="mistralai/Mixtral-8x7B-v0.1 config.json")


@register("tiny-mixtral")
def _tiny_mixtral() -> ModelConfig:
    """The reference inference workload: HF MixtralConfig(hidden 1024, intermediate 2816, 8 layers,
    16/4 heads, 8 experts top-2, vocab 32000), 640M params, 192M active."""
    return ModelConfig(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=2816,
                       max_seq_len=4096, rope_theta=1e6, norm_eps=1e-5,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_dim=2816, router="topk_softmax", aux_loss_coef=0.02),
                       source="moekit reference workload (issue 6)")
