"""Expert-parallel load balancing (EPLB): redundant replicas of hot experts and balanced packing
of the replicas onto ranks, after DeepSeek's EPLB (github.com/deepseek-ai/EPLB; written here from
its description and published example, which `tests/test_eplb.py` reproduces exactly).

Shape legend: L layers, E logical experts, R physical expert slots (E + redundant), G ranks
(GPUs), N nodes, Gr expert groups, M max replicas of one expert.

Maps (per layer): `phy2log[L, R]` the logical expert in each physical slot (slot s lives on rank
s // (R / G)); `log2phy[L, E, M]` the slots of each logical expert (-1 padded); `logcnt[L, E]`
its replica count. A token routed to a replicated expert goes to one of its replicas; the load
model here (DeepSeek's and vLLM's) splits an expert's tokens evenly over its replicas.

Balancedness (SGLang's definition, per layer): mean over ranks of the tokens a rank processes
divided by the max over ranks; 1.0 is perfect, 1/G is everything on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.errors import MoekitError


class EPLBError(MoekitError, ValueError):
    """A placement that cannot be built (slot and rank counts that do not divide)."""


@dataclass
class Placement:
    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    num_ranks: int

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[1] // self.num_ranks

    def to_dict(self) -> dict:
        return {"phy2log": self.phy2log.tolist(), "logcnt": self.logcnt.tolist(), "num_ranks": self.num_ranks}


def balanced_packing(weight_XN: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the N items of each row into `num_packs` packs of exactly N / num_packs items each,
    heaviest item first into the currently lightest pack that still has room (ties: lowest pack).
    Returns (pack index, rank inside the pack), both [X, N]."""
    X, N = weight_XN.shape
    per = N // num_packs
    pack = torch.full((X, N), -1, dtype=torch.int64)
    rank = torch.full((X, N), -1, dtype=torch.int64)
    if per == 1:
        return torch.arange(N).expand(X, N).clone(), torch.zeros(X, N, dtype=torch.int64)
    for x in range(X):
        load = [0.0] * num_packs
        count = [0] * num_packs
        for item in torch.sort(weight_XN[x].double(), descending=True, stable=True).indices.tolist():
            p = min((q for q in range(num_packs) if count[q] < per), key=lambda q: (load[q], q))
            pack[x, item], rank[x, item] = p, count[p]
            load[p] += float(weight_XN[x, item])
            count[p] += 1
    return pack, rank


def replicate_experts(weight_XE: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each of the num_slots - E extra slots to the expert with the highest load per replica
    (ties: lowest id). Returns (slot -> expert [X, S], replica index of each slot [X, S], replica
    counts [X, E]); slot e < E holds expert e's first replica."""
    X, E = weight_XE.shape
    slot2e = torch.arange(num_slots).remainder(E).expand(X, num_slots).clone()
    replica = torch.zeros(X, num_slots, dtype=torch.int64)
    cnt = torch.ones(X, E, dtype=torch.int64)
    w = weight_XE.double()
    for s in range(E, num_slots):
        hot = (w / cnt).argmax(-1)
        rows = torch.arange(X)
        slot2e[:, s] = hot
        replica[:, s] = cnt[rows, hot]
        cnt[rows, hot] += 1
    return slot2e, replica, cnt


def _inverse(perm_XN: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm_XN)
    inv.scatter_(1, perm_XN, torch.arange(perm_XN.shape[1]).expand_as(perm_XN).clone())
    return inv


def hierarchical(weight_LE: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int,
                 num_ranks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek's hierarchical policy. Plan:
    1. pack expert groups onto nodes (balanced_packing of group loads), so a group-limited token
       (DeepSeek-V3: at most `topk_group` groups) crosses few nodes; renumber experts node-major;
    2. inside each node, replicate its hottest experts into the node's slots;
    3. pack each node's replicas (load = expert load / replica count) onto the node's ranks.
    Returns (phy2log [L, R], replica index of each slot [L, R], logcnt [L, E])."""
    L, E = weight_LE.shape
    for a, b, what in ((E, num_groups, "experts by groups"), (num_groups, num_nodes, "groups by nodes"),
                       (num_ranks, num_nodes, "ranks by nodes"), (num_slots, num_ranks, "slots by ranks")):
        if a % b:
            raise EPLBError(f"EPLB needs {what} to divide evenly ({a} % {b} != 0)")
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    e_node, r_node, s_node = E // num_nodes, num_ranks // num_nodes, num_slots // num_nodes
    # 1. groups -> nodes; log2mlog: expert id -> node-major ("middle") id.
    group_load = weight_LE.double().view(L, num_groups, group_size).sum(-1)
    gpack, grank = balanced_packing(group_load, num_nodes)
    first = (gpack * groups_per_node + grank) * group_size
    log2mlog = (first.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    mlog2log = _inverse(log2mlog)
    # 2. replicas inside each node (rows = (layer, node)).
    w_mlog = weight_LE.double().gather(-1, mlog2log).view(L * num_nodes, e_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(w_mlog, s_node)
    # 3. replicas -> ranks of the node; slot order: rank-major, then position inside the rank.
    w_phy = (w_mlog / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in = balanced_packing(w_phy, r_node)
    pphy2phy = _inverse(pack * (s_node // r_node) + rank_in)
    pphy2mlog = phy2mlog.gather(-1, pphy2phy).view(L, num_nodes, s_node)
    pphy2mlog = (pphy2mlog + torch.arange(num_nodes).view(1, -1, 1) * e_node).flatten(-2)
    phy2log = mlog2log.gather(-1, pphy2mlog)
    pphyrank = phyrank.gather(-1, pphy2phy).view(L, -1)
    logcnt = mlogcnt.view(L, -1).gather(-1, log2mlog)
    return phy2log, pphyrank, logcnt


def rebalance(weight_LE: torch.Tensor, num_slots: int, num_groups: int, num_nodes: int,
              num_ranks: int) -> Placement:
    """Placement from per-expert loads: hierarchical when the groups divide over the nodes, else
    global (= hierarchical with one group on one node)."""
    w = torch.as_tensor(weight_LE).double()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    L, E = w.shape
    if num_slots < E:
        raise EPLBError(f"{num_slots} physical slots cannot hold {E} experts; use --redundant >= 0")
    if num_groups >= 1 and num_groups % num_nodes == 0 and E % num_groups == 0:
        phy2log, rank, logcnt = hierarchical(w, num_slots, num_groups, num_nodes, num_ranks)
    else:
        phy2log, rank, logcnt = hierarchical(w, num_slots, 1, 1, num_ranks)
    M = num_slots - E + 1
    log2phy = torch.full((L, E * M), -1, dtype=torch.int64)
    log2phy.scatter_(-1, phy2log * M + rank, torch.arange(num_slots).expand(L, -1).clone())
    return Placement(phy2log, log2phy.view(L, E, M), logcnt, num_ranks)


def contiguous(num_experts: int, num_ranks: int, num_layers: int = 1) -> Placement:
    """The plain EP layout (expert e on rank e // (E / G)) as a Placement, for comparisons."""
    if num_experts % num_ranks:
        raise EPLBError(f"{num_experts} experts do not divide over {num_ranks} ranks")
    phy2log = torch.arange(num_experts).expand(num_layers, -1).clone()
    return Placement(phy2log, phy2log.unsqueeze(-1).clone(), torch.ones(num_layers, num_experts, dtype=torch.int64),
                     num_ranks)


def rank_loads(weight_LE: torch.Tensor, p: Placement) -> torch.Tensor:
    """Tokens per rank [L, G] when each expert's load is split evenly over its replicas."""
    w = torch.as_tensor(weight_LE).double()
    if w.dim() == 1:
        w = w.unsqueeze(0)
    per_slot = (w / p.logcnt).gather(-1, p.phy2log)
    return per_slot.view(w.shape[0], p.num_ranks, -1).sum(-1)


def balancedness(loads_LG: torch.Tensor) -> torch.Tensor:
    """SGLang's balancedness per layer: mean / max tokens per rank (1 = perfectly even)."""
    loads = loads_LG.double()
    return loads.mean(-1) / loads.max(-1).values.clamp(min=1e-12)
