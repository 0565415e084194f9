"""EPLB at run time in training: replicas' gradients, the global norm with replicas, and moving
expert weights *and* their AdamW moments to a new placement every N steps (vLLM's
`window_size` / `step_interval` knobs).

Shape legend: E logical experts, R physical slots, Rl = R / ep slots on this rank.

Replicas of one logical expert start identical (copied from it), get the same gradient (the sum of
the replicas' gradients = the logical expert's gradient) and the same AdamW update, so they stay
identical and the run computes what one process computes; only the row grouping changes.
"""

from __future__ import annotations

from collections import deque

import torch

from moekit.distributed import eplb
from moekit.distributed.parallel import Layout, gather_experts


def moe_layers(model) -> list:
    from moekit.moe.layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _slots(layer, layout: Layout) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(phy2log [R] or None when contiguous, this rank's logical experts [Rl])."""
    d = layer.dispatcher
    Rl = layer.experts.w13.shape[0]
    if getattr(d, "log2phy", None) is None:
        return None, torch.arange(layout.ep_rank * Rl, (layout.ep_rank + 1) * Rl)
    phy2log = d.phy2log
    return phy2log, phy2log[layout.ep_rank * Rl:(layout.ep_rank + 1) * Rl]


def fold_replica_grads(model, layout: Layout) -> None:
    """Give every replica the sum of its logical expert's replica gradients (collective)."""
    for layer in moe_layers(model):
        phy2log, mine = _slots(layer, layout)
        if phy2log is None:
            continue
        E = layer.cfg.num_experts
        for p in (layer.experts.w13, layer.experts.w2):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            g_all = gather_experts(g, layout)
            g_log = g_all.new_zeros(E, *g_all.shape[1:]).index_add_(0, phy2log, g_all)
            p.grad = g_log[mine].contiguous()


def expert_sq_norm(model, layout: Layout) -> torch.Tensor:
    """This rank's share of the experts' squared gradient norm, each logical expert counted once
    (a replica's square weighted by 1 / its replica count)."""
    total = torch.zeros((), dtype=torch.float64)
    for layer in moe_layers(model):
        d = layer.dispatcher
        phy2log, mine = _slots(layer, layout)
        w = None if phy2log is None else 1.0 / d.logcnt[mine].double()
        for p in (layer.experts.w13, layer.experts.w2):
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2).flatten(1).sum(1)
            total += (sq if w is None else sq * w).sum()
    return total


class EPLBSchedule:
    """Windowed per-expert loads and the rebalance cadence."""

    def __init__(self, interval: int, window: int = 0, redundant: int = 0):
        self.interval, self.redundant = interval, redundant
        self.loads: deque = deque(maxlen=window or None)
        self.placements = 0

    def observe(self, loads_LE: list[torch.Tensor]) -> None:
        self.loads.append(torch.stack([x.double() for x in loads_LE]))

    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0 and len(self.loads) > 0

    def placement(self, num_experts: int, ep: int) -> eplb.Placement:
        R = -(-(num_experts + self.redundant) // ep) * ep
        return eplb.rebalance(sum(self.loads), R, 1, 1, ep)


def move_to_placement(model, layout: Layout, placement: eplb.Placement, opt) -> None:
    """Re-home every MoE layer's slots (weights and AdamW moments) to `placement` (collective).
    The expert Parameters are replaced (their shape changes with the slots per rank) in the model
    and in the optimizer's param groups."""
    from moekit.distributed.ep import EPDispatcher

    P, r = layout.ep, layout.ep_rank
    for i, layer in enumerate(moe_layers(model)):
        d = layer.dispatcher
        R = placement.phy2log.shape[1]
        new = placement.phy2log[i, r * (R // P):(r + 1) * (R // P)]
        first = None if getattr(d, "log2phy", None) is None else d.log2phy[:, 0]

        def rehome(t: torch.Tensor) -> torch.Tensor:
            full = gather_experts(t, layout)
            logical = full if first is None else full[first]
            return logical[new].clone()

        for name in ("w13", "w2"):
            p = getattr(layer.experts, name)
            q = torch.nn.Parameter(rehome(p.detach()))
            if opt is not None:
                # A new Parameter (autograd caches a leaf's shape in its grad accumulator), swapped
                # into the optimizer's groups with its moments re-homed the same way.
                st = opt.state.pop(p, {})
                opt.state[q] = {k: (rehome(v) if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape else v)
                                for k, v in st.items()}
                for g in opt.param_groups:
                    g["params"] = [q if x is p else x for x in g["params"]]
            setattr(layer.experts, name, q)
        layer.experts.num_experts = new.numel()
        layer.experts.unpack()
        layer.dispatcher = EPDispatcher(layer.cfg, layout.ep_group, r, P, {
            "phy2log": placement.phy2log[i], "log2phy": placement.log2phy[i], "logcnt": placement.logcnt[i]})
