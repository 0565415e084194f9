"""Norms, grouped-query attention and the preallocated KV cache.

Shape legend: B batch, S new tokens, L keys attended (cache prefix + new), D model dim,
H query heads, G kv heads, R = H / G query heads per kv head, Dh head dim, M max cache length.

Key slots are positions (a cache writes token p at slot p), so every local-attention rule is a
mask over slots: Llama 4's chunks and gpt-oss's sliding window restrict the same causal mask, in
prefill and in cached decode alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels
from moekit.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back before the weight (Llama/HF convention, so imported
    models match their reference bit for bit in fp32 and to rounding in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32 and torch.is_grad_enabled()
                and (x.requires_grad or self.weight.requires_grad) and kernels.train_usable(x)):
            # Training on CPU (float32 residual stream, as under autocast): one compiled pass each
            # way instead of ~6 elementwise ops forward and ~10 backward over the activations.
            return _RMSNormRows.apply(x, self.weight, self.eps)
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class _RMSNormRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x_ND = x.reshape(-1, x.shape[-1]).contiguous()
        y_ND, rstd_N = kernels.rms_norm(x_ND, w, eps)
        ctx.save_for_backward(x_ND, w, rstd_N)
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x_ND, w, rstd_N = ctx.saved_tensors
        dx_ND, dw = kernels.rms_norm_backward(g.reshape(x_ND.shape), x_ND, w, rstd_N)
        return dx_ND.view(g.shape), dw, None


class KVCache:
    """Per-layer preallocated caches plus the number of tokens each sequence holds.

    `lengths[b]` is where sequence b's next token goes; a forward writes its S new tokens at
    positions lengths[b] .. lengths[b]+S-1 and the caller advances lengths by the count of *valid*
    tokens (ragged batches pad the shorter rows; their padding slots are overwritten later and are
    never attended because a query at position p only sees keys at positions <= p).
    """

    def __init__(self, layers: list, batch_size: int, max_len: int, device: torch.device | str):
        self.layers = layers
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.seen = 0
        """Host-side upper bound on max(lengths): attention reads only this prefix (no sync)."""

    @property
    def batch_size(self) -> int:
        return self.lengths.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.layers if st is not None for t in st)

    def advance(self, n: torch.Tensor | int) -> None:
        self.lengths += n

    def reset(self) -> None:
        self.lengths.zero_()
        self.seen = 0


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last dim in float32 (Llama 4 `Llama4TextL2Norm`)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def chunked_mask(pos_BS: torch.Tensor, n_keys: int, chunk: int, mask_B1SL: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B, 1, S, L] mask: causal and key in the query's chunk (key slot = key position)."""
    k_L = torch.arange(n_keys, device=pos_BS.device)
    q = pos_BS.unsqueeze(-1)  # [B, S, 1]
    m = (k_L <= q) & (k_L // chunk == q // chunk)
    m = m.unsqueeze(1)
    return m if mask_B1SL is None else (m & mask_B1SL)


def window_mask(pos_BS: torch.Tensor, n_keys: int, window: int, mask_B1SL: torch.Tensor | None) -> torch.Tensor:
    """Boolean [B, 1, S, L] mask: causal and key within the window, p - window < k <= p (HF's
    sliding-window rule: a query sees itself and the window - 1 keys before it)."""
    k_L = torch.arange(n_keys, device=pos_BS.device)
    q = pos_BS.unsqueeze(-1)  # [B, S, 1]
    m = ((k_L <= q) & (k_L > q - window)).unsqueeze(1)
    return m if mask_B1SL is None else (m & mask_B1SL)


def sink_attention(q_BHSd: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor, mask_B1SL: torch.Tensor,
                   sinks_H: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention with a learned sink logit per head (gpt-oss): softmax over [scores | sink], the
    sink column dropped before the values, so each row's weights sum to less than 1 and a head can
    attend to "nothing". float32 scores and softmax, as SDPA's math path; GQA by broadcasting."""
    B, H, S, d = q_BHSd.shape
    G, L = k_BGLd.shape[1], k_BGLd.shape[2]
    q_BGRSd = q_BHSd.reshape(B, G, H // G, S, d)
    s_BGRSL = torch.matmul(q_BGRSd, k_BGLd.to(q_BHSd.dtype).unsqueeze(2).transpose(-1, -2)).float() * scale
    s_BGRSL = s_BGRSL.masked_fill(~mask_B1SL.reshape(B, 1, 1, S, L), float("-inf"))
    sink_BGRS1 = sinks_H.float().view(1, G, H // G, 1, 1).expand(B, G, H // G, S, 1)
    p_BGRSL = torch.cat([s_BGRSL, sink_BGRS1], dim=-1).softmax(-1)[..., :L].to(v_BGLd.dtype)
    return torch.matmul(p_BGRSL, v_BGLd.unsqueeze(2)).view(B, H, S, d).to(q_BHSd.dtype)


def project(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A projection by `lin`: a quantized linear (moekit.quant, it has `qweight`) runs its own forward
    (the low-bit kernel at decode, not a dequantized `.weight` per call), a float one `decode_linear`."""
    if hasattr(lin, "qweight"):
        return lin(x)
    return decode_linear(x, lin.weight, lin.bias)


def decode_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the compiled small-M CPU kernel (`moekit.kernels.linear`) for decode-sized
    inputs (at most `kernels.max_linear_rows` rows, no autograd): oneDNN's bf16 GEMV reads weights at about
    half the DRAM bandwidth and decode is bandwidth-bound, so this is where decode time goes."""
    if (x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.numel() <= kernels.max_linear_rows(x.dtype, w.dtype) * x.shape[-1]):
        if kernels.usable(x, w):
            y = kernels.linear(x, w)
            return (y if b is None else y + b).to(x.dtype)
    if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        # bf16-stored weights under fp32 compute (moekit.precision.widen_compute)
        w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
    return F.linear(x, w, b)


MATH_ATTENTION_MAX_ELEMS = 1 << 25
"""Causal training attention on CPU takes the two-matmul path below while its float32 scores
[B, H, S, S] hold at most this many elements (128 MiB); longer sequences use SDPA's flash kernel."""


def causal_attention_math(q_BHSd: torch.Tensor, k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Causal self-attention as two batched matmuls around a float32 softmax (GQA by broadcasting).

    Why: on CPU, SDPA's flash kernel runs its blocks at a few percent of the matmul peak; at
    training lengths (a small-moe step: B16 x H4 x S256, d 64, bf16 autocast) this path is 1.6x
    faster forward + backward (15.5 vs 25 ms per layer on 2 Zen 5 cores), for S^2 floats of scores
    per head. The softmax runs in float32 whatever the input dtype, as SDPA's does.
    """
    B, H, S, d = q_BHSd.shape
    G = k_BGSd.shape[1]
    q5 = q_BHSd.view(B, G, H // G, S, d)
    s_BGrSS = torch.matmul(q5, k_BGSd.unsqueeze(2).transpose(-1, -2))
    if s_BGrSS.dtype == v_BGSd.dtype and kernels.train_usable(s_BGrSS):
        # Mask, scale, float32 softmax and the cast back in one compiled pass (and one backward).
        p_BGrSS = _CausalSoftmax.apply(s_BGrSS, scale)
    else:
        future_SS = torch.ones(S, S, dtype=torch.bool, device=q_BHSd.device).triu_(1)
        s_BGrSS = s_BGrSS.masked_fill(future_SS, float("-inf"))
        p_BGrSS = torch.softmax(s_BGrSS.float().mul_(scale), dim=-1).to(v_BGSd.dtype)
    return torch.matmul(p_BGrSS, v_BGSd.unsqueeze(2)).view(B, H, S, d)


class _CausalSoftmax(torch.autograd.Function):
    """softmax(scale * s) with future keys masked, float32 math, in s's dtype: the compiled kernel
    both ways. The backward uses the saved probabilities as stored (bf16 under autocast), as
    SDPA's math path does with its own."""

    @staticmethod
    def forward(ctx, s_SL: torch.Tensor, scale: float) -> torch.Tensor:
        p_SL = kernels.causal_softmax(s_SL, scale)
        ctx.save_for_backward(p_SL)
        ctx.scale = scale
        return p_SL

    @staticmethod
    def backward(ctx, dp_SL: torch.Tensor):
        (p_SL,) = ctx.saved_tensors
        return kernels.causal_softmax_backward(p_SL, dp_SL, ctx.scale), None


KEY_WINDOW = 128
"""Granularity of the bf16 decode key window on the PyTorch path (see Attention.forward)."""


def _kernel_attention(q_BH1d: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor) -> bool:
    """Whether the compiled decode-attention kernel can take this call (CPU, no autograd, one dtype,
    head dim a multiple of 16, at most 512)."""
    return (q_BH1d.device.type == "cpu" and not torch.is_grad_enabled() and q_BH1d.shape[-1] % 16 == 0
            and q_BH1d.shape[-1] <= 512
            and k_BGLd.dtype == q_BH1d.dtype and k_BGLd.is_contiguous() and v_BGLd.is_contiguous()
            and kernels.usable(q_BH1d, k_BGLd, v_BGLd))


def decode_attention(q_BH1d: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor,
                     mask_B11L: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query per row against the cache: two small batched matmuls and a float32 softmax.
    On CPU, SDPA's flash kernel costs 4-14x more than this at decode sizes (its parallel region
    dominates the math). Query head h reads kv head h // (H / G), as SDPA's enable_gqa does."""
    B, H, _, d = q_BH1d.shape
    G, L = k_BGLd.shape[1], k_BGLd.shape[2]
    q_BGRd = q_BH1d.reshape(B, G, H // G, d)
    s_BGRL = torch.matmul(q_BGRd, k_BGLd.to(q_BH1d.dtype).transpose(-1, -2)).float() * scale
    if mask_B11L is not None:
        s_BGRL = s_BGRL.masked_fill(~mask_B11L.view(B, 1, 1, L), float("-inf"))
    p_BGRL = s_BGRL.softmax(-1).to(q_BH1d.dtype)
    return torch.matmul(p_BGRL, v_BGLd.to(q_BH1d.dtype)).view(B, H, 1, d)


class Attention(nn.Module):
    """Grouped-query attention with fused QKV, optional per-head or full q/k RMSNorm and biases."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.hd
        self.use_rope = layer_idx not in cfg.no_rope_layers
        q_out, kv_out = self.n_heads * self.hd, self.n_kv * self.hd
        self.q_out, self.kv_out = q_out, kv_out
        # One fused projection: a single GEMM (GEMV at decode) instead of three.
        self.wqkv = nn.Linear(cfg.dim, q_out + 2 * kv_out, bias=cfg.attn_bias)
        self.wo = nn.Linear(q_out, cfg.dim, bias=cfg.attn_out_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            nd_q, nd_k = (q_out, kv_out) if cfg.qk_norm_full else (self.hd, self.hd)
            self.q_norm, self.k_norm = RMSNorm(nd_q, cfg.norm_eps), RMSNorm(nd_k, cfg.norm_eps)
        self.qk_norm_full = cfg.qk_norm_full
        self.scale = self.hd ** -0.5
        # Llama 4 extras (all off by default): L2 q/k norm after RoPE and chunked local attention on
        # RoPE layers; query temperature tuning on the no-RoPE (global) layers.
        self.qk_l2_eps = cfg.norm_eps if (cfg.qk_l2_norm and self.use_rope) else None
        self.chunk = cfg.attention_chunk_size if self.use_rope else None
        self.temp_tuning = (cfg.floor_scale, cfg.attn_scale) if (cfg.attn_temperature_tuning and not self.use_rope) else None
        # gpt-oss extras: a sliding window on some layers, a sink logit per head (zeros = a sink
        # logit of 0, i.e. one extra unit in every softmax denominator until trained or loaded).
        self.window = cfg.sliding_window if layer_idx in cfg.sliding_layers else None
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None
        self.local = self.chunk is not None or self.window is not None
        """A layer-built mask restricts the causal one (the causal-only fast paths do not apply)."""

    def init_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.n_kv, max_len, self.hd)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos_BS: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, mask_B1SL: torch.Tensor | None,
                seen: int) -> torch.Tensor:
        from moekit.model.rope import apply_rope

        B, S, _ = x_BSD.shape
        qkv = project(self.wqkv, x_BSD)
        q, k, v = qkv.split([self.q_out, self.kv_out, self.kv_out], dim=-1)
        if self.q_norm is not None and self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSd = q.view(B, S, self.n_heads, self.hd).transpose(1, 2)
        k_BGSd = k.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        v_BGSd = v.view(B, S, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None and not self.qk_norm_full:
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        if self.use_rope:
            q_BHSd, k_BGSd = apply_rope(q_BHSd, cos, sin), apply_rope(k_BGSd, cos, sin)
        if self.qk_l2_eps is not None:
            q_BHSd, k_BGSd = l2_norm(q_BHSd, self.qk_l2_eps), l2_norm(k_BGSd, self.qk_l2_eps)
        if self.temp_tuning is not None:
            floor_scale, attn_scale = self.temp_tuning
            t_BS = torch.log1p(torch.floor((pos_BS.float() + 1.0) / floor_scale)) * attn_scale + 1.0
            q_BHSd = (q_BHSd * t_BS.view(B, 1, S, 1)).to(q_BHSd.dtype)
        if self.chunk is not None:
            mask_B1SL = chunked_mask(pos_BS, seen if cache is not None else S, self.chunk, mask_B1SL)
        if self.window is not None:
            mask_B1SL = window_mask(pos_BS, seen if cache is not None else S, self.window, mask_B1SL)
        if self.sinks is not None:
            o = self._sink_forward(q_BHSd, k_BGSd, v_BGSd, pos_BS, cache, mask_B1SL, seen)
        elif cache is None and mask_B1SL is not None:
            o = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, attn_mask=mask_B1SL, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_heads)
        elif cache is None and (S > 1 and q_BHSd.device.type == "cpu" and torch.is_grad_enabled()
                                and B * self.n_heads * S * S <= MATH_ATTENTION_MAX_ELEMS):
            o = causal_attention_math(q_BHSd, k_BGSd, v_BGSd, self.scale)  # training on CPU
        elif cache is None:
            o = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=S > 1, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_heads)
        else:
            kc, vc = self._write_cache(cache, k_BGSd, v_BGSd, pos_BS)
            if seen == S and not self.local:
                # Prefill into an empty cache: positions are 0..S-1 in every row (right padding), so
                # plain causal attention on the new keys is exact and ~1.5x faster than a mask.
                o = F.scaled_dot_product_attention(q_BHSd, k_BGSd, v_BGSd, is_causal=S > 1, scale=self.scale,
                                                   enable_gqa=self.n_kv != self.n_heads)
            elif S == 1 and not self.local and _kernel_attention(q_BHSd, kc, vc):
                o = kernels.decode_attention(q_BHSd.reshape(B, self.n_heads, self.hd), kc, vc, pos_BS[:, 0],
                                             self.scale).to(q_BHSd.dtype).view(B, self.n_heads, 1, self.hd)
            elif S == 1:
                L, mask_B1SL = seen, mask_B1SL
                if q_BHSd.dtype == torch.bfloat16 and q_BHSd.device.type == "cpu" and not self.local:
                    # A key window rounded up to KEY_WINDOW slots (the extra ones masked): oneDNN
                    # builds a new bf16 matmul primitive for every new shape (~0.1 ms, twice per
                    # layer per step), so a length growing by one each step costs more than the
                    # math. Slots past a row's length hold zeros or stale finite keys; masked, they
                    # get probability exactly 0.
                    L = min(kc.shape[2], -(-seen // KEY_WINDOW) * KEY_WINDOW)
                    mask_B1SL = torch.arange(L, device=kc.device).view(1, 1, 1, L) <= pos_BS.view(B, 1, 1, 1)
                o = decode_attention(q_BHSd, kc[:, :, :L], vc[:, :, :L], mask_B1SL, self.scale)
            else:
                o = F.scaled_dot_product_attention(q_BHSd, kc[:, :, :seen].to(q_BHSd.dtype),
                                                   vc[:, :, :seen].to(q_BHSd.dtype), attn_mask=mask_B1SL,
                                                   scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        return project(self.wo, o.transpose(1, 2).reshape(B, S, -1))

    @staticmethod
    def _write_cache(cache: tuple[torch.Tensor, torch.Tensor], k_BGSd: torch.Tensor, v_BGSd: torch.Tensor,
                     pos_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values at their positions; returns the (whole) caches."""
        kc, vc = cache
        # Index assignment, not scatter_: bf16 scatter_ takes a slow path on CPU (~25x slower).
        b_B1 = torch.arange(k_BGSd.shape[0], device=kc.device).view(-1, 1)
        kc[b_B1, :, pos_BS] = k_BGSd.transpose(1, 2).to(kc.dtype)
        vc[b_B1, :, pos_BS] = v_BGSd.transpose(1, 2).to(vc.dtype)
        return kc, vc

    def _sink_forward(self, q_BHSd, k_BGSd, v_BGSd, pos_BS, cache, mask_B1SL, seen) -> torch.Tensor:
        """Attention with sinks, with or without a cache (one math path: SDPA has no sink term)."""
        S = q_BHSd.shape[2]
        if cache is not None:
            kc, vc = self._write_cache(cache, k_BGSd, v_BGSd, pos_BS)
            # A sliding layer reads only the slots some query's window reaches, so its decode
            # costs O(window), not O(context) (one host read of the earliest query position).
            lo = 0 if self.window is None else max(0, int(pos_BS[:, 0].min()) - self.window + 1)
            k_BGSd, v_BGSd = kc[:, :, lo:seen], vc[:, :, lo:seen]
            mask_B1SL = mask_B1SL[..., lo:seen]
        if mask_B1SL is None:  # no cache, full attention: plain causal
            mask_B1SL = torch.ones(S, S, dtype=torch.bool, device=q_BHSd.device).tril_().view(1, 1, S, S)
        B = q_BHSd.shape[0]
        return sink_attention(q_BHSd, k_BGSd, v_BGSd, mask_B1SL.expand(B, 1, S, k_BGSd.shape[2]), self.sinks,
                              self.scale)
