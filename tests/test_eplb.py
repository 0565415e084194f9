"""EPLB: DeepSeek's published example reproduced exactly, map invariants (hypothesis), SGLang
balancedness."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.distributed.eplb import EPLBError, balancedness, contiguous, rank_loads, rebalance

# deepseek-ai/EPLB README example: 2 layers, 12 experts in 4 groups, 16 slots, 2 nodes x 4 GPUs.
WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_reproduces_deepseek_readme_example():
    p = rebalance(WEIGHT, num_slots=16, num_groups=4, num_nodes=2, num_ranks=8)
    assert p.phy2log.tolist() == PHY2LOG
    assert p.logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    # max/mean tokens per GPU after balancing (the inverse of balancedness): 1.208 and 1.242.
    torch.testing.assert_close(1 / balancedness(rank_loads(WEIGHT, p)),
                               torch.tensor([1.2081, 1.2422], dtype=torch.float64), atol=1e-4, rtol=0)


def test_global_policy_on_one_node_improves_on_contiguous():
    before = 1 / balancedness(rank_loads(WEIGHT, contiguous(12, 4, 2)))
    rearranged = 1 / balancedness(rank_loads(WEIGHT, rebalance(WEIGHT, 12, 1, 1, 4)))
    redundant = 1 / balancedness(rank_loads(WEIGHT, rebalance(WEIGHT, 16, 1, 1, 4)))
    torch.testing.assert_close(before, torch.tensor([1.2778, 1.7855], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(rearranged, torch.tensor([1.0726, 1.0104], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(redundant, torch.tensor([1.0668, 1.0104], dtype=torch.float64), atol=1e-4, rtol=0)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(EPLBError, match="slots by ranks"):
        rebalance(WEIGHT, 15, 1, 1, 4)
    with pytest.raises(EPLBError, match="cannot hold"):
        rebalance(WEIGHT, 8, 1, 1, 4)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(8, 2, 1, 2), (8, 4, 2, 4), (16, 4, 2, 8), (12, 4, 2, 4), (6, 3, 2, 2)]),
       st.integers(0, 2), st.data())
def test_maps_are_consistent(L, shape, extra_per_rank, data):
    E, groups, nodes, ranks = shape
    R = E + extra_per_rank * ranks
    w = torch.tensor(data.draw(st.lists(st.integers(0, 1000), min_size=L * E, max_size=L * E))).view(L, E)
    p = rebalance(w, R, groups, nodes, ranks)
    assert p.phy2log.shape == (L, R)
    for layer in range(L):
        slots = p.phy2log[layer].tolist()
        assert set(slots) == set(range(E))  # every expert has a replica
        assert [slots.count(e) for e in range(E)] == p.logcnt[layer].tolist()
        for e in range(E):
            phys = [s for s in p.log2phy[layer, e].tolist() if s >= 0]
            assert sorted(phys) == [s for s in range(R) if slots[s] == e]
    loads = rank_loads(w, p)
    torch.testing.assert_close(loads.sum(-1), w.double().sum(-1))  # tokens conserved
    b = balancedness(loads)
    busy = w.sum(-1) > 0
    assert ((b[busy] > 0) & (b[busy] <= 1 + 1e-12)).all()
    # Each rank holds exactly R / ranks slots, so the per-rank load never exceeds the total.
    assert (loads <= w.double().sum(-1, keepdim=True) + 1e-9).all()
