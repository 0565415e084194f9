"""GGUF export (llama.cpp's format) for Mixtral-layout (`llama` arch) and Qwen3-MoE-layout
(`qwen3moe` arch) models, dense Llama included, written with the `gguf` package.

Shape legend: D model dim, F FFN / expert width, E experts, H q heads, G kv heads, Dh head dim.

Matrices are written as BF16 (or F32 when the model is float32), norms and router weights as F32
like llama.cpp's own converter. For the `llama` arch, q/k rows are permuted into llama.cpp's
interleaved-pair RoPE order (moekit, like transformers, rotates halves); `qwen3moe` uses NEOX
RoPE, so its rows stay as they are. moekit models carry no SentencePiece vocab, so a placeholder
vocab of the right size is embedded (llama.cpp needs one to load; generation runs on token ids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.checkpoint.native import CheckpointError, atomic_write
from moekit.config import ModelConfig


def _permute(w_RC: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp interleaved pairs (inverse of gguf.unpermute_rope)."""
    rows = w_RC.shape[0]
    return w_RC.reshape(n_heads, 2, rows // n_heads // 2, *w_RC.shape[1:]).swapaxes(1, 2).reshape(w_RC.shape)


def gguf_arch(cfg: ModelConfig) -> str:
    """`llama` (Mixtral layout / dense Llama) or `qwen3moe`; CheckpointError naming what blocks it."""
    def no(why: str, fix: str = "export with `moekit convert --to hf` instead") -> CheckpointError:
        return CheckpointError(f"GGUF export supports Mixtral- and Qwen3-MoE-layout models; this one {why}; {fix}")

    if cfg.attention != "gqa":
        raise no(f"uses {cfg.attention!r} attention")
    if cfg.attn_bias:
        raise no("has attention biases")
    if cfg.rope_scaling:
        raise no(f"uses rope_scaling {cfg.rope_scaling}")
    if cfg.no_rope_layers or cfg.attention_chunk_size:
        raise no("has NoPE / chunked-attention layers (Llama 4)")
    if cfg.qk_norm and cfg.qk_norm_full:
        raise no("normalises the whole q/k projection (OLMoE)")
    m = cfg.moe
    if cfg.moe_layer_experts:
        raise no("has a different expert count per layer (pruned with --per-layer-budget); GGUF has one "
                 "expert_count", "prune with the same count in every layer to export")
    if m is not None:
        if any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers)):
            raise no("mixes dense and MoE layers")
        if m.num_shared_experts:
            raise no("has shared experts")
        if m.hyper_dim:
            raise no("has a HyperMoE hypernetwork (moe.hyper_dim > 0)", "keep it in moekit's native format")
        if m.expert_act != "swiglu" or m.weight_on_input or m.routed_scaling_factor != 1.0 or m.n_group > 1:
            raise no("uses a non-Mixtral expert or routing variant")
        if m.router == "softmax_topk" and not m.norm_topk_prob:
            raise no("keeps un-renormalised top-k softmax weights")
        if m.router not in ("topk_softmax", "softmax_topk") or m.router_bias or m.score_correction_bias \
                or m.capacity_factor is not None:
            raise no(f"uses router {m.router!r} with biases or capacity drops")
    return "qwen3moe" if cfg.qk_norm else "llama"


def _tensors(model, arch: str, mat_dtype: torch.dtype):
    """Yield (gguf name, torch tensor) in llama.cpp layout."""
    cfg = model.config
    sd = model.state_dict()
    H, G, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    f32 = torch.float32

    yield "token_embd.weight", sd["embed.weight"].to(mat_dtype)
    yield "output_norm.weight", sd["norm.weight"].to(f32)
    if not cfg.tie_embeddings:
        yield "output.weight", sd["lm_head.weight"].to(mat_dtype)
    for i in range(cfg.n_layers):
        b, L = f"blk.{i}.", f"layers.{i}."
        yield b + "attn_norm.weight", sd[L + "attn_norm.weight"].to(f32)
        yield b + "ffn_norm.weight", sd[L + "ffn_norm.weight"].to(f32)
        q, k, v = sd[L + "attn.wqkv.weight"].split([H * hd, G * hd, G * hd])
        if arch == "llama":
            q, k = _permute(q, H), _permute(k, G)
        yield b + "attn_q.weight", q.to(mat_dtype)
        yield b + "attn_k.weight", k.to(mat_dtype)
        yield b + "attn_v.weight", v.to(mat_dtype)
        yield b + "attn_output.weight", sd[L + "attn.wo.weight"].to(mat_dtype)
        if arch == "qwen3moe":
            yield b + "attn_q_norm.weight", sd[L + "attn.q_norm.weight"].to(f32)
            yield b + "attn_k_norm.weight", sd[L + "attn.k_norm.weight"].to(f32)
        if cfg.moe is not None:
            F_ = cfg.moe.expert_dim
            w13 = sd[L + "ffn.experts.w13"]
            yield b + "ffn_gate_inp.weight", sd[L + "ffn.router.weight"].to(f32)
            yield b + "ffn_gate_exps.weight", w13[:, :F_].to(mat_dtype)
            yield b + "ffn_up_exps.weight", w13[:, F_:].to(mat_dtype)
            yield b + "ffn_down_exps.weight", sd[L + "ffn.experts.w2"].to(mat_dtype)
        else:
            w13 = sd[L + "ffn.w13.weight"]
            yield b + "ffn_gate.weight", w13[:cfg.ffn_dim].to(mat_dtype)
            yield b + "ffn_up.weight", w13[cfg.ffn_dim:].to(mat_dtype)
            yield b + "ffn_down.weight", sd[L + "ffn.w2.weight"].to(mat_dtype)


def _placeholder_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A valid SentencePiece-style vocab of n tokens: <unk>, <s>, </s>, 256 byte tokens, then names."""
    from moekit.checkpoint.gguf import require_gguf

    gguf = require_gguf()

    T = gguf.TokenType
    tokens, types = ["<unk>", "<s>", "</s>"], [T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types += [T.BYTE] * 256
    tokens, types = tokens[:n], types[:n]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]
    types += [T.NORMAL] * (n - len(types))
    return tokens, [0.0] * n, [int(t) for t in types]


def new_writer(gguf, tmp, cfg, arch: str, name: str | None, file_type):
    """A GGUFWriter with the model's header and the placeholder vocabulary written: the part every
    GGUF export of a moekit model shares (plain weights here, quantized ones in moekit.quant)."""
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or cfg.name or "moekit-model")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim if cfg.moe is None else cfg.moe.expert_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_key_length(cfg.hd)
    w.add_value_length(cfg.hd)
    w.add_rope_dimension_count(cfg.hd)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    if cfg.moe is not None:
        w.add_expert_count(cfg.moe.num_experts)
        w.add_expert_used_count(cfg.moe.top_k)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe.expert_dim)
    tokens, scores, types = _placeholder_vocab(cfg.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    return w


def export_gguf(model, out: str | Path, name: str | None = None) -> Path:
    """Write `model` as one .gguf file (`out` is the file, or a directory to hold `model.gguf`)."""
    # Plan: 1. check the layout and pick the arch; 2. hyperparameters + placeholder vocab as KV
    # metadata; 3. tensors in llama.cpp names/layout; 4. write to a temp file, rename (atomic).
    from moekit.checkpoint.gguf import require_gguf

    gguf = require_gguf()  # a clear error naming the extra, before any work
    if getattr(model, "quant_config", None) is not None:  # quantized weights go out as GGML blocks, not floats
        from moekit.quant.gguf_export import export_quantized_gguf

        return export_quantized_gguf(model, out, name)

    cfg = model.config
    arch = gguf_arch(cfg)
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    mat_dtype = torch.float32 if model.dtype == torch.float32 else torch.bfloat16

    def write(tmp: Path) -> None:
        w = new_writer(gguf, tmp, cfg, arch, name,
                       gguf.LlamaFileType.ALL_F32 if mat_dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_BF16)
        for tname, t in _tensors(model, arch, mat_dtype):
            t = t.detach().contiguous().cpu()
            if t.dtype == torch.bfloat16:
                w.add_tensor(tname, t.view(torch.int16).numpy().view(np.uint16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(tname, t.float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()

    atomic_write(path, write)
    return path


__all__ = ["export_gguf", "gguf_arch"]
