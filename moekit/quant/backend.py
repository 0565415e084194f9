"""The `cpu-quant` expert backend: quantized experts at decode sizes in one compiled-kernel call.

Registered with moekit.moe.backends (imported by moekit.quant, so it exists whenever a quantized
model does) ahead of the generic `torch` backend, whose per-expert path dequantizes every expert it
runs to float on each call. Here the experts' int8 / int4 / MXFP4 codes are decoded in registers and
multiplied with int8-quantized activations (moekit.kernels.quant), grouping, both projections, the
activation and the weighted combine in one call, on every CPU tier the kernels build for (integer
dot products: vpdpbusd on the AVX-512 tiers, vpmaddubsw on AVX2).

It applies to local, dropless, no-grad CPU calls of up to `kernels.quant.MAX_ROWS` tokens (decode
and prefill chunks) on bias-free experts with a kernel activation and a scheme the kernel decodes
(not q4_k). Above that size the `torch` backend runs (oneDNN's GEMM on dequantized weights, or
torch's int4 matmul after `pack_int4`): there the dequantization's fixed cost is the smaller one.
"""

from __future__ import annotations

import torch

from moekit import kernels
from moekit.kernels import quant as kq
from moekit.moe import backends
from moekit.quant.modules import QuantizedExperts


def kernel_code(ex: QuantizedExperts) -> int | None:
    """The kernel's scheme code for these experts, or None when the kernel cannot run them."""
    if getattr(ex, "b13", None) is not None or getattr(ex, "b2", None) is not None or ex.act not in kernels.ACTS:
        return None
    if ex.qw13.q.device.type != "cpu":
        return None
    return kq.scheme_code(ex.scheme, ex.qw13.zero_point, ex.qw13.group_size)


def _parts(qt, lo: int | None = None) -> tuple:
    bufs = (qt.q, qt.scale, qt.zero)
    if lo is None:
        return bufs
    return tuple(None if b is None else b[lo:lo + 1] for b in bufs)


def run_experts(ex: QuantizedExperts, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor,
                topk_weights_TK: torch.Tensor) -> torch.Tensor:
    """float32 [T, D]: the top-k block of `ex` in the kernel (`kernel_code(ex)` must not be None)."""
    code = kernel_code(ex)
    return kq.moe_experts_topk_q(x_TD, topk_ids_TK, topk_weights_TK, _parts(ex.qw13), _parts(ex.qw2), code,
                                 ex.qw13.group_size, ex.act)


def run_one(ex: QuantizedExperts, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    """Expert e of `ex` on x's rows through the same kernel (offloaded experts computing on a cache
    slot use this, so their outputs match the resident layer's), in x's dtype."""
    N = x_ND.shape[0]
    ids = torch.zeros(N, 1, dtype=torch.int64)
    one = torch.ones(N, 1)
    y = kq.moe_experts_topk_q(x_ND, ids, one, _parts(ex.qw13, e), _parts(ex.qw2, e), kernel_code(ex),
                              ex.qw13.group_size, ex.act)
    return y.to(x_ND.dtype)


def kernel_applies(ex: QuantizedExperts, x: torch.Tensor) -> str | None:
    """None when the kernel can run `ex` on these rows now, else why not."""
    if not x.is_cpu:
        return "tokens are not on the CPU"
    if kernel_code(ex) is None:
        return (f"the kernel does not decode these experts (scheme {ex.scheme}, group {ex.qw13.group_size}, "
                f"act {ex.act}, biases {ex.b13 is not None})")
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"tokens are {x.dtype} (the kernel takes float32 or bfloat16)"
    rows = x.shape[0]
    if not 0 < rows <= kq.MAX_ROWS:
        return f"{rows} tokens: the quantized kernel runs 1..{kq.MAX_ROWS}; larger batches use `torch`"
    if torch.is_grad_enabled() and x.requires_grad:
        return "autograd is recording (inference-only backend)"
    if not kernels.available():
        return "the compiled CPU kernels are not available here"
    return None


class CpuQuantBackend(backends.ExpertBackend):
    name = "cpu-quant"
    uses_kernels = True

    def why_not(self, call):
        return (backends.local_cpu_inference(call, QuantizedExperts) or backends.dropless_output_weights(call)
                or kernel_applies(call.experts, call.x_TD))

    def run(self, call):
        out = run_experts(call.experts, call.x_TD, call.topk_ids_TK, call.topk_weights_TK)
        return out.to(call.x_TD.dtype), torch.zeros((), dtype=torch.int64)


backends.register(CpuQuantBackend(), 350)
