"""Dispatch: route token rows to experts and back. No parameters, so an expert-parallel
dispatcher (all-to-all across ranks) can replace this piece without touching router or experts.

Shape legend: T tokens, D model dim, E experts, K experts per token, A = T*K assignments,
S = rows actually sent to experts (A in dropless mode, fewer when capacity drops some).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit import kernels
from moekit.config import MoEConfig, capacity


@dataclass
class Dispatched:
    """Rows grouped by expert, contiguous per expert in expert order, plus what combine needs."""

    x_SD: torch.Tensor
    counts_E: torch.Tensor
    """Rows per expert (int64, on the tokens' device)."""
    rows_S: torch.Tensor
    """For each row, its flat assignment index t*K + k (so token = rows_S // K)."""
    weights_S: torch.Tensor
    """Combine weight of each row (float32)."""
    num_tokens: int
    top_k: int
    dropped: torch.Tensor
    """Number of assignments dropped for lack of capacity (int64 scalar)."""
    weights_applied: bool = False
    """True when the weights were folded into the expert input (Llama 4 style)."""
    inv_S: torch.Tensor | None = None
    """Dropless training only: the inverse of the rows_S permutation (see `permute_rows`)."""


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, perm_N, inv_N):
        ctx.save_for_backward(inv_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inv_N,) = ctx.saved_tensors
        return g_ND.index_select(0, inv_N), None, None


class _GatherTokens(torch.autograd.Function):
    """x_SD[s] = x_TD[tok_S[s]] where every token has exactly K rows (dropless): the backward sums
    each token's K row gradients in one compiled pass (float32 accumulation)."""

    @staticmethod
    def forward(ctx, x_TD, tok_S, inv_A, top_k):
        ctx.save_for_backward(inv_A)
        ctx.top_k = top_k
        return x_TD.index_select(0, tok_S)

    @staticmethod
    def backward(ctx, g_SD):
        (inv_A,) = ctx.saved_tensors
        return kernels.sum_rows(g_SD, inv_A, None, ctx.top_k), None, None, None


class _CombineRows(torch.autograd.Function):
    """out_TD[t] = sum over t's K rows s of w_S[s] * y_SD[s], float32 accumulation, in y's dtype;
    forward and backward each one compiled pass (dropless training on CPU)."""

    @staticmethod
    def forward(ctx, y_SD, w_S, tok_S, inv_A, top_k):
        ctx.save_for_backward(y_SD, w_S, tok_S)
        return kernels.sum_rows(y_SD, inv_A, w_S, top_k)

    @staticmethod
    def backward(ctx, g_TD):
        y_SD, w_S, tok_S = ctx.saved_tensors
        gy_SD, gw_S = kernels.combine_rows_backward(g_TD, y_SD, tok_S, w_S)
        return gy_SD, gw_S.to(w_S.dtype), None, None, None


def permute_rows(x_ND: torch.Tensor, perm_N: torch.Tensor, inv_N: torch.Tensor) -> torch.Tensor:
    """x_ND[perm_N] for a permutation perm_N of the rows, with inv_N its inverse. The backward is
    another gather (by inv_N); autograd's generic indexing backward is an accumulating index_put,
    which runs as a serial loop on CPU (~3 ms per MoE layer per step on small-moe)."""
    return _PermuteRows.apply(x_ND, perm_N, inv_N)


class Dispatcher:
    """Sort-by-expert dispatch. Dropless unless `capacity_factor` is set, in which case each expert
    keeps at most ceil(cf * T * K / E) assignments, chosen by router weight ("score") or by token
    order ("position"), and the rest are dropped (the token keeps its residual stream only)."""

    local = True
    """Every expert lives in this process (an expert-parallel dispatcher sets False, and only the
    backends that run any dispatcher take its calls)."""

    def __init__(self, cfg: MoEConfig):
        self.num_experts = cfg.num_experts
        self.cfg = cfg

    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 weight_on_input: bool = False) -> Dispatched:
        # Plan:
        # 1. order all T*K assignments by expert (stable, so ties keep the priority order);
        # 2. with a capacity, rank each assignment inside its expert and drop rank >= C;
        # 3. gather the surviving token rows into one [S, D] block, contiguous per expert.
        T, K = topk_ids_TK.shape
        E = self.num_experts
        flat_ids_A = topk_ids_TK.reshape(-1)
        flat_w_A = topk_weights_TK.reshape(-1)
        cf = self.cfg.capacity_factor
        if cf is not None and self.cfg.drop_policy == "score":
            # Highest-weight assignments first, then a stable sort by expert keeps that order.
            prio_A = torch.argsort(flat_w_A, descending=True, stable=True)
            order_A = prio_A[torch.argsort(flat_ids_A[prio_A], stable=True)]
        else:
            # Stable sort on the flat index t*K+k: inside an expert, earlier tokens come first.
            order_A = torch.argsort(flat_ids_A, stable=True)
        counts_E = torch.bincount(flat_ids_A, minlength=E)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        if cf is not None:
            C = capacity(T, self.cfg)
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            rank_A = torch.arange(order_A.numel(), device=x_TD.device) - starts_E[flat_ids_A[order_A]]
            keep_A = rank_A < C
            dropped = (~keep_A).sum()
            order_A = order_A[keep_A]
            counts_E = counts_E.clamp(max=C)
        rows_S = order_A
        weights_S = flat_w_A[rows_S]
        inv_S = None
        if cf is None and torch.is_grad_enabled() and x_TD.requires_grad:
            # Training, dropless: rows_S is a permutation of all T*K assignments, so both the
            # gather here and the scatter in combine are permutations with gather backwards.
            inv_S = torch.empty_like(rows_S)
            inv_S[rows_S] = torch.arange(rows_S.numel(), device=rows_S.device)
            if kernels.train_usable(x_TD) and not weight_on_input:
                x_SD = _GatherTokens.apply(x_TD, rows_S // K, inv_S, K)
            else:
                D = x_TD.shape[-1]
                x_SD = permute_rows(x_TD.unsqueeze(1).expand(T, K, D).reshape(T * K, D), rows_S, inv_S)
        else:
            x_SD = x_TD[rows_S // K]
        if weight_on_input:
            x_SD = x_SD * weights_S.to(x_SD.dtype).unsqueeze(-1)
        return Dispatched(x_SD, counts_E, rows_S, weights_S, T, K, dropped, weight_on_input, inv_S)

    def combine(self, y_SD: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """Weighted sum of each token's expert outputs; dropped assignments contribute zero.

        Rows are scattered into a [T*K, D] buffer and summed over K rather than index_add'ed into
        [T, D]: same cost, but deterministic on every device (no atomics).
        """
        T, K = d.num_tokens, d.top_k
        if d.inv_S is not None and not d.weights_applied and kernels.train_usable(y_SD):
            return _CombineRows.apply(y_SD, d.weights_S, d.rows_S // K, d.inv_S, K)
        if not d.weights_applied:
            # Multiply in float32 then cast: the weights are float32 routing values.
            y_SD = (y_SD.float() * d.weights_S.unsqueeze(-1)).to(y_SD.dtype)
        D = y_SD.shape[-1]
        if d.inv_S is not None:
            return permute_rows(y_SD, d.inv_S, d.rows_S).view(T, K, D).sum(1)
        if K == 1 and y_SD.shape[0] == T:
            out_AD = y_SD.new_empty(T, D)
            out_AD[d.rows_S] = y_SD
            return out_AD
        out_AD = y_SD.new_zeros(T * K, D)
        out_AD[d.rows_S] = y_SD
        return out_AD.view(T, K, D).sum(1)


def loop_reference(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                   experts, weight_on_input: bool = False) -> torch.Tensor:
    """The plain per-expert loop: the reference every faster path is tested against."""
    out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    for e in range(experts.num_experts):
        tok, slot = torch.where(topk_ids_TK == e)
        if tok.numel() == 0:
            continue
        w = topk_weights_TK[tok, slot].float().unsqueeze(-1)
        if weight_on_input:
            y = experts.expert_forward(e, x_TD[tok] * w.to(x_TD.dtype)).float()
        else:
            y = experts.expert_forward(e, x_TD[tok]).float() * w
        out_TD.index_add_(0, tok, y)
    return out_TD.to(x_TD.dtype)
