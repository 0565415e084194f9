"""GGUF import of quantized routed experts without dequantizing them.

Shape legend: E experts, F expert hidden dim, D model dim, R rows of one expert's matrix, NB blocks
per row, B bytes per block.

GGML's Q8_0, Q4_0, MXFP4 and Q4_K blocks are exactly moekit's int8, int4 (symmetric), mxfp4 and
q4_k storage at group size 32 (see moekit.quant.gguf_export, which writes them): a block is a
scale header followed by its codes, and moekit keeps headers and codes in separate buffers. So the
stacked `ffn_{gate,up,down}_exps` tensors are split into those buffers one expert at a time straight
from the memory-mapped file: no float [E, F, D] tensor is ever built, and moekit -> GGUF -> moekit
gives back the same bytes. The experts then run on `QuantizedExperts` (dequantize one expert at a
time, or torch's int4 matmul after `pack_int4`).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.quant.config import QuantConfig
from moekit.quant.modules import QuantizedExperts

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


def swap_in(model, scheme: str) -> QuantConfig:
    """Replace every MoE layer's experts (on the meta device) with empty `QuantizedExperts` of
    `scheme`; returns the model's quantization config (experts only, group size 32)."""
    for layer in model.moe_layers():
        ex = layer.experts
        layer.experts = QuantizedExperts(ex.num_experts, ex.dim, ex.hidden, ex.act, scheme, 32, device="meta")
    return QuantConfig(scheme=scheme, group_size=32, dense=False)


def is_quantized_key(key: str) -> bool:
    """State-dict keys of the quantized expert buffers (allocated in their own dtypes, not the model's)."""
    return ".experts.qw13." in key or ".experts.qw2." in key


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


def copy_experts(out: dict[str, torch.Tensor], prefix: str, scheme: str, data, rows: tuple[int, int] | None,
                 name: str) -> None:
    """Copy a GGUF expert tensor's blocks (uint8 [E, R, NB * B], memory-mapped) into the buffers
    `prefix`.q / .scale (/ .sub) of `out` at rows `rows` of each expert, one expert at a time."""
    from moekit.checkpoint.native import CheckpointError

    q_all = out[prefix + ".q"]
    E, H = q_all.shape[0], q_all.shape[1]
    a, b = rows if rows is not None else (0, H)
    n, nbytes = BLOCK[scheme]
    cols = q_all.shape[-1] if scheme == "int8" else q_all.shape[-1] * 2  # the matrix's input dim
    want = (E, b - a, cols // n * nbytes)
    if tuple(data.shape) != want:
        raise CheckpointError(f"tensor {name!r}: blocks of shape {tuple(data.shape)}, the config needs {want}")
    for e in range(E):
        blocks = np.asarray(data[e]).reshape(b - a, cols // n, nbytes)
        for field, src in _fields(scheme, blocks).items():
            dst = out[f"{prefix}.{field}"][e, a:b].numpy()
            dst.reshape(src.shape)[...] = src  # dst is contiguous: the reshape is a view, the copy lands in place

