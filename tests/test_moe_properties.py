"""Property tests (hypothesis) for routing and dispatch invariants over random E, k, T, D."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from moekit.config import MoEConfig
from moekit.moe import MoELayer, route


@st.composite
def moe_case(draw):
    E = draw(st.integers(1, 12))
    K = draw(st.integers(1, E))
    T = draw(st.integers(1, 40))
    D = draw(st.sampled_from([4, 8, 12]))
    router = draw(st.sampled_from(["topk_softmax", "softmax_topk", "sigmoid_topk"]))
    seed = draw(st.integers(0, 2**16))
    return E, K, T, D, router, seed


def _layer(E, K, D, router, seed, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_dim=6, router=router, **kw)).eval()
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)
    return layer


@settings(max_examples=60, deadline=None)
@given(moe_case())
def test_normalised_weights_sum_to_one(case):
    E, K, T, D, router, seed = case
    torch.manual_seed(seed)
    logits = torch.randn(T, E) * 3
    cfg = MoEConfig(num_experts=E, top_k=K, expert_dim=4, router=router,
                    norm_topk_prob=router != "topk_softmax")
    r = route(logits, cfg)
    assert_close(r.topk_weights_TK.sum(-1), torch.ones(T))
    assert r.topk_ids_TK.shape == (T, K)
    # k distinct experts per token
    assert all(len(set(row)) == K for row in r.topk_ids_TK.tolist())
    assert_close(r.probs_TE.sum(-1), torch.ones(T))


@settings(max_examples=40, deadline=None)
@given(moe_case())
def test_output_is_weighted_sum_of_chosen_experts(case):
    E, K, T, D, router, seed = case
    layer = _layer(E, K, D, router, seed)
    x = torch.randn(1, T, D)
    with torch.no_grad():
        y, rt = layer(x, return_ids=True)
        for t in range(T):
            expect = torch.zeros(D)
            for k in range(K):
                e = int(rt.expert_ids[t, k])
                expect += rt.weights[t, k] * layer.experts.expert_forward(e, x[0, t:t + 1])[0]
            assert_close(y[0, t], expect)
    assert int(rt.tokens_per_expert.sum()) == T * K


@settings(max_examples=40, deadline=None)
@given(moe_case(), st.randoms(use_true_random=False))
def test_permuting_tokens_permutes_outputs(case, rnd):
    E, K, T, D, router, seed = case
    layer = _layer(E, K, D, router, seed)
    x = torch.randn(T, D)
    perm = list(range(T))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    with torch.no_grad():
        y, r = layer(x.view(1, T, D))
        yp, rp = layer(x[perm].view(1, T, D))
    assert_close(yp[0], y[0][perm])
    assert torch.equal(r.tokens_per_expert, rp.tokens_per_expert)


@settings(max_examples=30, deadline=None)
@given(moe_case(), st.floats(0.25, 2.0), st.sampled_from(["score", "position"]))
def test_capacity_never_exceeded_and_drops_counted(case, cf, policy):
    E, K, T, D, router, seed = case
    layer = _layer(E, K, D, router, seed, capacity_factor=cf, drop_policy=policy)
    x = torch.randn(1, T, D)
    with torch.no_grad():
        _, r = layer(x)
        d = layer.dispatcher.dispatch(x.view(T, D), *_ids_weights(layer, x.view(T, D)))
    from moekit.config import capacity

    C = capacity(T, layer.cfg)
    assert int(d.counts_E.max()) <= C
    assert int(d.counts_E.sum()) + int(d.dropped) == T * K
    assert int(r.dropped) == int(d.dropped) == int((r.tokens_per_expert - C).clamp(min=0).sum())


def _ids_weights(layer, x_TD):
    ro = layer.router(x_TD)
    return ro.topk_ids_TK, ro.topk_weights_TK
