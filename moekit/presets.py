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
    """MoE for CPU training runs (8 experts, top-2): 6.30M active of 15.74M parameters (`moekit info small-moe`)."""
    return ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, ffn_dim=1024, max_seq_len=512,
                       tie_embeddings=True, moe=MoEConfig(num_experts=8, top_k=2, expert_dim=512, aux_loss_coef=0.01),
                       source="moekit default training model")


@register("small-moe-fg")
def _small_moe_fg() -> ModelConfig:
    """The main job's MoE: small-moe with DeepSeekMoE-style fine-grained experts (16 of width 256,
    top-3) plus one shared expert of width 256, at small-moe's active FFN width (3 x 256 + 256 = 1024),
    so its dense_equivalent is small-moe's. Chosen by the recipe screen of docs/experiments.md."""
    return ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, ffn_dim=1024, max_seq_len=512,
                       tie_embeddings=True,
                       moe=MoEConfig(num_experts=16, top_k=3, expert_dim=256, num_shared_experts=1,
                                     shared_expert_dim=256, aux_loss_coef=0.01),
                       source="moekit main-job training model (fine-grained + shared expert)")


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


# -------------------------------------------------------------- real models (capacity planning)
# Copied from each model's Hugging Face config.json (named in `source`). These are text-only
# decoder configs: vision towers and multi-token-prediction modules are *not* part of them; the
# planner (moekit.plan.spec.EXTRAS) counts those remainders separately where a published total
# includes them. Router/aux-loss coefficients only matter for training and are copied as given.
@register("mixtral-8x22b")
def _mixtral_8x22b() -> ModelConfig:
    # vocab 32768: the repo's config was updated to the v3 tokenizer (the first upload said 32000).
    return ModelConfig(vocab_size=32768, dim=6144, n_layers=56, n_heads=48, n_kv_heads=8, ffn_dim=16384,
                       max_seq_len=65536, rope_theta=1e6, norm_eps=1e-5,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_dim=16384, router="topk_softmax",
                                     aux_loss_coef=0.001),
                       source="mistralai/Mixtral-8x22B-v0.1 config.json")


@register("deepseek-v3")
def _deepseek_v3() -> ModelConfig:
    # The 61 main layers only: the hub checkpoint also holds one MTP layer (`num_nextn_predict_layers`
    # = 1, ~14B incl. its own copies of embedding/head) that inference does not need: 685B on the hub
    # = 671B main + 14B MTP. `e_score_correction_bias` (256 per MoE layer) is a buffer here.
    return ModelConfig(vocab_size=129280, dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, ffn_dim=18432,
                       max_seq_len=163840, rope_theta=10000.0, norm_eps=1e-6, attention="mla",
                       q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                       rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                       first_k_dense=3,
                       moe=MoEConfig(num_experts=256, top_k=8, expert_dim=2048, router="sigmoid_topk",
                                     norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                                     score_correction_bias=True, num_shared_experts=1, shared_expert_dim=2048,
                                     aux_loss_coef=0.0001, seq_aux_loss=True),
                       source="deepseek-ai/DeepSeek-V3 config.json")


@register("qwen3-30b-a3b")
def _qwen3_30b() -> ModelConfig:
    # transformers' Qwen3MoeConfig defaults differ from the checkpoint: 24 layers (real: 48) and
    # norm_topk_prob=False (real: True). intermediate_size 6144 is unused (no dense layers).
    return ModelConfig(vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                       ffn_dim=6144, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
                       moe=MoEConfig(num_experts=128, top_k=8, expert_dim=768, router="softmax_topk",
                                     norm_topk_prob=True, aux_loss_coef=0.001),
                       source="Qwen/Qwen3-30B-A3B config.json")


@register("qwen3-235b-a22b")
def _qwen3_235b() -> ModelConfig:
    return ModelConfig(vocab_size=151936, dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128,
                       ffn_dim=12288, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
                       moe=MoEConfig(num_experts=128, top_k=8, expert_dim=1536, router="softmax_topk",
                                     norm_topk_prob=True, aux_loss_coef=0.001),
                       source="Qwen/Qwen3-235B-A22B config.json")


@register("olmoe-1b-7b")
def _olmoe() -> ModelConfig:
    # q/k RMSNorm over the whole projection (OLMoE), no renormalisation of the top-8 weights.
    return ModelConfig(vocab_size=50304, dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=1024,
                       max_seq_len=4096, rope_theta=10000.0, norm_eps=1e-5, qk_norm=True, qk_norm_full=True,
                       moe=MoEConfig(num_experts=64, top_k=8, expert_dim=1024, router="softmax_topk",
                                     norm_topk_prob=False, aux_loss_coef=0.01, z_loss_coef=0.001),
                       source="allenai/OLMoE-1B-7B-0924 config.json")


def _llama4(num_experts: int, moe_every: int, max_seq_len: int, rope_scaling: dict | None) -> ModelConfig:
    # text_config of the multimodal checkpoint; the vision tower + projector (~0.87B) is not here.
    # Llama 4's q/k norm is a weightless L2 norm (no parameters), so qk_norm stays off for counting.
    # Every 4th layer has no RoPE (HF `no_rope_layers` flags 0 there); RoPE layers use chunked
    # attention over 8192-token chunks. Routed experts and the shared expert are 8192 wide;
    # interleaved dense layers (Maverick) use intermediate_size_mlp = 16384.
    n_layers = 48
    return ModelConfig(vocab_size=202048, dim=5120, n_layers=n_layers, n_heads=40, n_kv_heads=8, head_dim=128,
                       ffn_dim=16384, max_seq_len=max_seq_len, rope_theta=500000.0, rope_scaling=rope_scaling,
                       norm_eps=1e-5, no_rope_layers=[i for i in range(n_layers) if (i + 1) % 4 == 0],
                       attention_chunk_size=8192, moe_every=moe_every,
                       moe=MoEConfig(num_experts=num_experts, top_k=1, expert_dim=8192, router="sigmoid_topk",
                                     weight_on_input=True, num_shared_experts=1, shared_expert_dim=8192,
                                     aux_loss_coef=0.001))


@register("llama4-scout")
def _llama4_scout() -> ModelConfig:
    cfg = _llama4(16, 1, 10485760, {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})
    cfg.source = "meta-llama/Llama-4-Scout-17B-16E config.json (text_config)"
    return cfg


@register("llama4-maverick")
def _llama4_maverick() -> ModelConfig:
    # interleave_moe_layer_step = 2: odd layers (1, 3, ...) are MoE, even layers dense.
    cfg = _llama4(128, 2, 1048576, None)
    cfg.source = "meta-llama/Llama-4-Maverick-17B-128E config.json (text_config)"
    return cfg


def _gpt_oss(n_layers: int, num_experts: int) -> ModelConfig:
    # The same config `moekit.checkpoint.hf_gpt_oss` reads from the hub's config.json: expert and
    # attention biases, per-head sinks, a 128-token sliding window on the even layers, the clamped
    # SwiGLU. moekit's KV cache is full-length on the sliding layers too (the window is a mask), so
    # the planner's full-cache KV estimate is what moekit allocates. The checkpoint stores experts
    # in MXFP4 (4.25 bits/weight): use `--dtype int4` to approximate.
    return ModelConfig(vocab_size=201088, dim=2880, n_layers=n_layers, n_heads=64, n_kv_heads=8, head_dim=64,
                       ffn_dim=2880, max_seq_len=131072, rope_theta=150000.0, norm_eps=1e-5, attn_bias=True,
                       attn_out_bias=True, attn_sinks=True, sliding_window=128,
                       sliding_layers=list(range(0, n_layers, 2)),
                       rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
                       moe=MoEConfig(num_experts=num_experts, top_k=4, expert_dim=2880, router="topk_softmax",
                                     router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                                     aux_loss_coef=0.9))


@register("gpt-oss-20b")
def _gpt_oss_20b() -> ModelConfig:
    cfg = _gpt_oss(24, 32)
    cfg.source = "openai/gpt-oss-20b config.json"
    return cfg


@register("gpt-oss-120b")
def _gpt_oss_120b() -> ModelConfig:
    cfg = _gpt_oss(36, 128)
    cfg.source = "openai/gpt-oss-120b config.json"
    return cfg


# ------------------------------------------------------------ experiments (docs/experiments.md)
@register("mini-moe")
def _mini_moe() -> ModelConfig:
    """Small enough for several 3-minute CPU runs: 2 layers of 8 experts (top-2), hidden 128."""
    return ModelConfig(vocab_size=8192, dim=128, n_layers=2, n_heads=4, ffn_dim=512, max_seq_len=256,
                       tie_embeddings=True, moe=MoEConfig(num_experts=8, top_k=2, expert_dim=256, aux_loss_coef=0.01),
                       source="moekit experiments model")


@register("mini-moe-hyper")
def _mini_moe_hyper() -> ModelConfig:
    """mini-moe plus HyperMoE (arXiv 2402.12656): a shared hypernetwork generates a 16-wide HyperExpert
    adapter per token from its unselected experts (experiment h of `moekit.train.experiments`)."""
    cfg = _mini_moe()
    cfg.moe.hyper_dim = 16
    cfg.moe.validate()
    cfg.source = "moekit experiments model + HyperMoE"
    return cfg
