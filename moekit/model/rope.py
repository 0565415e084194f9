"""Rotary position embeddings with the scaling variants real configs use.

Shape legend: B batch, S sequence, H heads, R rotary dim (head dim or its rope part), P positions,
N = B * S rows, d = R (kernel path).

`inv_freq` follows Hugging Face's `rope_type` conventions exactly ("default", "linear", "dynamic",
"llama3", "yarn") so imported checkpoints reproduce their logits; cos/sin are computed from the
actual positions on each call, so ragged batches with per-sequence offsets need no special case.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moekit import kernels
from moekit.utils import Fp32Buffers


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_init(dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [R/2] float32, attention_scaling) for a rope config."""
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not scaling:
        return base.float(), 1.0
    rt = scaling.get("rope_type", scaling.get("type", "default"))
    factor = float(scaling.get("factor", 1.0))
    if rt == "default" or rt == "dynamic":
        return base.float(), 1.0
    if rt == "linear":
        return (base / factor).float(), 1.0
    if rt == "llama3":
        old = scaling.get("original_max_position_embeddings", 8192)
        low_f, high_f = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        low_wl, high_wl = old / low_f, old / high_f
        wavelen = 2 * math.pi / base
        inv = torch.where(wavelen > low_wl, base / factor, base)
        smooth = (old / wavelen - low_f) / (high_f - low_f)
        smoothed = (1 - smooth) * inv / factor + smooth * inv
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(medium, smoothed, inv).float(), 1.0
    if rt == "yarn":
        old = scaling.get("original_max_position_embeddings", max_pos)
        if scaling.get("factor") is None:  # DeepSeek-style configs give the ratio implicitly
            factor = max_pos / old
        beta_fast, beta_slow = scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0
        attn_factor = scaling.get("attention_factor")
        if attn_factor is None:
            ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            if ms and ms_all:
                attn_factor = _yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all)
            else:
                attn_factor = _yarn_mscale(factor)

        def corr_dim(rot: float) -> float:
            return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        inv = (base / factor) * (1 - extrap) + base * extrap
        return inv.float(), float(attn_factor)
    raise ValueError(f"unsupported rope_type {rt!r}")


class RotaryEmbedding(Fp32Buffers):
    _fp32_buffers = ("inv_freq",)

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None, max_pos: int):
        super().__init__()
        self.dim, self.theta, self.scaling, self.max_pos = dim, theta, scaling, max_pos
        inv, self.attention_scaling = rope_init(dim, theta, scaling, max_pos)
        self.register_buffer("inv_freq", inv, persistent=False)
        self._dynamic = bool(scaling) and scaling.get("rope_type", scaling.get("type")) == "dynamic"

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        # NTK-aware dynamic scaling: grow the base once the sequence exceeds the trained length.
        orig = self.scaling.get("original_max_position_embeddings", self.max_pos)
        if seq_len <= orig:
            return self.inv_freq
        factor = self.scaling["factor"]
        base = self.theta * ((factor * seq_len / orig) - (factor - 1)) ** (self.dim / (self.dim - 2))
        inv = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.inv_freq.device) / self.dim))
        return inv

    def forward(self, pos_BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, S, R] for rotate-half application (float32 math, cast at the end)."""
        inv = self._dynamic_inv_freq(int(pos_BS.max()) + 1) if self._dynamic else self.inv_freq
        # float32 angles: positions up to ~1e5 times frequencies need the mantissa.
        ang_BSR2 = pos_BS.float().unsqueeze(-1) * inv.to(pos_BS.device)
        emb = torch.cat((ang_BSR2, ang_BSR2), dim=-1)
        s = self.attention_scaling
        return (emb.cos() * s).to(dtype), (emb.sin() * s).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _RopeRows(torch.autograd.Function):
    """Rotary embedding through the compiled kernel, forward and backward (the transposed rotation)."""

    @staticmethod
    def forward(ctx, x_NHd: torch.Tensor, cos_Nd: torch.Tensor, sin_Nd: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos_Nd, sin_Nd)
        return kernels.rope_rows(x_NHd, cos_Nd, sin_Nd)

    @staticmethod
    def backward(ctx, g_NHd: torch.Tensor):
        cos_Nd, sin_Nd = ctx.saved_tensors
        return kernels.rope_rows(g_NHd.contiguous(), cos_Nd, sin_Nd, inverse=True), None, None


def _rope_kernel(x_BHSR: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor | None:
    """The kernel path for training on CPU: one pass per row instead of two cats, three multiplies
    and an add on strided views (forward and again backward). None when it does not apply: no
    autograd, heads not contiguous in the [B, S, H, R] layout the fused QKV projection gives, or no
    kernels. The result is in x's dtype (the reference promotes to the tables' dtype, which
    autocast's matmuls cast straight back)."""
    if not (torch.is_grad_enabled() and x_BHSR.requires_grad):
        return None  # inference: nothing to do here (decode pays for every op it adds)
    B, H, S, R = x_BHSR.shape
    x_BSHR = x_BHSR.transpose(1, 2)
    if not (R % 2 == 0 and cos_BSR.shape[-1] == R
            and x_BSHR.stride(-1) == 1 and x_BSHR.stride(-2) == R and x_BSHR.stride(0) == S * x_BSHR.stride(1)
            and kernels.train_usable(x_BHSR, cos_BSR, sin_BSR)):
        return None
    cos_Nd = cos_BSR.expand(B, S, R).reshape(B * S, R)
    sin_Nd = sin_BSR.expand(B, S, R).reshape(B * S, R)
    y_NHd = _RopeRows.apply(x_BSHR.reshape(B * S, H, R), cos_Nd, sin_Nd)
    return y_NHd.view(B, S, H, R).transpose(1, 2)


def apply_rope(x_BHSR: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    if x_BHSR.device.type == "cpu" and (y := _rope_kernel(x_BHSR, cos_BSR, sin_BSR)) is not None:
        return y
    cos, sin = cos_BSR.unsqueeze(1), sin_BSR.unsqueeze(1)
    return x_BHSR * cos + rotate_half(x_BHSR) * sin
