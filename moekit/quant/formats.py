"""Group-wise weight formats: scales, codes, nibble packing and dequantization.

Shape legend: O output rows, I input columns, G group size, N = I / G groups per row; `...` are
leading dims (experts). Every weight is quantized along its input dim (the last one, F.linear's
[out, in] layout), so one group is G consecutive inputs of one output row.

Schemes (value = code * scale):
- int8: symmetric, codes -127..127, one float16 scale per group (exactly GGUF Q8_0 at G=32).
- int4: symmetric like GGUF Q4_0, the scale is the group's largest-magnitude value / -8, so codes
  span all 16 levels -8..7; or with `zero_point`, codes 0..15 and value = (code - zero) * scale.
  Two codes per byte, in GGUF's block order (see NIBBLE_BLOCK).
- mxfp4 (OCP Microscaling v1.0): FP4 E2M1 elements (sign bit, 2 exponent bits, 1 mantissa bit:
  magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6) and one E8M0 scale 2^(e - 127) per 32 elements, with the
  spec's scale rule e = floor(log2(amax)) - 2 and round-to-nearest-even, saturating at 6.
- q4_k: GGML's Q4_K super-blocks (256 inputs, 8 sub-blocks with 6-bit scales and mins), kept in its
  own module, moekit.quant.kquants; the functions here serve the three schemes above.
Scales are rounded to their stored precision before the codes are computed, so codes and stored
scales always agree (GPTQ relies on this: it encodes values already on the grid).
"""

from __future__ import annotations

import torch

from moekit.quant import kquants
from moekit.quant.config import QuantError

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of the 8 non-negative E2M1 codes; code | 8 is the negative."""
_E2M1_MIDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E8M0_BIAS = 127


def e2m1_values(device=None) -> torch.Tensor:
    """float32 [16]: the value of every E2M1 code (codes 8..15 negative; code 8 is -0)."""
    g = torch.tensor(E2M1_GRID, device=device)
    return torch.cat([g, -g])


def check_shape(shape: tuple[int, ...], group_size: int, what: str = "weight", scheme: str | None = None) -> None:
    if len(shape) < 2:
        raise QuantError(f"{what}: expected a [..., out, in] matrix, got shape {tuple(shape)}")
    if scheme == "q4_k":
        kquants.check_shape(tuple(shape), what)
    if shape[-1] % group_size:
        ok = [g for g in (32, 64, 128) if shape[-1] % g == 0]
        fix = f"use --group-size {ok[-1]}" if ok else "leave it in float (its input dim is not a multiple of 32)"
        raise QuantError(f"{what}: input dim {shape[-1]} is not a multiple of group size {group_size}; {fix}")


# ------------------------------------------------------------------------ scales
def group_params(scheme: str, w_xG: torch.Tensor, zero_point: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero) of each group, over w's last dim. Scale is float32 holding exactly the stored
    value (float16 for int8/int4, a power of two for mxfp4); zero is float32 integers or None."""
    w = w_xG.float()
    if scheme == "int8":
        s = (w.abs().amax(-1) / 127.0).to(torch.float16).float()
        return torch.where(s == 0, torch.ones_like(s), s), None
    if scheme == "int4" and not zero_point:
        # Q4_0's rule: the signed value of largest magnitude maps to code -8 exactly.
        idx = w.abs().argmax(-1, keepdim=True)
        s = (w.gather(-1, idx).squeeze(-1) / -8.0).to(torch.float16).float()
        return torch.where(s == 0, torch.ones_like(s), s), None
    if scheme == "int4":
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        s = ((hi - lo) / 15.0).to(torch.float16).float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        return s, torch.round(-lo / s).clamp(0, 15)
    if scheme == "mxfp4":
        amax = w.abs().amax(-1)
        e = torch.floor(torch.log2(amax)) - 2.0  # E2M1's largest exponent is 2 (6 = 1.5 * 2^2)
        e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
        return torch.exp2(e), None
    raise QuantError(f"unknown scheme {scheme!r}")


def scale_to_storage(scheme: str, s: torch.Tensor) -> torch.Tensor:
    if scheme == "mxfp4":
        return (torch.log2(s).round() + E8M0_BIAS).to(torch.uint8)
    return s.to(torch.float16)


def scale_from_storage(scheme: str, s: torch.Tensor) -> torch.Tensor:
    if scheme == "mxfp4":
        return torch.exp2(s.float() - E8M0_BIAS)
    return s.float()


# ------------------------------------------------------------------------- codes
def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each value (ties to even mantissa, saturating at +-6) as uint8 0..15."""
    a = x.abs().float()
    mids = torch.tensor(_E2M1_MIDS, device=x.device)
    idx = torch.bucketize(a, mids)  # a == mids[i] lands on i: the lower neighbour
    tie = (idx < len(_E2M1_MIDS)) & (a == mids[idx.clamp(max=len(_E2M1_MIDS) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # a tie goes to the even code
    sign = (torch.signbit(x) & (idx > 0)).to(torch.uint8) << 3  # no -0 codes
    return idx.to(torch.uint8) | sign


def to_codes(scheme: str, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Codes of w given broadcastable (scale, zero): int8 for int8/int4-symmetric, uint8 otherwise."""
    x = w.float() / scale
    if scheme == "int8":
        return torch.round(x).clamp(-127, 127).to(torch.int8)
    if scheme == "int4" and zero is None:
        return torch.round(x).clamp(-8, 7).to(torch.int8)
    if scheme == "int4":
        return (torch.round(x) + zero).clamp(0, 15).to(torch.uint8)
    return e2m1_encode(x)


def from_codes(scheme: str, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """float32 values of codes (inverse of to_codes up to rounding)."""
    if scheme == "mxfp4":
        return e2m1_values(codes.device)[codes.long()] * scale
    c = codes.float()
    return (c - zero) * scale if zero is not None else c * scale


def fake_quant(scheme: str, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """w rounded onto the grid of (scale, zero), as float32."""
    return from_codes(scheme, to_codes(scheme, w, scale, zero), scale, zero)


# ----------------------------------------------------------------------- packing
NIBBLE_BLOCK = 32
"""4-bit codes are packed per block of 32 elements as GGUF Q4_0 / MXFP4 blocks are: byte j (0..15)
holds element j in its low nibble and element j + 16 in its high one. Unpacking is then two
contiguous 16-byte halves per block rather than an element-by-element interleave, and the bytes of
a block are exactly a GGUF block's `qs`."""


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., I] codes 0..15 (any integer dtype), I a multiple of 32 -> uint8 [..., I/2] (GGUF block order)."""
    if codes.shape[-1] % NIBBLE_BLOCK:
        raise QuantError(f"4-bit codes are packed in blocks of {NIBBLE_BLOCK}; got a row of {codes.shape[-1]}")
    c = (codes.to(torch.uint8) & 0xF).unflatten(-1, (-1, 2, NIBBLE_BLOCK // 2))
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I/2] -> uint8 [..., I] codes 0..15 (inverse of pack_nibbles)."""
    p = packed.unflatten(-1, (-1, NIBBLE_BLOCK // 2))
    return torch.stack([p & 0xF, p >> 4], dim=-2).flatten(-3)


def stored_codes(scheme: str, codes: torch.Tensor, zero_point: bool) -> torch.Tensor:
    """What goes into the file: int8 codes as they are, 4-bit codes packed (symmetric int4 offset by 8)."""
    if scheme == "int8":
        return codes
    if scheme == "int4" and not zero_point:
        codes = codes.to(torch.int16) + 8
    return pack_nibbles(codes)


def loaded_codes(scheme: str, q: torch.Tensor, zero_point: bool) -> torch.Tensor:
    """Inverse of stored_codes."""
    if scheme == "int8":
        return q
    c = unpack_nibbles(q)
    if scheme == "int4" and not zero_point:
        return c.to(torch.int8) - 8
    return c
