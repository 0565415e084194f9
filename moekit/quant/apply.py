"""Which modules a `QuantConfig` quantizes, and swapping them for quantized ones.

The same walk serves three callers: round-to-nearest quantization in memory, the empty (meta)
structure a quantized checkpoint is loaded into, and the calibrated pipeline (which quantizes the
same targets block by block). The router, norms and embeddings are never targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.quant import formats
from moekit.quant.config import QuantConfig, QuantError
from moekit.quant.modules import QuantizedDenseFFN, QuantizedExperts, QuantizedLinear


@dataclass
class Target:
    """One module to replace: `owner.<attr>` is `module`, quantized with `scheme`."""

    name: str
    owner: nn.Module
    attr: str
    module: nn.Module
    kind: str  # "experts" | "ffn" | "linear"
    scheme: str
    zero_point: bool
    layer: int | None


def block_targets(model: nn.Module, qcfg: QuantConfig, i: int) -> list[Target]:
    """Block i's targets in execution order: attention projections, shared expert / dense FFN, experts."""
    from moekit.model.attention import Attention

    block = model.layers[i]
    out: list[Target] = []
    p = f"layers.{i}."
    zp = qcfg.zero_point
    if qcfg.attention == "int8":
        if not isinstance(block.attn, Attention):
            raise QuantError(f"layer {i}: --attention int8 supports grouped-query attention only, this model uses "
                             f"{type(block.attn).__name__}; use --attention bf16")
        for a in ("wqkv", "wo"):
            out.append(Target(p + f"attn.{a}", block.attn, a, getattr(block.attn, a), "linear", "int8", False, i))
    ffn = block.ffn
    if block.is_moe:
        if qcfg.dense and ffn.shared is not None:
            out.append(Target(p + "ffn.shared", ffn, "shared", ffn.shared, "ffn", qcfg.scheme, zp, i))
        out.append(Target(p + "ffn.experts", ffn, "experts", ffn.experts, "experts", qcfg.scheme, zp, i))
    elif qcfg.dense:
        out.append(Target(p + "ffn", block, "ffn", ffn, "ffn", qcfg.scheme, zp, i))
    return out


def head_target(model: nn.Module, qcfg: QuantConfig) -> list[Target]:
    if not qcfg.lm_head or model.lm_head is None:
        return []
    return [Target("lm_head", model, "lm_head", model.lm_head, "linear", qcfg.scheme, qcfg.zero_point, None)]


def targets(model: nn.Module, qcfg: QuantConfig) -> list[Target]:
    out = [t for i in range(len(model.layers)) for t in block_targets(model, qcfg, i)]
    out += head_target(model, qcfg)
    for t in out:
        check_target(t, qcfg.group_size)
    return out


def _shapes(t: Target) -> list[tuple[int, ...]]:
    m = t.module
    if t.kind == "experts":
        return [tuple(m.w13.shape), tuple(m.w2.shape)] if isinstance(m, GroupedExperts) else [m.qw13.shape, m.qw2.shape]
    if t.kind == "ffn":
        return [tuple(m.w13.weight.shape), tuple(m.w2.weight.shape)]
    return [tuple(m.weight.shape)]


def check_target(t: Target, group_size: int) -> None:
    if t.kind == "experts" and not isinstance(t.module, (GroupedExperts, QuantizedExperts)):
        raise QuantError(f"{t.name}: unsupported experts module {type(t.module).__name__}")
    if t.kind == "ffn" and not isinstance(t.module, (DenseFFN, QuantizedDenseFFN)):
        raise QuantError(f"{t.name}: unsupported FFN module {type(t.module).__name__}")
    for shape in _shapes(t):
        formats.check_shape(shape, group_size, t.name, scheme=t.scheme)


def quantize_target(t: Target, group_size: int, q13=None, q2=None) -> nn.Module:
    """The quantized replacement of t.module (RTN unless GPTQ's tensors q13 / q2 are given)."""
    if t.kind == "experts":
        m = t.module
        return QuantizedExperts.from_tensors(m.w13, m.w2, m.act, t.scheme, group_size, t.zero_point, q13, q2, like=m)
    if t.kind == "ffn":
        return QuantizedDenseFFN.from_ffn(t.module, t.scheme, group_size, t.zero_point, q13, q2)
    return QuantizedLinear.from_linear(t.module, t.scheme, group_size, t.zero_point, q13)


def replace(t: Target, new: nn.Module) -> None:
    setattr(t.owner, t.attr, new)


@torch.no_grad()
def quantize_rtn(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Round-to-nearest quantization of every target, in place; returns the model."""
    for t in targets(model, qcfg):
        replace(t, quantize_target(t, qcfg.group_size))
    return model


def empty_structure(model: nn.Module, qcfg: QuantConfig) -> nn.Module:
    """Swap every target for an empty quantized module of the right shapes on the meta device (the
    model itself must be on meta): what a quantized checkpoint is loaded into."""
    g = qcfg.group_size
    for t in targets(model, qcfg):
        m = t.module
        if t.kind == "experts":
            new = QuantizedExperts(m.num_experts, m.dim, m.hidden, m.act, t.scheme, g, t.zero_point, device="meta",
                                   bias=getattr(m, "b13", None) is not None, alpha=getattr(m, "alpha", 1.702),
                                   limit=getattr(m, "limit", 7.0))
        elif t.kind == "ffn":
            D, Fh = m.w2.weight.shape
            new = QuantizedDenseFFN(D, Fh, m.act, t.scheme, g, t.zero_point, device="meta")
        else:
            O, I = m.weight.shape
            new = QuantizedLinear(I, O, t.scheme, g, t.zero_point, bias=m.bias is not None, device="meta")
        replace(t, new)
    return model


def set_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.compute_dtype = dtype
