"""Multi-head latent attention (DeepSeek-V2/V3) with a compressed KV cache.

Shape legend: B batch, S new tokens, L keys attended (cache prefix + new), D model dim, H heads,
M max cache length, C kv_lora_rank (latent width), Q q_lora_rank, R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.

Parameterisation follows Hugging Face's `DeepseekV3Attention` module for module, so an HF state
dict maps onto this one by name: `q_a_proj`/`q_a_layernorm`/`q_b_proj` (or `q_proj` without a q
LoRA), `kv_a_proj_with_mqa` (D -> C + R), `kv_a_layernorm`, `kv_b_proj` (C -> H*(N+V)), `o_proj`.

The cache holds, per token and layer, only the normalised latent [C] and the rotated shared rope
key [R]: (C + R) numbers instead of 2*H*(N+R) for plain multi-head attention (DeepSeek-V3: 576 vs
49,152). Keys and values are re-expanded through `kv_b_proj` when attending. For single-token decode
the expansion is avoided altogether ("weight absorption"): q_nope is folded into latent space
through kv_b's key half and the attention output leaves latent space through kv_b's value half, so
a step costs O(L*H*C) instead of O(L*C*H*(N+V)).

RoPE is the rotate-half form; DeepSeek checkpoints with `rope_interleave` (pairs (x0, x1), ...)
are converted at import by permuting the rope rows of `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa`
(see `moekit.checkpoint.hf_deepseek`), which is exactly equivalent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.model.attention import RMSNorm
from moekit.model.rope import apply_rope

# HF's DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with the class default eps (1e-6),
# not config.rms_norm_eps; matching it keeps imported checkpoints exact.
LATENT_NORM_EPS = 1e-6


def _yarn_get_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(N+R), times yarn's mscale(factor, mscale_all_dim) squared when rope scaling sets it
    (DeepSeek: the rope cos/sin carry mscale/mscale_all_dim, the softmax scale the rest)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type", "default")) != "default":
        m_all = rs.get("mscale_all_dim", 0)
        if m_all:
            m = _yarn_get_mscale(float(rs["factor"]), m_all)
            scale = scale * m * m
    return scale


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; same call interface as `Attention`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = H = cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = C = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk = self.nope + self.rope
        bias = cfg.attn_bias  # HF `attention_bias`: on q_a_proj, kv_a_proj_with_mqa and o_proj
        if cfg.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, H * qk, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, C + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(C, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(C, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, cfg.dim, bias=bias)
        self.scale = mla_softmax_scale(cfg)
        self.absorb_decode = True
        """Use weight absorption for single-token decode steps (exact up to float rounding)."""

    def init_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed cache: latent [B, M, C] and rotated rope key [B, M, R]; nothing per head."""
        return (torch.zeros(batch, max_len, self.kv_lora_rank, dtype=dtype, device=device),
                torch.zeros(batch, max_len, self.rope, dtype=dtype, device=device))

    def _query(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.q_proj is not None:
            return self.q_proj(x_BSD)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos_BS: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, mask_B1SL: torch.Tensor | None,
                seen: int) -> torch.Tensor:
        # Plan: 1. queries, split into nope/rope parts, rope applied; 2. latent + shared rope key,
        # written to the cache when there is one; 3. attend, either by expanding the latent through
        # kv_b (prefill, no cache) or in latent space (decode); 4. output projection.
        B, S, _ = x_BSD.shape
        H, N, R, C, V = self.n_heads, self.nope, self.rope, self.kv_lora_rank, self.v_dim
        q_BHSk = self._query(x_BSD).view(B, S, H, N + R).transpose(1, 2)
        q_nope_BHSN, q_rope_BHSR = q_BHSk.split([N, R], dim=-1)
        q_rope_BHSR = apply_rope(q_rope_BHSR, cos, sin)

        lat_BSC, k_rope_BSR = self.kv_a_proj_with_mqa(x_BSD).split([C, R], dim=-1)
        lat_BSC = self.kv_a_layernorm(lat_BSC)
        k_rope_BSR = apply_rope(k_rope_BSR.unsqueeze(1), cos, sin).squeeze(1)

        if cache is not None:
            lat_c, rope_c = cache
            # Index assignment, not scatter_: bf16 scatter_ takes a slow path on CPU (~25x slower).
            b_B1 = torch.arange(B, device=lat_c.device).view(B, 1)
            lat_c[b_B1, pos_BS] = lat_BSC.to(lat_c.dtype)
            rope_c[b_B1, pos_BS] = k_rope_BSR.to(rope_c.dtype)
            lat_BLC = lat_c[:, :seen].to(x_BSD.dtype)
            k_rope_BLR = rope_c[:, :seen].to(x_BSD.dtype)
            if self.absorb_decode and S == 1:
                o_BSHV = self._absorbed(q_nope_BHSN, q_rope_BHSR, lat_BLC, k_rope_BLR, mask_B1SL)
                return self.o_proj(o_BSHV.reshape(B, S, H * V))
        else:
            lat_BLC, k_rope_BLR = lat_BSC, k_rope_BSR
        L = lat_BLC.shape[1]
        kv_BHLk = self.kv_b_proj(lat_BLC).view(B, L, H, N + V).transpose(1, 2)
        k_nope_BHLN, v_BHLV = kv_BHLk.split([N, V], dim=-1)
        k_BHLk = torch.cat([k_nope_BHLN, k_rope_BLR.unsqueeze(1).expand(B, H, L, R)], dim=-1)
        q_BHSk = torch.cat([q_nope_BHSN, q_rope_BHSR], dim=-1)
        if cache is None:
            o_BHSV = F.scaled_dot_product_attention(q_BHSk, k_BHLk, v_BHLV, is_causal=S > 1, scale=self.scale)
        else:
            o_BHSV = F.scaled_dot_product_attention(q_BHSk, k_BHLk, v_BHLV, attn_mask=mask_B1SL, scale=self.scale)
        return self.o_proj(o_BHSV.transpose(1, 2).reshape(B, S, H * V))

    def _absorbed(self, q_nope_BHSN, q_rope_BHSR, lat_BLC, k_rope_BLR, mask_B1SL) -> torch.Tensor:
        """Attention computed in latent space: scores = (q_nope W_uk) . latent + q_rope . k_rope,
        output = (softmax . latent) W_uv. Returns [B, S, H, V]."""
        H, N, V, C = self.n_heads, self.nope, self.v_dim, self.kv_lora_rank
        w_HkC = self.kv_b_proj.weight.view(H, N + V, C)
        w_uk_HNC, w_uv_HVC = w_HkC.split([N, V], dim=1)
        q_lat_BHSC = torch.einsum("bhsn,hnc->bhsc", q_nope_BHSN, w_uk_HNC)
        # Float32 scores/softmax: the latent dot products sum over C (512 for V3) terms.
        scores_BHSL = (torch.einsum("bhsc,blc->bhsl", q_lat_BHSC.float(), lat_BLC.float())
                       + torch.einsum("bhsr,blr->bhsl", q_rope_BHSR.float(), k_rope_BLR.float())) * self.scale
        if mask_B1SL is not None:
            scores_BHSL = scores_BHSL.masked_fill(~mask_B1SL, float("-inf"))
        p_BHSL = scores_BHSL.softmax(-1).to(lat_BLC.dtype)
        o_lat_BHSC = torch.einsum("bhsl,blc->bhsc", p_BHSL, lat_BLC)
        return torch.einsum("bhsc,hvc->bshv", o_lat_BHSC, w_uv_HVC)
