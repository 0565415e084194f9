"""Expert parallelism: an all-to-all token dispatcher behind the local Dispatcher's interface.

Shape legend: T local tokens, D model dim, K experts per token, A = T*K local assignments,
E global experts, El = E / ep experts on this rank, N rows received from all ranks, S rows kept
for the local experts (N in dropless mode), P = ep ranks of the EP group.

Design (torchtitan's AllToAllTokenDispatcher, written against torch.distributed):
  dispatch  1. sort the A assignments by global expert id (stable: position order inside an expert);
            2. exchange per-expert counts with all_to_all_single (each rank learns how many rows
               every peer sends to each of its local experts) - the one host sync;
            3. all_to_all_single of the sorted rows with split sizes (rows per destination rank);
            4. reorder the received rows rank-major (r0:e0,e1..., r1:e0,e1...) to expert-major
               (e0:r0,r1..., e1:r0,r1...) by index arithmetic, so each local expert's rows are
               contiguous for `GroupedExperts`;
            5. with a capacity factor, drop at the expert's owner: it sees the expert's rows from
               every rank in global token order, so it keeps exactly the assignments one process
               would keep on the concatenated batch (policy "score" ranks by the routing weight,
               sent alongside as float32).
  combine   the reverse: scatter kept rows back (dropped ones as zeros), expert-major to
            rank-major, all_to_all_single back, then each token's K rows are weighted in float32
            and summed over K from a [T*K, D] buffer (a deterministic scatter: every slot written
            once, no atomics), the same reduction order as the local Dispatcher.
Autograd flows through both collectives: the backward of an all-to-all is the all-to-all with
the split sizes swapped (`_AllToAll`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moekit.config import MoEConfig, capacity
from moekit.moe.dispatch import permute_rows

_WIRE = (torch.bfloat16, torch.float16)
"""Dtypes sent bit-for-bit as bytes: gloo's all-to-all has no bf16 (nor int16) kernels."""


COMM = {"calls": 0, "seconds": 0.0, "bytes": 0}
"""Every all-to-all of this process (forward, backward, count exchanges): wall seconds inside the
collective (waiting for the slowest peer included) and bytes sent to other ranks. Benchmarks reset
and read it (`benchmarks/ep_alltoall.py`)."""


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Rows `in_splits[r]` of x go to rank r; returns the rows received (`out_splits[r]` from rank r)."""
    x = x.contiguous()
    wire = x.dtype in _WIRE and x.dim() > 0
    src = x.view(torch.uint8) if wire else x  # last dim doubles: same bytes, no conversion
    out = src.new_empty((sum(out_splits), *src.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(out, src, out_splits, in_splits, group=group)
    COMM["seconds"] += time.perf_counter() - t0
    COMM["calls"] += 1
    row = math.prod(x.shape[1:]) * x.element_size()
    COMM["bytes"] += (sum(in_splits) - in_splits[dist.get_rank(group)]) * row
    return out.view(x.dtype) if wire else out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return all_to_all(g, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_autograd(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class EPDispatched:
    """What `EPDispatcher.combine` needs, plus the rows for the local experts (same field names as
    `moekit.moe.dispatch.Dispatched` where they mean the same thing)."""

    x_SD: torch.Tensor
    counts_E: torch.Tensor
    """Rows per *local* expert [El] (int64)."""
    num_tokens: int
    top_k: int
    dropped: torch.Tensor
    """Assignments this rank dropped as the owner of their expert (sum over ranks = the total)."""
    order_A: torch.Tensor
    """Local assignments sorted by expert: row i sent = assignment order_A[i] = t*K + k."""
    inv_A: torch.Tensor
    weights_A: torch.Tensor
    """Combine weights in order_A order (float32)."""
    in_splits: list[int]
    out_splits: list[int]
    perm_N: torch.Tensor
    """Received row (rank-major) feeding expert-major row n."""
    inv_N: torch.Tensor
    keep_N: torch.Tensor | None
    """Capacity mode: expert-major indices of the kept rows."""
    weights_applied: bool = False
    weights_S: torch.Tensor | None = None
    bytes: dict[str, int] = field(default_factory=dict)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def rank_major_to_expert_major(counts_PE: torch.Tensor) -> torch.Tensor:
    """perm[n] = index in the rank-major buffer of expert-major row n, for segment lengths
    counts_PE[r, e] (rows from rank r for local expert e)."""
    P, El = counts_PE.shape
    starts_PE = _exclusive_cumsum(counts_PE.reshape(-1)).view(P, El)
    lens_em = counts_PE.t().reshape(-1)
    starts_em = starts_PE.t().reshape(-1)
    n = int(lens_em.sum())
    seg_base = torch.repeat_interleave(starts_em - _exclusive_cumsum(lens_em), lens_em, output_size=n)
    return seg_base + torch.arange(n, dtype=torch.int64, device=counts_PE.device)


class EPDispatcher:
    """All-to-all dispatch over an expert-parallel process group. Drop-in for
    `moekit.moe.dispatch.Dispatcher`.

    Without a placement, experts are sharded contiguously (rank r owns global experts
    [r*El, (r+1)*El)). With an EPLB placement for this layer (`phy2log` [R] slots, `log2phy` [E, M],
    `logcnt` [E]), rank r owns slots [r*R/P, (r+1)*R/P) and assignment a = t*K + k of logical
    expert e goes to replica a mod logcnt[e] (vLLM's deterministic choice); the rest of the
    pipeline is the same with slots in place of experts."""

    local = False

    def __init__(self, cfg: MoEConfig, group, ep_rank: int, ep_size: int, placement: dict | None = None):
        self.cfg, self.group = cfg, group
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.log2phy = self.logcnt = None
        slots = cfg.num_experts
        if placement is not None:
            if cfg.capacity_factor is not None:
                raise ValueError("replicated experts (EPLB placement) need dropless routing: capacity is per "
                                 "logical expert and would be split between replicas")
            self.log2phy, self.logcnt = placement["log2phy"], placement["logcnt"]
            self.phy2log = placement["phy2log"]
            slots = int(placement["phy2log"].numel())
        if slots % ep_size:
            raise ValueError(f"{slots} expert slots are not divisible by the EP degree {ep_size}")
        self.num_experts = slots
        self.local_experts = slots // ep_size
        self.last_bytes: dict[str, int] = {}
        """Bytes this rank sent to *other* ranks in the last dispatch/combine (for the simulator)."""

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                 weight_on_input: bool = False) -> EPDispatched:
        # Plan: see the module docstring (steps 1-5).
        T, K = topk_ids_TK.shape
        P, El, E = self.ep_size, self.local_experts, self.num_experts
        flat_ids_A = topk_ids_TK.reshape(-1)
        if self.log2phy is not None:  # logical expert -> the physical slot of its chosen replica
            rep_A = torch.arange(flat_ids_A.numel(), device=flat_ids_A.device) % self.logcnt[flat_ids_A]
            flat_ids_A = self.log2phy[flat_ids_A, rep_A]
        # 1. sort by expert (stable: position order inside each expert).
        order_A = torch.argsort(flat_ids_A, stable=True)
        inv_A = torch.empty_like(order_A)
        inv_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
        weights_A = topk_weights_TK.reshape(-1)[order_A].float()
        counts_E = torch.bincount(flat_ids_A, minlength=E)
        # 2. per-expert counts: recv_PE[r, e] = rows rank r sends to my local expert e.
        recv_PE = all_to_all(counts_E.view(P, El), [1] * P, [1] * P, self.group).view(P, El)
        in_splits = counts_E.view(P, El).sum(1).tolist()
        out_splits = recv_PE.sum(1).tolist()
        # 3. rows to their experts' ranks (gathered by token, so the backward sums each token's K rows).
        x_AD = x_TD.index_select(0, order_A // K)
        if weight_on_input:
            x_AD = x_AD * weights_A.to(x_AD.dtype).unsqueeze(-1)
        x_ND = all_to_all_autograd(x_AD, out_splits, in_splits, self.group)
        # 4. rank-major -> expert-major.
        perm_N = rank_major_to_expert_major(recv_PE)
        inv_N = torch.empty_like(perm_N)
        inv_N[perm_N] = torch.arange(perm_N.numel(), device=perm_N.device)
        x_SD = permute_rows(x_ND, perm_N, inv_N)
        counts_local = recv_PE.sum(0)
        dropped = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        keep_N = None
        # 5. capacity: the owner keeps the first C rows of each expert in priority order.
        if self.cfg.capacity_factor is not None:
            keep_N, counts_local = self._keep(T, weights_A, out_splits, in_splits, perm_N, counts_local)
            dropped = torch.tensor(int(perm_N.numel() - keep_N.numel()), device=x_TD.device)
            x_SD = x_SD.index_select(0, keep_N)
        elem = x_AD.element_size() * x_AD.shape[-1]
        me = self.ep_rank
        remote_rows = sum(n for r, n in enumerate(in_splits) if r != me)
        self.last_bytes = {"dispatch": remote_rows * elem, "combine": 0,
                           "counts": (P - 1) * El * counts_E.element_size()}
        return EPDispatched(x_SD, counts_local, T, K, dropped, order_A, inv_A, weights_A, in_splits, out_splits,
                            perm_N, inv_N, keep_N, weight_on_input, bytes=self.last_bytes)

    def _keep(self, T, weights_A, out_splits, in_splits, perm_N, counts_local):
        """Expert-major indices of the rows each local expert keeps under the capacity factor."""
        cfg = self.cfg
        # Capacity of the global batch: every rank of the group holds T tokens.
        t_all = torch.tensor([T], dtype=torch.int64, device=weights_A.device)
        dist.all_reduce(t_all, group=self.group)
        C = capacity(int(t_all), cfg)
        counts = counts_local.tolist()
        if cfg.drop_policy == "score":
            w_N = all_to_all(weights_A.detach(), out_splits, in_splits, self.group)[perm_N]
        keep, start = [], 0
        for n in counts:
            idx = torch.arange(start, start + n, device=perm_N.device)
            if n > C:
                if cfg.drop_policy == "score":
                    # Highest weight first; stable, so ties keep global token order (as one process).
                    idx = idx[torch.argsort(w_N[start:start + n], descending=True, stable=True)[:C]].sort().values
                else:
                    idx = idx[:C]
            keep.append(idx)
            start += n
        keep_N = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.int64, device=perm_N.device)
        return keep_N, counts_local.clamp(max=C)

    # ------------------------------------------------------------------- combine
    def combine(self, y_SD: torch.Tensor, d: EPDispatched) -> torch.Tensor:
        T, K, D = d.num_tokens, d.top_k, y_SD.shape[-1]
        if d.x_SD.requires_grad and not y_SD.requires_grad:
            # No rows reached this rank's experts (the experts return a fresh empty tensor): keep the
            # graph connected, or this rank would skip the backward all-to-alls its peers run (hang).
            y_SD = y_SD + d.x_SD.sum().to(y_SD.dtype) * 0
        if d.keep_N is not None:  # dropped rows go back as zeros
            y_SD = y_SD.new_zeros(d.perm_N.numel(), D).index_copy(0, d.keep_N, y_SD)
        y_ND = permute_rows(y_SD, d.inv_N, d.perm_N)  # expert-major -> rank-major
        y_AD = all_to_all_autograd(y_ND, d.in_splits, d.out_splits, self.group)
        # Sent back: the rows this rank received (out_splits), less its own.
        self.last_bytes["combine"] = sum(n for r, n in enumerate(d.out_splits) if r != self.ep_rank) * \
            y_AD.element_size() * D
        d.bytes["combine"] = self.last_bytes["combine"]
        y32_AD = y_AD.float()
        if not d.weights_applied:
            y32_AD = y32_AD * d.weights_A.unsqueeze(-1)
        # Deterministic scatter: slot t*K+k written exactly once, then a fixed-order sum over K.
        out_TKD = permute_rows(y32_AD, d.inv_A, d.order_A).view(T, K, D)
        return out_TKD.sum(1).to(y_SD.dtype)
