"""GGUF import (llama.cpp's format) for Llama-architecture models, dense or Mixtral-style MoE, and
Qwen3-MoE (`qwen3moe`: per-head q/k RMSNorm, NEOX RoPE so no row permutation).

Shape legend: D model dim, F FFN width, E experts, H q heads, G kv heads, Dh head dim, V vocab.

Reads hyperparameters from the GGUF metadata, dequantizes every tensor with the `gguf` package
(`gguf.quants.dequantize`: Q4_0/Q4_1/Q8_0/K-quants/F16/BF16/F32 ...), undoes llama.cpp's Q/K rotary
permutation (its converter reorders each head's rows into interleaved-pair order for ggml's RoPE;
moekit, like transformers, rotates halves) and rebuilds the embedded tokenizer as a
`tokenizers.Tokenizer` (byte-level BPE from `tokenizer.ggml.tokens` / `merges`). Tensors are
dequantized one at a time straight into a preallocated model, so peak memory stays near the final
model size; the file is memory-mapped by `gguf.GGUFReader`. Quantized weights load as float32
(or `dtype`); nothing is re-quantized. Routed experts in Q8_0 / Q4_0 / MXFP4 / Q4_K are the
exception: they stay quantized, block for block (moekit.quant.gguf_import).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.checkpoint.native import CheckpointError
from moekit.config import ConfigError, ModelConfig, MoEConfig

SUPPORTED_ARCHS = ("llama", "qwen3moe")


def require_gguf():
    """The `gguf` package, or a clear error naming the extra that installs it (it is not a base
    dependency: reading or writing .gguf files is the only thing that needs it)."""
    try:
        import gguf
    except ModuleNotFoundError as e:
        if e.name not in ("gguf", None):
            raise  # gguf is there but one of its own dependencies is not: that traceback says which
        raise CheckpointError("reading or writing GGUF files needs the gguf package, which the base install does "
                              "not include: pip install 'moekit[hf]' (or pip install gguf)") from None
    return gguf


def _reader(path: Path):
    gguf = require_gguf()

    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # truncated / not a GGUF: the reader raises ValueError, struct errors ...
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None


def _meta(r) -> dict[str, Any]:
    """All scalar / string / small-array metadata as Python values (token lists excluded)."""
    out = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[k] = f.contents()
        except Exception:  # exotic field types we do not need
            continue
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str = "") -> ModelConfig:
    """Map GGUF metadata to a `ModelConfig` (raises ConfigError naming the unsupported key)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"{source}: GGUF key `general.architecture`: value {arch!r} is not supported "
                          f"(moekit imports {', '.join(SUPPORTED_ARCHS)} GGUFs)")

    def g(key: str, default: Any = None, required: bool = False) -> Any:
        v = meta.get(f"{arch}.{key}", default)
        if required and v is None:
            raise ConfigError(f"{source}: GGUF key `{arch}.{key}` is missing")
        return v

    dim, heads = int(g("embedding_length", required=True)), int(g("attention.head_count", required=True))
    kv = int(g("attention.head_count_kv", heads))
    head_dim = int(g("attention.key_length", dim // heads))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{source}: GGUF key `{arch}.attention.value_length` differs from key_length; not supported")
    rope_dim = int(g("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConfigError(f"{source}: GGUF key `{arch}.rope.dimension_count`={rope_dim} < head dim {head_dim} "
                          "(partial rotary) is not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ConfigError(f"{source}: tensor `rope_freqs.weight` (Llama 3.1 rope frequency factors) is not supported")
    scaling = None
    st = g("rope.scaling.type", "none")
    if st == "linear":
        scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor", 1.0))}
    elif st not in ("none", None):
        raise ConfigError(f"{source}: GGUF key `{arch}.rope.scaling.type`: value {st!r} is not supported (none, linear)")
    n_vocab = int(g("vocab_size", required=True))
    E = int(g("expert_count", 0) or 0)
    moe = None
    if E:
        moe = MoEConfig(num_experts=E, top_k=int(g("expert_used_count", 2)),
                        expert_dim=int(g("expert_feed_forward_length", g("feed_forward_length"))),
                        router="topk_softmax")
    return ModelConfig(
        name=str(meta.get("general.name") or "gguf-model"), vocab_size=n_vocab, dim=dim,
        n_layers=int(g("block_count", required=True)), n_heads=heads, n_kv_heads=kv,
        head_dim=head_dim if head_dim != dim // heads else None, ffn_dim=int(g("feed_forward_length", required=True)),
        max_seq_len=int(g("context_length", 2048)), norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)), rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensor_names, moe=moe, source=source,
        qk_norm=arch == "qwen3moe",
    )


def unpermute_rope(w_RC: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` (HF rotate-half rows -> interleaved pairs) on a q/k weight."""
    rows = w_RC.shape[0]
    return w_RC.reshape(n_heads, rows // n_heads // 2, 2, *w_RC.shape[1:]).swapaxes(1, 2).reshape(w_RC.shape)


def _name_map(cfg: ModelConfig) -> dict[str, tuple[str, Any]]:
    """GGUF tensor -> (moekit key, where): where is None (whole), ("rows", a, b, permute_heads) or
    ("expert_rows", a, b) for stacked [E, ...] expert tensors."""
    H, G, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    # llama.cpp permutes llama-arch q/k rows for its interleaved RoPE; qwen3moe (NEOX RoPE) keeps them
    pq, pk = (None, None) if cfg.qk_norm else (H, G)
    m: dict[str, tuple[str, Any]] = {"token_embd.weight": ("embed.weight", None), "output_norm.weight": ("norm.weight", None)}
    if not cfg.tie_embeddings:
        m["output.weight"] = ("lm_head.weight", None)
    for i in range(cfg.n_layers):
        b, L = f"blk.{i}.", f"layers.{i}."
        m[b + "attn_norm.weight"] = (L + "attn_norm.weight", None)
        m[b + "ffn_norm.weight"] = (L + "ffn_norm.weight", None)
        m[b + "attn_q.weight"] = (L + "attn.wqkv.weight", ("rows", 0, H * hd, pq))
        m[b + "attn_k.weight"] = (L + "attn.wqkv.weight", ("rows", H * hd, (H + G) * hd, pk))
        m[b + "attn_v.weight"] = (L + "attn.wqkv.weight", ("rows", (H + G) * hd, (H + 2 * G) * hd, None))
        m[b + "attn_output.weight"] = (L + "attn.wo.weight", None)
        if cfg.qk_norm:
            m[b + "attn_q_norm.weight"] = (L + "attn.q_norm.weight", None)
            m[b + "attn_k_norm.weight"] = (L + "attn.k_norm.weight", None)
        if cfg.is_moe_layer(i):
            F_ = cfg.moe.expert_dim
            m[b + "ffn_gate_inp.weight"] = (L + "ffn.router.weight", None)
            m[b + "ffn_gate_exps.weight"] = (L + "ffn.experts.w13", ("expert_rows", 0, F_))
            m[b + "ffn_up_exps.weight"] = (L + "ffn.experts.w13", ("expert_rows", F_, 2 * F_))
            m[b + "ffn_down_exps.weight"] = (L + "ffn.experts.w2", None)
        else:
            F_ = cfg.ffn_dim
            m[b + "ffn_gate.weight"] = (L + "ffn.w13.weight", ("rows", 0, F_, None))
            m[b + "ffn_up.weight"] = (L + "ffn.w13.weight", ("rows", F_, 2 * F_, None))
            m[b + "ffn_down.weight"] = (L + "ffn.w2.weight", None)
    return m


def _dequantize(t, path: Path) -> torch.Tensor:
    gguf = require_gguf()

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {t.name!r} ({t.tensor_type.name}) cannot be dequantized ({e})") from None
    # GGUF lists dims fastest-first; numpy data is already row-major in PyTorch order.
    shape = tuple(int(x) for x in reversed(t.shape))
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not arr.flags.writeable:  # F32 tensors come back as views of the read-only file mapping
        arr = arr.copy()
    if arr.size != int(np.prod(shape)):
        raise CheckpointError(f"{path}: tensor {t.name!r} holds {arr.size} values, header says {shape}; file truncated?")
    return torch.from_numpy(arr.reshape(shape))


def _quantized_experts(model, tensors: dict, path: Path, dtype: torch.dtype):
    """Swap QuantizedExperts into the meta model when the file's experts are one exact block type;
    returns their QuantConfig, or None (with a warning when quantized experts must be dequantized)."""
    from moekit.quant import gguf_import as GI

    layers = model.config.moe_layers
    scheme, types = GI.expert_scheme(tensors, layers)
    if scheme is None:
        if not all(GI.is_float_type(t) for t in types):
            import warnings

            warnings.warn(f"{path}: expert tensors of type(s) {sorted(types)} are dequantized to float; moekit keeps "
                          f"GGUF experts quantized when all ffn_*_exps share one of {', '.join(GI.GGML_SCHEMES)}",
                          stacklevel=3)
        return None
    return GI.swap_in(model, scheme, GI.attention_is_q8_0(tensors, model.config.n_layers), dtype)


def gguf_tokenizer(r, meta: dict[str, Any] | None = None):
    """Build a `tokenizers.Tokenizer` from the GGUF's embedded GPT-2-style byte-level BPE vocab."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    meta = meta if meta is not None else _meta(r)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ConfigError("the file has no embedded tokenizer (no `tokenizer.ggml.model` key); prompts must be token ids")
    if kind != "gpt2":
        raise ConfigError(f"GGUF key `tokenizer.ggml.model`: value {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = r.fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in r.fields else []
    types = r.fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in r.fields else []
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer = HF SmolLM: single digits, then GPT-2 byte-level split.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    elif pre in ("llama3", "llama-bpe"):
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pat), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ConfigError(f"GGUF key `tokenizer.ggml.pre`: value {pre!r} is not supported (smollm, gpt2, llama-bpe)")
    tok.decoder = decoders.ByteLevel()
    # Control (3) and user-defined (4) tokens are matched whole, never split by BPE.
    special = [tokens[i] for i, ty in enumerate(types) if int(ty) in (3, 4)]
    if special:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    return tok


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              quantized_experts: bool = True):
    """Load a Llama / Mixtral (`llama`) or Qwen3-MoE (`qwen3moe`) GGUF file into a moekit
    `Transformer` (with `.tokenizer` attached).

    quantized_experts: routed experts stored as Q8_0, Q4_0, MXFP4 or Q4_K (all of one type) load as
    `QuantizedExperts` holding the file's blocks (int8 / int4 / mxfp4 / q4_k, `model.quant_config`
    set), never dequantized, and then Q8_0 attention projections as int8 `QuantizedLinear`s; False,
    or any other expert type, dequantizes them to `dtype`."""
    # Plan: 1. read metadata -> ModelConfig; 2. check the tensor set against the name map;
    # 3. quantized experts: swap empty QuantizedExperts into the meta model; 4. dequantize each
    # other tensor into a preallocated state dict (un-permuting llama q/k rows), copy expert blocks
    # as they are; 5. assign into the meta-built model; 6. rebuild the tokenizer.
    from moekit.checkpoint.native import materialize_buffers
    from moekit.model.transformer import Transformer

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    r = _reader(path)
    meta = _meta(r)
    tensors = {t.name: t for t in r.tensors}
    vkey = f"{meta.get('general.architecture')}.vocab_size"
    if not meta.get(vkey) and "token_embd.weight" in tensors:  # older files: the embedding says it
        meta[vkey] = int(tensors["token_embd.weight"].shape[-1])
    try:
        cfg = config_from_gguf(meta, set(tensors), source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    names = _name_map(cfg)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor(s) {extra[:5]}; not a plain Llama GGUF?")
    with torch.device("meta"):
        model = Transformer(cfg)
    dt = dtype or torch.float32
    qcfg = _quantized_experts(model, tensors, path, dt) if quantized_experts and cfg.moe is not None else None
    sd_meta = model.state_dict()

    if qcfg is not None:
        from moekit.quant import gguf_import as GI

    def dtype_of(k: str, v: torch.Tensor) -> torch.dtype:
        if qcfg is not None and GI.is_quantized_key(k):
            return v.dtype  # codes and scales keep their storage dtypes
        return torch.float32 if k.endswith("score_bias") else dt

    out = {k: torch.empty(v.shape, dtype=dtype_of(k, v)) for k, v in sd_meta.items()}
    try:
        from tqdm import tqdm

        items = tqdm(names.items(), desc=f"loading {path.name}", unit="tensor", leave=False)
    except ImportError:  # progress is a nicety
        items = names.items()
    for gname, (key, where) in items:
        if qcfg is not None and key.endswith(("ffn.experts.w13", "ffn.experts.w2")):
            prefix = key[:-len("w13")] + "qw13" if key.endswith("w13") else key[:-len("w2")] + "qw2"
            try:
                GI.copy_experts(out, prefix, qcfg.scheme, tensors[gname].data,
                                None if where is None else (where[1], where[2]), gname)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            continue
        if qcfg is not None and qcfg.attention == "int8" and key.endswith(("attn.wqkv.weight", "attn.wo.weight")):
            try:
                GI.copy_linear(out, key[:-len("weight")] + "qweight", tensors[gname].data,
                               None if where is None else (where[1], where[2]),
                               None if where is None else where[3], gname)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
            continue
        t = _dequantize(tensors[gname], path)
        dest = out[key]
        if where is None:
            view = dest
        elif where[0] == "rows":
            view = dest[where[1]:where[2]]
            if where[3] is not None and t.shape == view.shape:
                t = unpermute_rope(t, where[3])
        else:
            view = dest[:, where[1]:where[2]]
        if tuple(t.shape) != tuple(view.shape):
            raise CheckpointError(f"{path}: tensor {gname!r} has shape {tuple(t.shape)}, config expects {tuple(view.shape)}")
        view.copy_(t)
        del t
    model.load_state_dict(out, strict=True, assign=True)
    materialize_buffers(model)
    model = model.to(device).eval()
    if qcfg is not None:
        model.quant_config = qcfg
    try:
        model.tokenizer = gguf_tokenizer(r, meta)
    except ConfigError as e:
        import warnings

        warnings.warn(f"{path}: embedded tokenizer not loaded ({e})", stacklevel=2)
        model.tokenizer = None
    return model


def load_gguf_tokenizer(path: str | Path):
    """The embedded tokenizer of a GGUF file without loading its weights (None if unsupported)."""
    import warnings

    path = Path(path)
    r = _reader(path)
    try:
        return gguf_tokenizer(r)
    except (ConfigError, KeyError) as e:
        warnings.warn(f"{path}: embedded tokenizer not loaded ({e})", stacklevel=2)
        return None
