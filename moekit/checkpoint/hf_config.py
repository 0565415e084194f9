"""Hugging Face `config.json` -> `ModelConfig`, and the registry of supported HF architectures.

Every field that changes the math is read from the file; when the file leaves a field out, the
value is the one the transformers config class would use (its class default, which differs per
architecture: Mixtral's `rms_norm_eps` is 1e-5, Qwen's 1e-6, OLMoE's `norm_topk_prob` is False).
A value moekit cannot reproduce exactly (an o_proj bias, `clip_qkv`, a non-SiLU activation)
raises `ConfigError` naming the field and value instead of loading a silently different model.

Architectures plug in through `register_architecture`; this module's own (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, Llama, Mistral, Qwen2) register from `moekit.checkpoint.hf_family`, DeepSeek,
Llama 4 and gpt-oss from their own modules, all imported lazily by `get_architecture`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moekit.config import ConfigError, ModelConfig, MoEConfig

# ----------------------------------------------------------------------------------- registry
ConfigFn = Callable[[dict, str], ModelConfig]
PlanFn = Callable[..., dict]
"""plan_fn(cfg, hf: dict, keys: set[str] | None) -> `hf_pieces.Plan` ({moekit_key: [Piece]}).
`keys` are the tensor names present in the checkpoint (None when exporting): a plan may pick
between layouts (per-expert vs fused experts) from them."""
ExportConfigFn = Callable[[ModelConfig], dict]
"""export_config_fn(cfg) -> the HF config.json dict (raise ConfigError if cfg does not fit)."""


@dataclass(frozen=True)
class HFArchitecture:
    name: str
    """The `architectures[0]` entry, e.g. "MixtralForCausalLM"."""
    model_type: str
    config_fn: ConfigFn
    plan_fn: PlanFn
    export_config_fn: ExportConfigFn | None = None
    ignore_fn: Callable[[str], bool] | None = None
    """Checkpoint tensors to skip silently (e.g. DeepSeek's MTP layer, old rotary caches)."""
    build_fn: Callable[..., Any] | None = None
    """build_fn(cfg, hf: dict, keys: set[str]) -> the meta-device model to load into (default: a
    plain `Transformer`); gpt-oss swaps in MXFP4 experts when the checkpoint stores them so."""


_REGISTRY: dict[str, HFArchitecture] = {}
_PLUGINS = ("moekit.checkpoint.hf_family", "moekit.checkpoint.hf_deepseek", "moekit.checkpoint.hf_llama4",
            "moekit.checkpoint.hf_gpt_oss")


def register_architecture(name: str, model_type: str, config_fn: ConfigFn, plan_fn: PlanFn,
                          export_config_fn: ExportConfigFn | None = None,
                          ignore_fn: Callable[[str], bool] | None = None,
                          build_fn: Callable[..., Any] | None = None) -> HFArchitecture:
    """Register an HF architecture (call at import time of the module that implements it)."""
    arch = HFArchitecture(name, model_type, config_fn, plan_fn, export_config_fn, ignore_fn, build_fn)
    _REGISTRY[name] = arch
    return arch


def _load_plugins() -> None:
    for mod in _PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the plugin exists but one of its imports is broken: say so
                raise


def architectures() -> dict[str, HFArchitecture]:
    _load_plugins()
    return dict(_REGISTRY)


def get_architecture(d: dict, source: str = "") -> HFArchitecture:
    """The registered architecture for an HF config dict (by `architectures[0]`, else `model_type`)."""
    regs = architectures()
    names = d.get("architectures") or []
    where = f"{source}: " if source else ""
    for n in names:
        if n in regs:
            return regs[n]
    if not names:
        by_type = [a for a in regs.values() if a.model_type == d.get("model_type")]
        if by_type:
            return by_type[0]
    raise ConfigError(f"{where}config field `architectures`: unsupported value {names or d.get('model_type')!r}; "
                      f"moekit imports {', '.join(sorted(regs))}")


def config_from_hf(d: dict, source: str = "") -> ModelConfig:
    """Translate a Hugging Face config.json dict into a `ModelConfig` (raises ConfigError)."""
    arch = get_architecture(d, source)
    where = f"{source}: " if source else ""
    try:
        return arch.config_fn(d, source)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    except KeyError as e:
        raise ConfigError(f"{where}config field {e} is required by {arch.name} but missing") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}a config field has a value of the wrong type ({e})") from None


# ------------------------------------------------------------------------- field helpers
_ROPE_DEFAULT_THETA = {"mixtral": 1e6}


def get(d: dict, key: str, default: Any) -> Any:
    """A field as the HF class reads it: the file's value, or the class default when absent/null."""
    v = d.get(key)
    return default if v is None else v


def unsupported(field_name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config field `{field_name}`: value {value!r} is not supported ({why})")


def rope_from_hf(d: dict, model_type: str) -> tuple[float, dict | None]:
    """(rope_theta, moekit rope_scaling) from v5 `rope_parameters` or v4 `rope_theta`/`rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise unsupported("rope_parameters", "per-layer-type dict", "one RoPE setting for all layers is supported")
    theta = float(params.pop("rope_theta", None) or d.get("rope_theta") or _ROPE_DEFAULT_THETA.get(model_type, 1e4))
    prf = params.pop("partial_rotary_factor", d.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
        raise unsupported("partial_rotary_factor", prf, "moekit rotates the whole head")
    rt = params.get("rope_type", params.get("type", "default"))
    if rt == "default":
        return theta, None
    if rt not in ("linear", "dynamic", "llama3", "yarn"):
        raise unsupported("rope_scaling.rope_type", rt, "supported: default, linear, dynamic, llama3, yarn")
    params["rope_type"] = rt
    params.pop("type", None)
    if rt in ("dynamic", "yarn"):
        # These read the trained length; pin it so moekit's max_seq_len may differ from HF's.
        params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    return theta, params


def check_act(d: dict) -> None:
    act = get(d, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise unsupported("hidden_act", act, "moekit's HF import supports SiLU-gated (SwiGLU) FFNs")


def sliding_window_len(d: dict, default_window: int | None, needs_flag: bool) -> int | None:
    """The attention window that actually applies in HF's forward, or None for full attention."""
    w = d.get("sliding_window", default_window) if "sliding_window" in d else default_window
    if needs_flag and not d.get("use_sliding_window", False):
        return None
    types = d.get("layer_types")
    if types is not None and "sliding_attention" not in types:
        return None
    return int(w) if w else None


def base_kwargs(d: dict, model_type: str, *, eps: float, max_pos: int, window: int | None,
                attn_bias: bool, source: str) -> dict[str, Any]:
    """ModelConfig kwargs shared by the Llama-family architectures."""
    # Plan: 1. shapes; 2. RoPE; 3. sliding window -> cap max_seq_len (exact up to the window).
    check_act(d)
    dim, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or None
    theta, scaling = rope_from_hf(d, model_type)
    max_len = int(get(d, "max_position_embeddings", max_pos))
    if window is not None and window < max_len:
        # Below the window, sliding and full attention are the same math; moekit has no sliding
        # window, so the model is limited to the window (KV caches default to max_seq_len).
        warnings.warn(f"{source or model_type}: sliding_window={window} < max_position_embeddings={max_len}; "
                      f"moekit caps max_seq_len at {window} where its full attention is exact", stacklevel=3)
        max_len = window
    return dict(
        name=d.get("_name_or_path") or model_type, vocab_size=int(d["vocab_size"]), dim=dim,
        n_layers=int(d["num_hidden_layers"]), n_heads=heads,
        n_kv_heads=int(get(d, "num_key_value_heads", heads)),
        head_dim=int(head_dim) if head_dim and int(head_dim) != dim // heads else None,
        ffn_dim=int(d.get("intermediate_size") or 1), max_seq_len=max_len,
        norm_eps=float(get(d, "rms_norm_eps", eps)), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=bool(get(d, "tie_word_embeddings", False)), attn_bias=attn_bias,
        source=f"{source} ({(d.get('architectures') or [model_type])[0]})" if source else model_type,
    )


def no_o_bias(d: dict) -> None:
    if d.get("attention_bias"):
        raise unsupported("attention_bias", True, "it adds an o_proj bias that moekit's attention does not have")


# ---------------------------------------------------------------------- architectures
def llama_config(d: dict, source: str = "") -> ModelConfig:
    """Llama (also Mistral's math): dense SwiGLU, optional bias-free attention."""
    mt = d.get("model_type", "llama")
    no_o_bias(d)
    if d.get("mlp_bias"):
        raise unsupported("mlp_bias", True, "moekit's FFN has no biases")
    window = sliding_window_len(d, 4096 if mt == "mistral" else None, needs_flag=False)
    return ModelConfig(**base_kwargs(d, mt, eps=1e-6, max_pos=131072 if mt == "mistral" else 2048, window=window,
                                     attn_bias=False, source=source))


def qwen2_config(d: dict, source: str = "") -> ModelConfig:
    """Qwen2: dense SwiGLU, q/k/v bias always on."""
    window = sliding_window_len(d, 4096, needs_flag=True)
    return ModelConfig(**base_kwargs(d, "qwen2", eps=1e-6, max_pos=32768, window=window, attn_bias=True,
                                     source=source))


def mixtral_config(d: dict, source: str = "") -> ModelConfig:
    """Mixtral: top-k of the router logits then softmax over k, SwiGLU experts, every layer MoE."""
    kw = base_kwargs(d, "mixtral", eps=1e-5, max_pos=131072, window=sliding_window_len(d, None, False),
                     attn_bias=False, source=source)
    E = int(get(d, "num_local_experts", get(d, "num_experts", 8)))
    moe = MoEConfig(num_experts=E, top_k=int(get(d, "num_experts_per_tok", 2)), expert_dim=kw["ffn_dim"],
                    router="topk_softmax", jitter_eps=float(get(d, "router_jitter_noise", 0.0)),
                    aux_loss_coef=float(get(d, "router_aux_loss_coef", 0.001)))
    return ModelConfig(**kw, moe=moe)


def _qwen_moe(d: dict, source: str, model_type: str, *, shared: bool) -> ModelConfig:
    # Plan: 1. attention (Qwen2-MoE: qkv bias; Qwen3-MoE: per-head q/k norm, no bias);
    # 2. experts, softmax-top-k router with the file's norm_topk_prob; 3. which layers are sparse.
    if model_type == "qwen3_moe":
        no_o_bias(d)
    attn_bias = bool(get(d, "qkv_bias", True)) if model_type == "qwen2_moe" else False
    kw = base_kwargs(d, model_type, eps=1e-6, max_pos=32768, window=sliding_window_len(d, 4096, True),
                     attn_bias=attn_bias, source=source)
    E = int(get(d, "num_experts", get(d, "num_local_experts", 60 if shared else 128)))
    step = int(get(d, "decoder_sparse_step", 1))
    dense = sorted(int(i) for i in (d.get("mlp_only_layers") or []))
    shared_dim = int(get(d, "shared_expert_intermediate_size", 5632)) if shared else 0
    moe = None
    if E > 0:
        moe = MoEConfig(num_experts=E, top_k=int(get(d, "num_experts_per_tok", 4 if shared else 8)),
                        expert_dim=int(get(d, "moe_intermediate_size", 1408 if shared else 768)),
                        router="softmax_topk", norm_topk_prob=bool(get(d, "norm_topk_prob", False)),
                        num_shared_experts=1 if shared_dim else 0, shared_expert_dim=shared_dim,
                        shared_expert_gate=bool(shared_dim),
                        aux_loss_coef=float(get(d, "router_aux_loss_coef", 0.001)))
    return ModelConfig(**kw, qk_norm=model_type == "qwen3_moe", moe=moe, moe_every=step, dense_layers=dense)


def qwen2_moe_config(d: dict, source: str = "") -> ModelConfig:
    """Qwen2-MoE: softmax top-k, norm_topk_prob, sigmoid-gated shared expert, sparse step / dense layers."""
    return _qwen_moe(d, source, "qwen2_moe", shared=True)


def qwen3_moe_config(d: dict, source: str = "") -> ModelConfig:
    """Qwen3-MoE: per-head q/k RMSNorm, softmax top-k, norm_topk_prob, sparse step / dense layers."""
    return _qwen_moe(d, source, "qwen3_moe", shared=False)


def olmoe_config(d: dict, source: str = "") -> ModelConfig:
    """OLMoE: q/k RMSNorm over the full projections, softmax top-k (norm_topk_prob default False)."""
    no_o_bias(d)
    if d.get("clip_qkv") is not None:
        raise unsupported("clip_qkv", d["clip_qkv"], "moekit does not clamp q/k/v")
    kw = base_kwargs(d, "olmoe", eps=1e-5, max_pos=4096, window=None, attn_bias=False, source=source)
    # OLMoE's attention ignores `head_dim` in the file: it is always hidden_size // heads.
    kw["head_dim"] = None
    moe = MoEConfig(num_experts=int(get(d, "num_experts", 64)), top_k=int(get(d, "num_experts_per_tok", 8)),
                    expert_dim=kw["ffn_dim"], router="softmax_topk",
                    norm_topk_prob=bool(get(d, "norm_topk_prob", False)),
                    aux_loss_coef=float(get(d, "router_aux_loss_coef", 0.01)))
    return ModelConfig(**kw, qk_norm=True, qk_norm_full=True, moe=moe)
