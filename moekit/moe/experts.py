"""Expert FFNs with weights stacked per expert, and the dense FFN they generalise.

Shape legend: E experts, F expert hidden dim, D model dim, S rows grouped by expert, T tokens.
Weights follow F.linear's [out, in] layout so each expert slice feeds oneDNN/MKL directly:
`w13_EHD` [E, 2F, D] (gate and up fused, gate first; H = 2F, or F for plain GELU) and
`w2_EDF` [E, D, F]. A slice `w13_EHD[e]` is a view, never a copy. Optional per-expert biases
`b13_EH` [E, H] and `b2_ED` [E, D] (gpt-oss) live here too: the compiled kernels have none, so
biased experts run the F.linear paths (the kernel backends decline them).
"""

from __future__ import annotations

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels
from moekit.config import GATED_ACTS

log = logging.getLogger(__name__)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up through the compiled kernel both ways (CPU training)."""

    @staticmethod
    def forward(ctx, h_SH: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h_SH)
        return kernels.silu_mul(h_SH)

    @staticmethod
    def backward(ctx, g_SF: torch.Tensor) -> torch.Tensor:
        (h_SH,) = ctx.saved_tensors
        return kernels.silu_mul_backward(h_SH, g_SF)


def clamped_swiglu(h_SH: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's activation on [gate | up]: the gate clamped above at `limit`, up to +-limit, then
    (up + 1) * gate * sigmoid(alpha * gate). The clamps bound what an outlier token can push
    through an expert; the +1 lets `up` pass the gate through unchanged at 0."""
    g, u = h_SH.chunk(2, dim=-1)
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def activate(h_SH: torch.Tensor, act: str, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """Apply the FFN nonlinearity to the fused first projection (`alpha`, `limit`: clamped_swiglu's)."""
    if act == "clamped_swiglu":
        return clamped_swiglu(h_SH, alpha, limit)
    if act == "swiglu":
        if h_SH.is_cpu and h_SH.dim() == 2 and kernels.usable(h_SH):  # inference: one fused pass
            return kernels.silu_mul(h_SH)
        if h_SH.is_cpu and h_SH.dim() == 2 and h_SH.requires_grad and kernels.train_usable(h_SH):
            return _SiluMul.apply(h_SH)  # training: one pass forward, one backward
        g, u = h_SH.chunk(2, dim=-1)
        return F.silu(g) * u
    if act == "geglu":
        g, u = h_SH.chunk(2, dim=-1)
        return F.gelu(g) * u
    return F.gelu(h_SH)


BATCHED_COMBINE = False
"""Inference path for experts left to oneDNN/MKL: True = batched (2 GEMMs per expert, the rest
once), False = per-expert accumulate (3 more small ops per expert). See _big_batched.
False measured as fast or faster at every token count on a quiet 2-core Zen 5 (bf16, 64 experts
top-8: T=512 25 ms vs 42 ms, T=2048 72 ms vs 144 ms; Mixtral-style T=2048 110 ms vs 142 ms)."""


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear / torch.mm produce for x here: autocast's (e.g. bf16 under the trainer's
    eval) for float32 inputs while autocast is on, else x's own. Buffers written with `out=` must
    have it."""
    dev = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def as_compute(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w in x's dtype. Weights may be stored in bf16 while a CPU without native bf16 computes in
    fp32 (`moekit.precision.widen_compute`): the kernels widen them in registers; PyTorch ops get a
    widened copy, made per call (a few percent of a prefill GEMM's time; decode takes the kernels)."""
    return w if w.dtype == x.dtype or torch.is_autocast_enabled(x.device.type) else w.to(x.dtype)


def _linear_into(x_ND: torch.Tensor, w_MD: torch.Tensor, out_NM: torch.Tensor) -> None:
    """out = F.linear(x, w), written in place (no temporary) when x, w and out share a dtype.
    `torch.mm(out=)` is outside autocast's op list, so under autocast (float32 weights) the GEMM
    runs through F.linear and is copied in."""
    w_MD = as_compute(w_MD, x_ND)
    if x_ND.dtype == w_MD.dtype == out_NM.dtype and not torch.is_autocast_enabled(x_ND.device.type):
        torch.mm(x_ND, w_MD.t(), out=out_NM)
    else:
        out_NM.copy_(F.linear(x_ND, w_MD))


def _inference(x: torch.Tensor, mod: nn.Module, *more: torch.Tensor) -> bool:
    """True on CPU when no autograd graph is being built through x, `more` or mod's weights
    (the fused paths below have no backward)."""
    if x.device.type != "cpu":
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t.requires_grad for t in (x, *more, *mod.parameters()))


class _GroupedSwiGLU(torch.autograd.Function):
    """Every expert's SwiGLU FFN on rows grouped by expert, as one autograd node (CPU training).

    Plan, forward: 1. cast the stacked weights (and rows) to the GEMM dtype once; 2. pad each
    expert's rows with zero rows to a multiple of ROW_ALIGN; 3. one GEMM per expert into its rows of
    one [S, 2F] buffer; 4. one SwiGLU kernel pass over all rows; 5. one GEMM per expert into one
    [S, D] output, gathered back to the unpadded rows. Backward mirrors it: per expert, the two GEMMs of each
    projection write straight into the stacked weight gradient and one [S, D] input gradient, with
    one SwiGLU-backward pass between. Against per-expert autograd ops this drops a cat of the
    outputs, a cat of the input gradients, a stack of each weight gradient, per-expert casts and
    about 60 autograd nodes per layer. Experts without rows get zero weight gradients.
    """

    @staticmethod
    def forward(ctx, x_SD: torch.Tensor, w13_EHD: torch.Tensor, w2_EDF: torch.Tensor, counts: list[int],
                dtype: torch.dtype) -> torch.Tensor:
        x, w13, w2 = x_SD.to(dtype).contiguous(), w13_EHD.to(dtype), w2_EDF.to(dtype)
        # Rows per expert padded with zero rows to a multiple of ROW_ALIGN (exact: a zero row adds
        # nothing to any output or weight gradient). oneDNN builds a GEMM primitive per shape and
        # keeps 1024; dropless counts change every step, so unpadded, nearly every expert GEMM
        # paid ~0.3 ms of primitive creation (measured: [n, 256] x [256, 1024] bf16, 0.99 ms with
        # a new n against 0.65 ms with a cached one), about 190 GEMMs per small-moe step. Padded:
        # 400 -> 317 ms per step (separate processes, alternated, 3 each).
        padded = [-(-n // ROW_ALIGN) * ROW_ALIGN for n in counts]
        dst_S = None
        if padded != counts:
            gap_E = torch.tensor([p - n for p, n in zip(padded, counts)])
            # Row s of expert e moves down by the padding of the experts before e.
            dst_S = torch.arange(x.shape[0]) + (gap_E.cumsum(0) - gap_E).repeat_interleave(torch.tensor(counts))
            x_pad = x.new_zeros(sum(padded), x.shape[1])
            x = x_pad.index_copy_(0, dst_S, x)
        S, D = x.shape
        h_SH = x.new_empty(S, w13.shape[1])
        y_SD = x.new_empty(S, D)
        spans = [(e, a - n, a) for e, (n, a) in enumerate(zip(padded, itertools.accumulate(padded))) if n]
        for e, a, b in spans:
            torch.mm(x[a:b], w13[e].t(), out=h_SH[a:b])
        a_SF = kernels.silu_mul(h_SH)
        for e, a, b in spans:
            torch.mm(a_SF[a:b], w2[e].t(), out=y_SD[a:b])
        ctx.save_for_backward(x, h_SH, a_SF, w13, w2, dst_S)
        ctx.spans, ctx.in_dtypes = spans, (x_SD.dtype, w13_EHD.dtype, w2_EDF.dtype)
        return y_SD if dst_S is None else y_SD.index_select(0, dst_S)

    @staticmethod
    def backward(ctx, g_SD: torch.Tensor):
        x, h_SH, a_SF, w13, w2, dst_S = ctx.saved_tensors
        g = g_SD.to(x.dtype).contiguous()
        if dst_S is not None:
            g = g.new_zeros(x.shape).index_copy_(0, dst_S, g)
        dw2, dw13 = torch.empty_like(w2), torch.empty_like(w13)
        da_SF, dx_SD = torch.empty_like(a_SF), torch.empty_like(x)
        live = {e for e, _, _ in ctx.spans}
        for e in range(w13.shape[0]):
            if e not in live:
                dw2[e].zero_()
                dw13[e].zero_()
        for e, a, b in ctx.spans:
            torch.mm(g[a:b], w2[e], out=da_SF[a:b])
            torch.mm(g[a:b].t(), a_SF[a:b], out=dw2[e])
        dh_SH = kernels.silu_mul_backward(h_SH, da_SF)
        for e, a, b in ctx.spans:
            torch.mm(dh_SH[a:b], w13[e], out=dx_SD[a:b])
            torch.mm(dh_SH[a:b].t(), x[a:b], out=dw13[e])
        xd, w13d, w2d = ctx.in_dtypes
        if dst_S is not None:
            dx_SD = dx_SD.index_select(0, dst_S)
        return dx_SD.to(xd), dw13.to(w13d), dw2.to(w2d), None, None


ROW_ALIGN = 64
"""Row-count granularity of the CPU training experts' GEMMs (see _GroupedSwiGLU.forward)."""


class GroupedExperts(nn.Module):
    """E expert FFNs stored as stacked tensors; runs rows already grouped by expert."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "swiglu", bias: bool = False,
                 alpha: float = 1.702, limit: float = 7.0, widths: list[int] | None = None):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.act = num_experts, dim, hidden, act
        self.alpha, self.limit = alpha, limit
        H = 2 * hidden if act in GATED_ACTS else hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, H, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.widths = list(widths) if widths is not None and any(w != hidden for w in widths) else None
        """Heterogeneous experts: expert e uses hidden units [0, widths[e]) of the padded width
        `hidden`. The other gate/up rows and down columns are zero and stay zero in training: a
        padded unit's activation is act(0) * 0 = 0 (gated) or gelu(0) = 0, so its down column gets
        no gradient, and with a zero down column its gate/up rows get none either (AdamW's decay
        and update keep zeros at zero). Every backend and kernel runs the padded stacks unchanged."""
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)
        self.b13 = nn.Parameter(torch.zeros(num_experts, H)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.zero_padding()
        self._packed: kernels.PackedExperts | None = None
        self._packed_stamp: tuple = ()
        self.use_packed = True
        """Use the packed copy when there is one (False: the row-major paths, for comparisons)."""

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the padded hidden units of narrower experts (after any re-initialisation)."""
        if self.widths is None or self.w13.is_meta:
            return
        F_, gated = self.hidden, self.w13.shape[1] == 2 * self.hidden
        for e, w in enumerate(self.widths):
            self.w13[e, w:F_].zero_()
            if gated:
                self.w13[e, F_ + w:].zero_()
            self.w2[e, :, w:].zero_()

    def _stamp(self) -> tuple:
        return (self.w13.data_ptr(), self.w13._version, self.w2.data_ptr(), self.w2._version)

    def pack(self) -> int:
        """Keep a copy of the expert weights packed for the CPU outer-product kernel
        (`kernels.pack_experts`); CPU inference then runs every expert on it, at any batch size.
        Returns the bytes it added (as much again as the expert weights: the plain copy stays for
        training, saving and other devices). 0 when the weights are not packable (not bf16/fp32 on
        CPU, odd dim in bf16, kernels unavailable)."""
        if self.b13 is not None or not (kernels.available() and kernels.packable(self.w13, self.w2, self.act)):
            self._packed = None
            return 0
        self._packed = kernels.pack_experts(self.w13.detach(), self.w2.detach(), self.act)
        self._packed_stamp = self._stamp()
        return self._packed.nbytes

    def unpack(self) -> None:
        """Drop the packed copy."""
        self._packed = None

    def packed_for(self, x: torch.Tensor) -> kernels.PackedExperts | None:
        """The packed weights if they apply to this inference call: rows of their dtype, no autograd
        graph, and weights unchanged since `pack()` (an optimizer step or load_state_dict bumps
        their version; the stale copy is dropped, not used)."""
        if self._packed is None or not self.use_packed or not _inference(x, self):
            return None
        pdt = self._packed.p13.dtype  # rows of the packed dtype, or fp32 rows on bf16 weights (widened in registers)
        if x.dtype != pdt and not (x.dtype == torch.float32 and pdt == torch.bfloat16):
            return None
        if self._stamp() != self._packed_stamp:
            log.warning("moekit: expert weights changed since pack(); dropping the packed copy (call pack() again)")
            self._packed = None
            return None
        return self._packed

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on a block of rows (views into the stacked weights: no copy unless the weights
        are stored in a narrower dtype than the rows, see `as_compute`)."""
        h = self._act(F.linear(x_ND, as_compute(self.w13[e], x_ND), self._bias(self.b13, e, x_ND)))
        return F.linear(h, as_compute(self.w2[e], h), self._bias(self.b2, e, h))

    def _act(self, h_SH: torch.Tensor) -> torch.Tensor:
        return activate(h_SH, self.act, self.alpha, self.limit)

    @staticmethod
    def _bias(b_EX: torch.Tensor | None, e: int, x: torch.Tensor) -> torch.Tensor | None:
        return None if b_EX is None else as_compute(b_EX[e], x)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_SD.shape[0] == 0:
            return x_SD.new_zeros(0, self.dim)
        if x_SD.is_cuda and hasattr(torch, "_grouped_mm") and x_SD.dtype == torch.bfloat16:
            return self._forward_grouped_mm(x_SD, counts_E)
        counts = counts_E.tolist()
        if _inference(x_SD, self):
            # No autograd graph: fill one preallocated buffer (no per-expert cat) and let the
            # compiled kernel take the experts with few rows.
            return self._forward_into(x_SD, counts)
        # CPU training: one GEMM pair per expert that has rows. The host copy of the counts is
        # the only sync; experts with no rows cost nothing, which keeps small batches cheap.
        # Views come from one unbind/split per forward, not per-expert indexing: the backward of
        # `w13[e]` or `x[a:b]` zero-fills a gradient the size of the whole stacked tensor for
        # *each* expert (19% of a small-moe training step), while unbind/split backward is one
        # stack/cat of the per-expert gradients.
        w13, w2 = self.w13, self.w2
        if self.act == "swiglu" and self.b13 is None and x_SD.is_cpu and kernels.train_usable(x_SD, w13, w2):
            dt = w13.dtype
            if dt == torch.float32 and torch.is_autocast_enabled("cpu"):
                dt = torch.get_autocast_dtype("cpu")
            if dt in (torch.bfloat16, torch.float32):
                return _GroupedSwiGLU.apply(x_SD, w13, w2, counts, dt)
        if x_SD.is_cpu and w13.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
            # One cast of each stacked weight (and one of its gradient back) instead of autocast's
            # per-expert casts of every slice.
            dt = torch.get_autocast_dtype("cpu")
            w13, w2 = w13.to(dt), w2.to(dt)
        w13_E, w2_E = w13.unbind(0), w2.unbind(0)
        b13_E = [None] * self.num_experts if self.b13 is None else self.b13.unbind(0)
        b2_E = [None] * self.num_experts if self.b2 is None else self.b2.unbind(0)
        outs = [F.linear(self._act(F.linear(x_ND, w13_E[e], b13_E[e])), w2_E[e], b2_E[e])
                for e, x_ND in enumerate(x_SD.split(counts)) if counts[e]]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward_combine(self, x_SD: torch.Tensor, counts_E: torch.Tensor, rows_S: torch.Tensor,
                        weights_S: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
        """Experts and combine in one pass, for inference on CPU (no backward).

        Row s of x_SD is assignment rows_S[s] = t * top_k + k; returns [T, D] in x's dtype with
        out[t] = sum over t's rows of weights_S[s] * expert(x_SD[s]). Same values as
        `Dispatcher.combine(forward(x, counts))` up to float rounding.
        """
        T, K, D = num_tokens, top_k, self.dim
        if x_SD.shape[0] == 0:
            return x_SD.new_zeros(T, D)
        token_S = rows_S // K
        out_TD = torch.zeros(T, D, dtype=torch.float32, device=x_SD.device)
        packed = self.packed_for(x_SD)
        if packed is not None:  # every expert, any row count: one call
            kernels.moe_experts_packed(x_SD, packed, counts_E, dst_S=token_S, scale_S=weights_S, out_ND=out_TD)
            return out_TD.to(x_SD.dtype)
        counts = counts_E.tolist()
        small = self._small_experts(x_SD, counts)
        if any(small):
            self._kernel(x_SD, counts, small, token_S, weights_S, out_TD)
        if any(n and not m for n, m in zip(counts, small)):
            if self.b13 is not None:  # biased experts (gpt-oss): the plain per-expert path
                self._big_per_expert(x_SD, counts, small, token_S, weights_S, out_TD)
            elif kernels.usable(x_SD, self.w13, self.w2):
                self._big_fused(x_SD, counts, small, rows_S, weights_S, T, K, out_TD)
            elif BATCHED_COMBINE:
                self._big_batched(x_SD, counts, small, rows_S, weights_S, T, K, out_TD)
            else:
                self._big_per_expert(x_SD, counts, small, token_S, weights_S, out_TD)
        return out_TD.to(x_SD.dtype)

    def _big_per_expert(self, x_SD, counts, small, token_S, weights_S, out_TD) -> None:
        # Each expert left to oneDNN/MKL accumulates into the float32 [T, D] while its output block
        # is in cache: gather its tokens' partial sums, add w * y, write back. A token appears at
        # most once per expert, so index_copy_ is race-free and deterministic (index_add_ is a
        # per-row loop on CPU and was many times slower).
        start = 0
        for e, n in enumerate(counts):
            if n and not small[e]:
                tok_N = token_S[start:start + n]
                y_ND = self.expert_forward(e, x_SD[start:start + n])
                acc_ND = out_TD.index_select(0, tok_N).addcmul_(y_ND, weights_S[start:start + n].unsqueeze(-1))
                out_TD.index_copy_(0, tok_N, acc_ND)
            start += n

    def _big_fused(self, x_SD, counts, small, rows_S, weights_S, T, K, out_TD) -> None:
        # Plan: 1. each big expert's GEMM pair (oneDNN), its output written straight into its rows
        # of one [S, D] buffer while the hidden block is in cache; 2. one compiled pass adds every
        # token's weighted rows into the float32 accumulator. This replaces 3 ops per expert over
        # float32 rows (index_select, addcmul_, index_copy_): ~7 ms of a 100 ms Mixtral-style block
        # at 2048 tokens.
        S, D = x_SD.shape[0], self.dim
        y_SD = x_SD.new_empty(S, D, dtype=_gemm_dtype(x_SD))
        big_E = [bool(n) and not m for n, m in zip(counts, small)]
        start = 0
        for e, n in enumerate(counts):
            if big_E[e]:
                a_NF = self._act(F.linear(x_SD[start:start + n], as_compute(self.w13[e], x_SD)))
                _linear_into(a_NF, self.w2[e], y_SD[start:start + n])
            start += n
        big_S = torch.repeat_interleave(torch.tensor(big_E), torch.tensor(counts), output_size=S)
        inv_A = torch.full((T * K,), -1, dtype=torch.int64)
        inv_A[rows_S[big_S]] = torch.arange(S)[big_S]
        kernels.combine_rows(y_SD, inv_A, weights_S, out_TD, K)

    def _big_batched(self, x_SD, counts, small, rows_S, weights_S, T, K, out_TD) -> None:
        # Plan (few ops, whatever E: 2 GEMMs per expert written in place, everything else once):
        # 1. gate/up GEMMs of every big expert into one [S, H] buffer (mm with out=, no cat);
        # 2. one activation over all rows; 3. down GEMMs into one [S, D] buffer (rows of kernel
        #    experts stay zero); 4. weight, scatter rows to their t*K+k slot, sum over K in float32.
        S, D = x_SD.shape[0], self.dim
        any_small = any(small)
        dt = _gemm_dtype(x_SD)
        h_SH = x_SD.new_empty(S, self.w13.shape[1], dtype=dt)
        y_SD = x_SD.new_zeros(S, D, dtype=dt) if any_small else x_SD.new_empty(S, D, dtype=dt)
        start = 0
        for e, n in enumerate(counts):
            if n and not small[e]:
                _linear_into(x_SD[start:start + n], self.w13[e], h_SH[start:start + n])
            start += n
        a_SF = self._act(h_SH)
        start = 0
        for e, n in enumerate(counts):
            if n and not small[e]:
                _linear_into(a_SF[start:start + n], self.w2[e], y_SD[start:start + n])
            start += n
        contrib_SD = y_SD.float().mul_(weights_S.unsqueeze(-1))
        if S == T * K and not any_small:
            buf_AD = torch.empty_like(contrib_SD).index_copy_(0, rows_S, contrib_SD)
        else:  # dropped assignments and kernel rows read as zero
            buf_AD = contrib_SD.new_zeros(T * K, D)
            buf_AD.index_copy_(0, rows_S, contrib_SD)
        out_TD.add_(buf_AD.view(T, K, D).sum(1))

    def _small_experts(self, x_SD: torch.Tensor, counts: list[int]) -> list[int]:
        """Row counts of the experts the compiled kernel takes (0 = not the kernel's)."""
        if self.act not in kernels.ACTS or self.b13 is not None or not kernels.usable(x_SD, self.w13, self.w2):
            return [0] * len(counts)
        limit = kernels.max_rows(x_SD.dtype, self.w13.dtype)
        return [n if n <= limit else 0 for n in counts]

    def _kernel(self, x_SD: torch.Tensor, counts: list[int], small: list[int], dst_S: torch.Tensor | None,
                scale_S: torch.Tensor | None, out_ND: torch.Tensor) -> torch.Tensor:
        """Accumulate the `small` experts' rows into float32 out_ND with the compiled kernel."""
        counts_t = torch.tensor(counts)
        return kernels.moe_experts(x_SD, self.w13, self.w2, torch.tensor(small), self.act,
                                   starts_E=counts_t.cumsum(0) - counts_t, dst_S=dst_S, scale_S=scale_S,
                                   out_ND=out_ND)

    def _forward_into(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        # Plan:
        # 1. experts with <= kernels.max_rows(dtype) rows run in one compiled-kernel call (weights
        #    streamed once, no per-expert Python ops), when the kernels are available;
        # 2. the others run as F.linear pairs (oneDNN) written into one preallocated buffer.
        S = x_SD.shape[0]
        packed = self.packed_for(x_SD)
        if packed is not None:
            return kernels.moe_experts_packed(x_SD, packed, torch.tensor(counts), n_out=S).to(x_SD.dtype)
        small = self._small_experts(x_SD, counts)
        if any(small):
            out_SD = self._kernel(x_SD, counts, small, None, None, x_SD.new_zeros(S, self.dim, dtype=torch.float32))
            out_SD = out_SD.to(x_SD.dtype)
        else:
            out_SD = x_SD.new_empty(S, self.dim)
        start = 0
        for e, n in enumerate(counts):
            if n and not small[e]:
                out_SD[start:start + n] = self.expert_forward(e, x_SD[start:start + n])
            start += n
        return out_SD

    def _forward_grouped_mm(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One kernel for all experts with no host sync (CUDA, bf16).
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h = torch._grouped_mm(x_SD, self.w13.transpose(-2, -1), offs=offs)
        e_S = None
        if self.b13 is not None:  # each row's expert, to add its biases (no host sync)
            e_S = torch.repeat_interleave(torch.arange(self.num_experts, device=x_SD.device), counts_E,
                                          output_size=x_SD.shape[0])
            h = h + self.b13[e_S].to(h.dtype)
        y = torch._grouped_mm(self._act(h), self.w2.transpose(-2, -1), offs=offs)
        return y if e_S is None else y + self.b2[e_S].to(y.dtype)


class DenseFFN(nn.Module):
    """A dense FFN (SwiGLU by default): the dense baseline layer and the shared expert."""

    def __init__(self, dim: int, hidden: int, act: str = "swiglu"):
        super().__init__()
        self.act = act
        H = 2 * hidden if act in GATED_ACTS else hidden
        self.w13 = nn.Linear(dim, H, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        if kernels.fused_ok(x_TD, self.act, self, self.w13.weight, self.w2.weight):
            # Decode-sized CPU inference: the whole FFN as one expert of the fused kernel (weights
            # streamed once at GEMV bandwidth; oneDNN's bf16 GEMV reads at about half of it).
            T = x_TD.shape[0]
            one = torch.ones(T, 1)
            y_TD = kernels.moe_experts_topk(x_TD, torch.zeros(T, 1, dtype=torch.int64), one,
                                            self.w13.weight.unsqueeze(0), self.w2.weight.unsqueeze(0), self.act)
            return y_TD.to(x.dtype).view(x.shape)
        w13, w2 = self.w13.weight, self.w2.weight
        h = activate(F.linear(x, as_compute(w13, x)), self.act)
        return F.linear(h, as_compute(w2, h))
