"""GGUF export of quantized models: moekit's codes and scales written as GGML blocks, not re-quantized.

Shape legend: E experts, F expert hidden dim, D model dim, R rows, B bytes per row.

The formats line up block for block at group size 32: int8 is Q8_0 (float16 scale + 32 int8 codes),
symmetric int4 is Q4_0 (float16 scale + 16 bytes of nibbles holding code + 8, element j low and
j + 16 high, which is moekit's own nibble order), mxfp4 is GGML's MXFP4 (one E8M0 byte + the
same 16 nibble bytes; GGML stores twice the E2M1 value with half the scale, the same product) and
q4_k is GGML's Q4_K (moekit keeps its d/dmin, 12 scale bytes and 128 code bytes as they are).
So export is a byte shuffle and round-trips exactly. Everything that is not quantized goes out as
`moekit.checkpoint.gguf_export` writes it (the same names, layout and metadata).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.checkpoint.gguf_export import _permute, gguf_arch, new_writer
from moekit.checkpoint.native import atomic_write
from moekit.quant import kquants
from moekit.quant.config import QuantError
from moekit.quant.modules import QuantizedDenseFFN, QuantizedExperts, QuantizedLinear, QuantizedTensor


def ggml_type(q: QuantizedTensor):
    import gguf

    T = gguf.GGMLQuantizationType
    if q.group_size != 32:
        raise QuantError(f"GGUF blocks hold 32 elements; re-quantize with --group-size 32 (got {q.group_size})")
    if q.scheme == "int8":
        return T.Q8_0
    if q.scheme == "int4" and not q.zero_point:
        return T.Q4_0
    if q.scheme == "mxfp4":
        return T.MXFP4
    if q.scheme == "q4_k":
        return T.Q4_K
    raise QuantError("int4 with zero points has no exact GGUF block type; quantize with --no-zero-point (Q4_0)")


def ggml_blocks(q: QuantizedTensor, rows: slice | None = None, index: int | None = None) -> np.ndarray:
    """uint8 [..., R, B]: the GGML blocks of q (matrix `index` of a stack, rows `rows`)."""
    if q.scheme == "q4_k":  # three buffers that are already GGML's block fields
        codes, scale, sub = (q.q, q.scale, q.sub) if index is None else (q.q[index], q.scale[index], q.sub[index])
        if rows is not None:  # codes [..., O, I/2]; scale, sub [..., O, NS, *]
            codes, scale, sub = codes[..., rows, :], scale[..., rows, :, :], sub[..., rows, :, :]
        blocks = kquants.to_blocks(codes, scale, sub)
        return blocks.reshape(*blocks.shape[:-2], -1).contiguous().numpy()
    codes, scale = q.q, q.scale
    if index is not None:
        codes, scale = codes[index], scale[index]
    if rows is not None:
        codes, scale = codes[..., rows, :], scale[..., rows, :]
    lead = codes.shape[:-1]
    nb = scale.shape[-1]
    qs = codes.reshape(*lead, nb, -1).view(torch.uint8)  # 32 int8 codes or 16 nibble bytes per block
    if q.scheme == "mxfp4":
        head = scale.unsqueeze(-1)  # E8M0 byte
    else:
        head = scale.contiguous().view(torch.uint8).reshape(*lead, nb, 2)  # float16, little endian
    return torch.cat([head, qs], -1).reshape(*lead, -1).contiguous().numpy()


def _qtensors(model, arch: str, mat_dtype: torch.dtype):
    """Yield (gguf name, float tensor or (uint8 blocks, ggml type))."""
    cfg = model.config
    H, G, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    f32 = torch.float32

    def lin(mod, rows: slice | None = None, permute: int | None = None):
        if isinstance(mod, QuantizedLinear):
            w = mod.qweight
            blocks = ggml_blocks(w, rows)
            if permute:
                blocks = _permute(torch.from_numpy(blocks), permute).numpy()
            return blocks, ggml_type(w)
        w = mod.weight if rows is None else mod.weight[rows]
        return (_permute(w, permute) if permute else w).to(mat_dtype)

    yield "token_embd.weight", model.embed.weight.to(mat_dtype)
    yield "output_norm.weight", model.norm.weight.to(f32)
    if not cfg.tie_embeddings:
        yield "output.weight", lin(model.lm_head)
    for i, blk in enumerate(model.layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", blk.attn_norm.weight.to(f32)
        yield b + "ffn_norm.weight", blk.ffn_norm.weight.to(f32)
        wqkv = blk.attn.wqkv
        q_r, k_r, v_r = slice(0, H * hd), slice(H * hd, (H + G) * hd), slice((H + G) * hd, (H + 2 * G) * hd)
        llama = arch == "llama"
        yield b + "attn_q.weight", lin(wqkv, q_r, H if llama else None)
        yield b + "attn_k.weight", lin(wqkv, k_r, G if llama else None)
        yield b + "attn_v.weight", lin(wqkv, v_r)
        yield b + "attn_output.weight", lin(blk.attn.wo)
        if arch == "qwen3moe":
            yield b + "attn_q_norm.weight", blk.attn.q_norm.weight.to(f32)
            yield b + "attn_k_norm.weight", blk.attn.k_norm.weight.to(f32)
        if blk.is_moe:
            ex, F_ = blk.ffn.experts, cfg.moe.expert_dim
            yield b + "ffn_gate_inp.weight", blk.ffn.router.weight.to(f32)
            if isinstance(ex, QuantizedExperts):
                t = ggml_type(ex.qw13)
                yield b + "ffn_gate_exps.weight", (ggml_blocks(ex.qw13, slice(0, F_)), t)
                yield b + "ffn_up_exps.weight", (ggml_blocks(ex.qw13, slice(F_, 2 * F_)), t)
                yield b + "ffn_down_exps.weight", (ggml_blocks(ex.qw2), t)
            else:
                yield b + "ffn_gate_exps.weight", ex.w13[:, :F_].to(mat_dtype)
                yield b + "ffn_up_exps.weight", ex.w13[:, F_:].to(mat_dtype)
                yield b + "ffn_down_exps.weight", ex.w2.to(mat_dtype)
        else:
            ffn = blk.ffn
            gate, up = slice(0, cfg.ffn_dim), slice(cfg.ffn_dim, 2 * cfg.ffn_dim)
            yield b + "ffn_gate.weight", lin(ffn.w13, gate)
            yield b + "ffn_up.weight", lin(ffn.w13, up)
            yield b + "ffn_down.weight", lin(ffn.w2)


def export_quantized_gguf(model, out: str | Path, name: str | None = None) -> Path:
    """Write a model quantized by moekit.quant (Mixtral / Qwen3-MoE layout) as one .gguf file."""
    # Plan: 1. layout check (the float exporter's rules); 2. metadata; 3. tensors, quantized ones as
    # raw GGML blocks; 4. temp file + rename.
    import gguf

    cfg = model.config
    arch = gguf_arch(cfg)
    if any(isinstance(m, QuantizedDenseFFN) for m in model.modules()) and cfg.moe is not None:
        raise QuantError("GGUF export: shared experts are not part of the Mixtral / Qwen3-MoE layouts")
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / "model.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    mat_dtype = torch.float32 if model.dtype == torch.float32 else torch.bfloat16
    ftype = {"int8": gguf.LlamaFileType.MOSTLY_Q8_0, "int4": gguf.LlamaFileType.MOSTLY_Q4_0,
             "mxfp4": getattr(gguf.LlamaFileType, "MOSTLY_MXFP4_MOE", gguf.LlamaFileType.MOSTLY_Q4_0),
             "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S}

    def write(tmp) -> None:
        w = new_writer(gguf, tmp, cfg, arch, name, ftype[model.quant_config.scheme])
        for tname, t in _qtensors(model, arch, mat_dtype):
            if isinstance(t, tuple):
                w.add_tensor(tname, t[0], raw_dtype=t[1])
            elif t.dtype == torch.bfloat16:
                w.add_tensor(tname, t.detach().contiguous().view(torch.int16).numpy().view(np.uint16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(tname, t.detach().float().contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()

    atomic_write(path, write)
    return path
