"""The `q4_k` scheme: GGML's Q4_K super-block format, quantized and dequantized in torch.

Shape legend: R rows (any leading dims flattened), I input columns, NS = I / 256 super-blocks per
row, N sub-blocks of 32 (8 per super-block), L = 32 elements of one sub-block.

A Q4_K super-block covers 256 consecutive inputs of one row: 8 sub-blocks of 32, each with a 6-bit
scale code `sc` and a 6-bit min code `m`; the super-block holds float16 `d` and `dmin`, and
value = (d * sc) * code - (dmin * m) with 4-bit codes 0..15 (4.5 bits per weight). moekit stores
exactly GGML's bytes, split into three buffers so that import and export are byte copies:
  q     uint8 [..., O, I/2]       codes, per 64 elements byte l = element l | element l + 32 << 4
  scale float16 [..., O, NS, 2]   (d, dmin)
  sub   uint8 [..., O, NS, 12]    the 8 (sc, m) pairs packed 6 bits each as GGML packs them.

Quantization follows llama.cpp's reference `quantize_row_q4_K_ref` (no importance matrix): per
sub-block, a weighted least-squares search for (scale, min) over 21 candidate grids
(`make_qkx2_quants` with rmin -1, rdelta 0.1, weights rms + |x|), then the 8 scales and mins are
themselves quantized to 6 bits against the super-block's largest ones, and the codes recomputed
from the stored values. It runs vectorised over all sub-blocks but sums the 32 terms of a
sub-block left to right in float32, as the C loop does, so the bytes match llama.cpp's
(tests/test_gguf_quant_io.py compares with the ggml library llama-cpp-python ships).
"""

from __future__ import annotations

import numpy as np
import torch

from moekit.quant.config import QuantError

QK_K = 256
SUB = 32
SCALE_BYTES = 12
BLOCK_BYTES = 2 + 2 + SCALE_BYTES + QK_K // 2  # d, dmin, scales, codes: 144 bytes per 256 weights
_NMAX = 15
_RMIN, _RDELTA, _NSTEP = -1.0, 0.1, 20
_CHUNK = 1 << 16
"""Sub-blocks processed at once (bounds the float32 temporaries to a few MB)."""


def check_shape(shape: tuple[int, ...], what: str = "weight") -> None:
    if shape[-1] % QK_K:
        raise QuantError(f"{what}: input dim {shape[-1]} is not a multiple of {QK_K} (q4_k super-blocks hold "
                         f"{QK_K} weights); use --scheme int4 (Q4_0) for this model")


# --------------------------------------------------------------------- 6-bit scales
def unpack_scales(sub_x12: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., 12] -> (sc, m) uint8 [..., 8] (GGML's get_scale_min_k4 for j = 0..7)."""
    a, b, c = sub_x12[..., 0:4], sub_x12[..., 4:8], sub_x12[..., 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], -1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], -1)
    return sc, m


def pack_scales(sc_x8: torch.Tensor, m_x8: torch.Tensor) -> torch.Tensor:
    """(sc, m) integer [..., 8] in 0..63 -> uint8 [..., 12] (inverse of unpack_scales)."""
    sc, m = sc_x8.to(torch.uint8), m_x8.to(torch.uint8)
    lo_s, hi_s, lo_m, hi_m = sc[..., :4], sc[..., 4:], m[..., :4], m[..., 4:]
    a = lo_s | ((hi_s >> 4) << 6)
    b = lo_m | ((hi_m >> 4) << 6)
    c = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([a, b, c], -1)


# --------------------------------------------------------------------- 4-bit codes
def pack_codes(codes_xI: torch.Tensor) -> torch.Tensor:
    """[..., I] codes 0..15 -> uint8 [..., I/2]: per 64 elements, byte l = element l | element l + 32 << 4."""
    c = (codes_xI.to(torch.uint8) & 0xF).unflatten(-1, (-1, 2, 32))
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2)


def unpack_codes(q_xB: torch.Tensor) -> torch.Tensor:
    """uint8 [..., I/2] -> uint8 [..., I] codes (inverse of pack_codes)."""
    p = q_xB.unflatten(-1, (-1, 32))
    return torch.stack([p & 0xF, p >> 4], dim=-2).flatten(-3)


# ----------------------------------------------------------------------- dequantize
def dequantize(q: torch.Tensor, scale: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """float32 [..., O, I] from the three buffers, with GGML's float32 operations (d * sc) * q - dmin * m."""
    sc, m = unpack_scales(sub)
    d, dmin = scale[..., 0:1].float(), scale[..., 1:2].float()
    step_xN = (d * sc.float()).flatten(-2)  # [..., O, NS * 8]
    low_xN = (dmin * m.float()).flatten(-2)
    c_xNL = unpack_codes(q).unflatten(-1, (-1, SUB)).float()
    return (c_xNL.mul_(step_xN.unsqueeze(-1)).sub_(low_xN.unsqueeze(-1))).flatten(-2)


# ------------------------------------------------------------------------- quantize
def _seqsum(t_LN: torch.Tensor) -> torch.Tensor:
    """Sum over the first dim strictly left to right in float32 (the C loop's rounding)."""
    acc = t_LN[0].clone()
    for i in range(1, t_LN.shape[0]):
        acc.add_(t_LN[i])
    return acc


def _round(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's nearest_int: round half to even (as torch.round)."""
    return torch.round(x)


def _search(x_LN: torch.Tensor, w_LN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2_quants(32, 15, x, w, rmin -1, rdelta 0.1, nstep 20) per sub-block (columns of x_LN):
    returns (scale [N], the_min [N] (>= 0, subtracted), codes [L, N] float)."""
    f32 = torch.float32
    mn, mx = x_LN.amin(0), x_LN.amax(0)
    sum_w, sum_x = _seqsum(w_LN), _seqsum(w_LN * x_LN)
    mn = torch.clamp(mn, max=0.0)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = torch.tensor(float(_NMAX), dtype=f32) / rng
    scale = 1.0 / iscale
    L = _round(iscale * (x_LN - mn)).clamp_(0, _NMAX)
    diff = scale * L + mn - x_LN
    best = _seqsum(w_LN * (diff * diff))
    for step in range(_NSTEP + 1):
        num = np.float32(_RMIN) + np.float32(_RDELTA) * np.float32(step) + np.float32(_NMAX)
        iscale = torch.tensor(float(num), dtype=f32) / (mx - mn)  # mn is the best min so far (C updates it)
        la = _round(iscale * (x_LN - mn)).clamp_(0, _NMAX)
        wl = w_LN * la
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * la), _seqsum(wl * x_LN)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        diff = this_scale * la + this_min - x_LN
        cur = _seqsum(w_LN * (diff * diff))
        take = (D > 0) & (cur < best) & ~flat
        L = torch.where(take, la, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat, torch.zeros_like(L), L)
    return scale, -mn, L


def _quantize_superblocks(x_BK: torch.Tensor) -> torch.Tensor:
    """float32 [B, 256] -> uint8 [B, 144] GGML Q4_K blocks (quantize_row_q4_K_ref)."""
    # Plan: 1. per sub-block (scale, min) search with weights rms + |x|; 2. 6-bit codes of the
    # scales and mins against the super-block maxima, float16 d / dmin; 3. codes from the stored
    # values (a sub-block whose stored scale is 0 keeps the search's codes, as in C); 4. bytes.
    B = x_BK.shape[0]
    x_LN = x_BK.reshape(B * 8, SUB).t().contiguous()  # [32, N]: one column per sub-block
    # sqrtf is correctly rounded; torch's float32 sqrt can be 1 ulp off, float64 then rounding is exact
    av = torch.sqrt((_seqsum(x_LN * x_LN) / 32.0).double()).float()
    w_LN = av + x_LN.abs()
    scales, mins, L = _search(x_LN, w_LN)  # 1.
    scales_B8, mins_B8 = scales.reshape(B, 8), mins.reshape(B, 8)
    max_scale, max_min = scales_B8.amax(1), mins_B8.amax(1)  # 2.
    # C starts both at +0 and keeps it unless a value is > 0 (so -0 mins give a +0 dmin)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    c63 = torch.tensor(63.0)
    inv_s = torch.where(max_scale > 0, c63 / max_scale, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, c63 / max_min, torch.zeros_like(max_min))
    # C: uint8_t ls = nearest_int(...) (modulo 256), then MIN(63, ls)
    ls = (_round(inv_s[:, None] * scales_B8).to(torch.int64) & 0xFF).clamp(max=63)
    lm = (_round(inv_m[:, None] * mins_B8).to(torch.int64) & 0xFF).clamp(max=63)
    d = (max_scale / c63).to(torch.float16)
    dmin = (max_min / c63).to(torch.float16)
    step = (d.float()[:, None] * ls.float()).reshape(-1)  # 3. [N]
    low = (dmin.float()[:, None] * lm.float()).reshape(-1)
    ok = step != 0
    lq = _round((x_LN + low) / torch.where(ok, step, torch.ones_like(step))).clamp_(0, _NMAX)
    L = torch.where(ok, lq, L)
    codes = L.t().reshape(B, QK_K)  # 4.
    head = torch.stack([d, dmin], -1).view(torch.uint8)  # [B, 4] little-endian float16 pair
    return torch.cat([head, pack_scales(ls, lm), pack_codes(codes)], -1)


@torch.no_grad()
def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float [..., O, I] (I a multiple of 256) -> (q, scale, sub) in moekit's q4_k buffers."""
    check_shape(tuple(w.shape))
    *lead, O, I = w.shape
    x_BK = w.detach().float().reshape(-1, QK_K)
    per = max(1, _CHUNK // 8)
    blocks = torch.cat([_quantize_superblocks(x_BK[i:i + per]) for i in range(0, x_BK.shape[0], per)])
    return from_blocks(blocks.reshape(*lead, O, I // QK_K, BLOCK_BYTES))


def from_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 [..., O, NS, 144] GGML blocks -> (q [..., O, NS*128], scale float16 [..., O, NS, 2],
    sub [..., O, NS, 12])."""
    scale = blocks[..., 0:4].contiguous().view(torch.float16)
    sub = blocks[..., 4:16].contiguous()
    q = blocks[..., 16:].flatten(-2).contiguous()
    return q, scale, sub


def to_blocks(q: torch.Tensor, scale: torch.Tensor, sub: torch.Tensor) -> torch.Tensor:
    """Inverse of from_blocks: uint8 [..., O, NS, 144]."""
    qs = q.unflatten(-1, (-1, QK_K // 2))
    return torch.cat([scale.contiguous().view(torch.uint8), sub, qs], -1)
