"""Compiled CPU kernels on low-bit weights (quant_cpu.cpp): the Python side.

Shape legend: T tokens, K experts per token, D model dim, F expert hidden dim, H = 2F (gated) or F,
E experts, M rows, N output rows of a linear, R rows of activations, B = I / 32 blocks.

The weights stay in moekit.quant's storage (codes, float16 or E8M0 scales, zero points); the
activations are quantized to int8 per block of 32 inside the kernel (`quantize_rows_q8` shows how)
and every block's dot product is an integer one, as llama.cpp's Q8_0 / Q4_0 dot products are.
That activation rounding is the only numerical difference from dequantize-then-matmul: at most half
a step (1/254) of a block's largest value per element; on the tests' random experts the block's
output moves by up to ~1.5% of its norm (bounded at 3% there), and on a trained model it is measured
as part of the quantized model's quality (docs/quantization.md, "Compute").

These functions take plain tensors (no moekit.quant import: quant depends on kernels, not the
other way round); `scheme_code` maps a scheme name to the kernel's code.
"""

from __future__ import annotations

import torch

from moekit import kernels

SCHEME_CODES = {"int8": 0, "int4": 1, "int4-zp": 2, "mxfp4": 3}
"""Schemes the kernels decode, by the name `scheme_code` returns for a quantized tensor."""

MAX_ROWS = 256
"""Tokens per call up to which the quantized expert block runs in the kernel; above, the `torch`
backend's per-expert path (every expert with rows dequantized, then oneDNN's GEMM; or torch's int4
matmul after `pack_int4`). The kernel's cost grows with the rows, the dequantization's with the
weights, so the crossover is a row count. Measured on one tiny-Mixtral layer (8 experts of
1024 x 2816, top-2, bf16 tokens, 2 threads, AMD EPYC Zen 4; `python benchmarks/quant_crossover.py`,
benchmarks/results/quant_crossover.md): int8 kernel 15.9 vs 49.7 ms at 64 tokens, a tie at 256
(65.9 vs 63.3), behind at 512 (161.6 vs 110.5); int4 ahead to 256 (57.9 vs 89.0), a tie at 512;
against torch's int4 matmul, within the noise from 128 to 512."""

MAX_LINEAR_ROWS = 16
"""Rows up to which a quantized linear (attention, dense FFN, head) runs in the kernel. A small
matrix dequantizes quickly: 1536 x 1024 int8, kernel 0.45 vs 0.60 ms at 16 rows, 0.94 vs 0.75 at
32; the 32000-row int4 head stays ahead to 128 rows (60.5 vs 109.2 ms; same benchmark)."""


def scheme_code(scheme: str, zero_point: bool, group_size: int) -> int | None:
    """The kernel's code for a storage scheme, or None when the kernels cannot decode it (q4_k's
    super-blocks; group sizes that are not a multiple of 32)."""
    if group_size % 32:
        return None
    name = "int4-zp" if scheme == "int4" and zero_point else scheme
    return SCHEME_CODES.get(name)


_NO_ZEROS = torch.empty(0, dtype=torch.uint8)
"""Passed for "no zero points" (one shared empty tensor: a decode step makes ~25 of these calls)."""


def _zero(z: torch.Tensor | None) -> torch.Tensor:
    return _NO_ZEROS if z is None else z


def moe_experts_topk_q(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                       w13: tuple, w2: tuple, code: int, group_size: int, act: str) -> torch.Tensor:
    """`kernels.moe_experts_topk` on quantized experts: w13 = (codes [E, H, D or D/2], scales,
    zeros or None), w2 the same over [E, D, F]; float32 [T, D] out. x is used in float32."""
    q13, s13, z13 = w13
    q2, s2, z2 = w2
    with kernels._traced("moekit::moe_experts_q"):
        return kernels._mod().moe_experts_topk_q(
            x_TD.float().contiguous(), topk_ids_TK.to(torch.int64).contiguous(),
            topk_weights_TK.to(torch.float32).contiguous(), q13, s13, _zero(z13), q2, s2, _zero(z2),
            int(code), int(group_size), kernels.ACTS[act])


def linear_q(x_MK: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, code: int,
             group_size: int) -> torch.Tensor:
    """x @ w.T for a quantized w (codes [N, K or K/2], scales, zeros or None), float32 [..., N]."""
    lead = x_MK.shape[:-1]
    x = x_MK if x_MK.dim() == 2 else x_MK.reshape(-1, x_MK.shape[-1])
    with kernels._traced("moekit::linear_q"):
        out = kernels._mod().linear_q(x.float().contiguous(), q, scale, _zero(zero), int(code), int(group_size))
    return out if x_MK.dim() == 2 else out.view(*lead, q.shape[0])


def quantize_rows_q8(x_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding: (int8 codes [R, K], float32 scales [R, B]); codes x scale
    is what the kernels multiply the weights with."""
    return tuple(kernels._mod().quantize_rows_q8(x_RK.float().contiguous()))


def reference_rows_q8(x_RK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rounding in torch ops (float32: scale = amax / 127, codes = round-half-even of
    x * (127 / amax)): what the tests hold the kernel to."""
    x = x_RK.float().unflatten(-1, (-1, 32))
    amax = x.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(x * inv.unsqueeze(-1)).to(torch.int8)
    return q.flatten(-2), amax / 127.0
