"""GGUF import of quantized routed experts without dequantizing them.

Shape legend: E experts, F expert hidden dim, D model dim, R rows of one expert's matrix, NB blocks
per row, B bytes per block.

GGML's Q8_0, Q4_0, MXFP4 and Q4_K blocks are exactly moekit's int8, int4 (symmetric), mxfp4 and
q4_k storage at group size 32 (see moekit.quant.gguf_export, which writes them): a block is a
scale header followed by its codes, and moekit keeps headers and codes in separate buffers. So the
stacked `ffn_{gate,up,down}_exps` tensors are split into those buffers one expert at a time straight
from the memory-mapped file: no float [E, F, D] tensor is ever built, and moekit -> GGUF -> moekit
gives back the same bytes. Q8_0 attention projections (moekit's `--attention int8`) are kept the
same way when the experts are. The experts then run on `QuantizedExperts` (dequantize one expert at a
time, or torch's int4 matmul after `pack_int4`).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.quant.config import QuantConfig
from moekit.quant.modules import QuantizedExperts, QuantizedLinear

GGML_SCHEMES = {"Q8_0": "int8", "Q4_0": "int4", "MXFP4": "mxfp4", "Q4_K": "q4_k"}
"""GGML block types moekit holds exactly, and the scheme that holds them."""
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_FLOAT_TYPES = ("F32", "F16", "BF16")


def expert_scheme(tensors: dict, moe_layers: list[int]) -> tuple[str | None, set[str]]:
    """(the moekit scheme every routed-expert tensor's GGML type maps to, or None; the types seen).
    None when the experts are float, mix types (llama.cpp's Q4_K_M puts some ffn_down in Q6_K) or
    use a type moekit has no exact format for."""
    types = {tensors[f"blk.{i}.{n}.weight"].tensor_type.name for i in moe_layers for n in EXPERT_TENSORS}
    if len(types) != 1:
        return None, types
    return GGML_SCHEMES.get(next(iter(types))), types


def is_float_type(name: str) -> bool:
    return name in _FLOAT_TYPES


ATTENTION_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output")


def attention_is_q8_0(tensors: dict, n_layers: int) -> bool:
    """True when every attention projection is Q8_0: moekit's `--attention int8` at group size 32."""
    return all(tensors[f"blk.{i}.{n}.weight"].tensor_type.name == "Q8_0"
               for i in range(n_layers) for n in ATTENTION_TENSORS)


def swap_in(model, scheme: str, attention_int8: bool, dtype: torch.dtype) -> QuantConfig:
    """Replace every MoE layer's experts (on the meta device) with empty `QuantizedExperts` of
    `scheme` (and the attention projections with int8 `QuantizedLinear`s computing in `dtype`);
    returns the model's quantization config (group size 32, no dense layers)."""
    for layer in model.moe_layers():
        ex = layer.experts
        layer.experts = QuantizedExperts(ex.num_experts, ex.dim, ex.hidden, ex.act, scheme, 32, device="meta")
    if attention_int8:
        for block in model.layers:
            for name in ("wqkv", "wo"):
                lin = getattr(block.attn, name)
                O, I = lin.weight.shape
                setattr(block.attn, name, QuantizedLinear(I, O, "int8", 32, dtype=dtype, device="meta"))
    return QuantConfig(scheme=scheme, group_size=32, dense=False, attention="int8" if attention_int8 else "bf16")


def is_quantized_key(key: str) -> bool:
    """State-dict keys of quantized buffers (allocated in their own dtypes, not the model's)."""
    return any(p in key for p in (".experts.qw13.", ".experts.qw2.", ".attn.wqkv.qweight.", ".attn.wo.qweight."))


def _fields(scheme: str, blocks_RNB: np.ndarray) -> dict[str, np.ndarray]:
    """Views of one expert's blocks as moekit's buffer fields (codes flattened per row later)."""
    if scheme == "int8":
        return {"scale": blocks_RNB[..., :2].view(np.float16)[..., 0], "q": blocks_RNB[..., 2:].view(np.int8)}
    if scheme == "int4":
        return {"scale": blocks_RNB[..., :2].view(np.float16)[..., 0], "q": blocks_RNB[..., 2:]}
    if scheme == "mxfp4":
        return {"scale": blocks_RNB[..., 0], "q": blocks_RNB[..., 1:]}
    return {"scale": blocks_RNB[..., :4].view(np.float16), "sub": blocks_RNB[..., 4:16], "q": blocks_RNB[..., 16:]}


BLOCK = {"int8": (32, 34), "int4": (32, 18), "mxfp4": (32, 17), "q4_k": (256, 144)}
"""(weights, bytes) of one GGML block per scheme."""


def copy_rows(out: dict[str, torch.Tensor], prefix: str, scheme: str, blocks_RX: np.ndarray, index: int | None,
              rows: tuple[int, int], permute_heads: int | None = None) -> None:
    """Copy GGML blocks uint8 [R, NB * B] into rows `rows` of the buffers `prefix`.q / .scale (/ .sub)
    of `out` (of matrix `index` of a stack). `permute_heads`: undo llama.cpp's q/k row permutation
    (rows are whole blocks, so it moves blocks, not values)."""
    a, b = rows
    n, nbytes = BLOCK[scheme]
    blocks = np.asarray(blocks_RX)
    if permute_heads is not None:
        from moekit.checkpoint.gguf import unpermute_rope

        blocks = unpermute_rope(torch.from_numpy(blocks.copy()), permute_heads).numpy()
    blocks = blocks.reshape(b - a, -1, nbytes)
    for field, src in _fields(scheme, blocks).items():
        dst = out[f"{prefix}.{field}"]
        dst = (dst if index is None else dst[index])[a:b].numpy()
        dst.reshape(src.shape)[...] = src  # dst is contiguous: the reshape is a view, the copy lands in place


def _check(data, want: tuple[int, ...], name: str) -> None:
    from moekit.checkpoint.native import CheckpointError

    if tuple(data.shape) != want:
        raise CheckpointError(f"tensor {name!r}: blocks of shape {tuple(data.shape)}, the config needs {want}")


def row_bytes(scheme: str, cols: int) -> int:
    n, nbytes = BLOCK[scheme]
    return cols // n * nbytes


def copy_experts(out: dict[str, torch.Tensor], prefix: str, scheme: str, data, rows: tuple[int, int] | None,
                 name: str) -> None:
    """Copy a GGUF expert tensor's blocks (uint8 [E, R, NB * B], memory-mapped) into the buffers
    `prefix`.q / .scale (/ .sub) of `out` at rows `rows` of each expert, one expert at a time."""
    q_all = out[prefix + ".q"]
    E, H = q_all.shape[0], q_all.shape[1]
    a, b = rows if rows is not None else (0, H)
    cols = q_all.shape[-1] if scheme == "int8" else q_all.shape[-1] * 2  # the matrix's input dim
    _check(data, (E, b - a, row_bytes(scheme, cols)), name)
    for e in range(E):
        copy_rows(out, prefix, scheme, data[e], e, (a, b))


def copy_linear(out: dict[str, torch.Tensor], prefix: str, data, rows: tuple[int, int] | None,
                permute_heads: int | None, name: str) -> None:
    """Copy a Q8_0 projection (uint8 [R, NB * 34]) into an int8 QuantizedLinear's buffers at `rows`."""
    q = out[prefix + ".q"]
    a, b = rows if rows is not None else (0, q.shape[0])
    _check(data, (b - a, row_bytes("int8", q.shape[1])), name)
    copy_rows(out, prefix, "int8", data, None, (a, b), permute_heads)
