"""Cost-aware routing, dynamic-k / budgets, the expected-cost penalty and heterogeneous-width experts
(moekit.moe.cost, moekit.moe.router.route, the `masked` backend, GroupedExperts widths)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import kernels
from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.errors import MoekitError
from moekit.model.params import count_params, padded_expert_params
from moekit.model.transformer import build_model
from moekit.moe import backends
from moekit.moe.cost import CostPlan, clear_routing_cost, normalise, set_routing_cost, spent_flops
from moekit.moe.dispatch import loop_reference
from moekit.moe.layer import MoELayer
from moekit.moe.router import route

ROUTERS = [("topk_softmax", False), ("softmax_topk", True), ("sigmoid_topk", True), ("softmax_topk", False)]


def _cfg(router="topk_softmax", norm=False, E=8, K=2, **kw) -> MoEConfig:
    return MoEConfig(num_experts=E, top_k=K, expert_dim=16, router=router, norm_topk_prob=norm, **kw)


def _plan(cost_E, lam=0.0, budget=None, dyn=0.0, k=2) -> CostPlan:
    return CostPlan(lam, normalise(torch.as_tensor(cost_E, dtype=torch.float32)), budget, dyn, k)


@pytest.mark.parametrize("router,norm", ROUTERS)
def test_lambda_zero_is_plain_topk_exactly(router, norm):
    torch.manual_seed(0)
    cfg = _cfg(router, norm)
    logits = torch.randn(64, 8)
    bias = torch.randn(8) * 0.1 if router == "sigmoid_topk" else None
    plain = route(logits, cfg, bias)
    costly = route(logits, cfg, bias, _plan(torch.rand(8) * 5))  # a plan with lambda 0 (e.g. for the penalty)
    assert torch.equal(plain.topk_ids_TK, costly.topk_ids_TK)
    assert torch.equal(plain.topk_weights_TK, costly.topk_weights_TK)  # bitwise
    assert costly.mask_TK is None
    # ...and plain routing is a hand-written top-k.
    if router == "topk_softmax":
        ref = logits.topk(2, -1)
        assert torch.equal(plain.topk_ids_TK, ref.indices)
        assert torch.equal(plain.topk_weights_TK, ref.values.softmax(-1))
    # Through the module API: an override with lambda 0 changes nothing either.
    layer = MoELayer(32, dataclasses.replace(cfg, score_correction_bias=bias is not None))
    x = torch.randn(16, 32)
    a = layer.router(x)

    class M(torch.nn.Module):
        def moe_layers(self):
            return [layer]

    set_routing_cost(M(), lam=0.0, cost=torch.rand(8).tolist())
    b = layer.router(x)
    clear_routing_cost(M())
    assert torch.equal(a.topk_ids_TK, b.topk_ids_TK) and torch.equal(a.topk_weights_TK, b.topk_weights_TK)


@pytest.mark.parametrize("router,norm", ROUTERS)
def test_large_lambda_picks_only_the_cheapest_experts(router, norm):
    torch.manual_seed(1)
    cfg = _cfg(router, norm)
    logits = torch.randn(50, 8) * 3
    cost = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0]  # experts 1 and 5 are free
    r = route(logits, cfg, None, _plan(cost, lam=1e4))
    assert set(r.topk_ids_TK.flatten().tolist()) == {1, 5}
    # Weights still come from the unpenalised scores of the chosen experts.
    plain_w = route(logits, cfg).topk_weights_TK
    base = {"topk_softmax": logits, "softmax_topk": logits.softmax(-1), "sigmoid_topk": logits.sigmoid()}[router]
    w = base.gather(1, r.topk_ids_TK)
    w = w.softmax(-1) if router == "topk_softmax" else (w / w.sum(-1, keepdim=True) if norm else w)
    torch.testing.assert_close(r.topk_weights_TK, w)
    assert not torch.equal(r.topk_weights_TK, plain_w)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.floats(0.0, 3.0), k=st.integers(1, 4),
       router=st.sampled_from(["topk_softmax", "softmax_topk", "sigmoid_topk"]), lam=st.sampled_from([0.0, 0.05, 2.0]),
       dyn=st.sampled_from([0.0, 0.5, 0.9]))
def test_budget_is_never_exceeded(seed, budget, k, router, lam, dyn):
    g = torch.Generator().manual_seed(seed)
    E = 6
    cfg = _cfg(router, True, E=E, K=k)
    logits = torch.randn(40, E, generator=g) * 2
    cost_E = normalise(torch.rand(E, generator=g) + 0.05)
    budget = max(budget, float(cost_E.min()))  # set_routing_cost refuses budgets below the cheapest expert
    r = route(logits, cfg, None, CostPlan(lam, cost_E, budget, dyn, k))
    ids, mask, w = r.topk_ids_TK, r.mask_TK, r.topk_weights_TK
    spent = (cost_E[ids] * mask).sum(-1)
    assert (spent <= budget + 1e-6).all(), (spent.max(), budget)
    assert (mask.sum(-1) >= 1).all() and (mask.sum(-1) <= k).all()
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()  # distinct ids per token (padding included)
    assert (w[~mask] == 0).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), p=st.floats(0.05, 1.0), router=st.sampled_from(["topk_softmax", "softmax_topk"]))
def test_dynamic_k_is_top_p(seed, p, router):
    g = torch.Generator().manual_seed(seed)
    cfg = _cfg(router, True, E=8, K=4)
    logits = torch.randn(30, 8, generator=g) * 2
    r = route(logits, cfg, None, CostPlan(0.0, torch.zeros(8), None, p, 4))
    probs = logits.softmax(-1)
    n = r.mask_TK.sum(-1)
    ref = logits.topk(4, -1).indices
    for t in range(30):
        pt = probs[t, ref[t]]
        cum = pt.cumsum(0)
        want = min(4, int((cum < p).sum()) + 1)  # add experts while the covered probability is below p
        assert int(n[t]) == want
        assert torch.equal(r.topk_ids_TK[t, : want], ref[t, : want])
    torch.testing.assert_close(r.topk_weights_TK.sum(-1), torch.ones(30))


def _layer(cfg: MoEConfig, D=32, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(D, cfg).eval()


def _backend_names() -> list[str]:
    names = ["reference", "torch", "masked"]
    if kernels.available():
        names += ["cpu-grouped", "cpu-fused-topk", "cpu-packed"]
    return names


@pytest.mark.parametrize("variant", ["dynamic_k", "budget"])
def test_every_backend_agrees_on_variable_k(variant):
    kw = {"dynamic_k": 0.6} if variant == "dynamic_k" else {"cost_budget": 1.6, "cost_lambda": 0.05,
                                                             "expert_dims": [16, 8, 16, 12, 4, 16, 10, 16]}
    cfg = _cfg("softmax_topk", True, K=3, **kw)
    layer = _layer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)  # confident enough that token counts differ
    x = torch.randn(40, 32)
    r = layer.router(x)
    assert r.mask_TK is not None and 1 <= int(r.mask_TK.sum(-1).min()) < int(r.mask_TK.sum(-1).max())
    ref = loop_reference(x, r.topk_ids_TK, r.topk_weights_TK, layer.experts)
    layer.experts.pack()
    with torch.no_grad():
        for name in _backend_names():
            call = backends.ExpertCall(layer, x, r.topk_ids_TK, r.topk_weights_TK, mask_TK=r.mask_TK)
            if backends.get(name).why_not(call) is not None:
                continue
            out, _ = backends.get(name).run(call)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4, msg=name)
        layer.experts.unpack()
        y, routing = layer(x.view(4, 10, 32))  # automatic choice: the masked backend
        assert backends.select(backends.ExpertCall(layer, x, r.topk_ids_TK, r.topk_weights_TK,
                                                   mask_TK=r.mask_TK)).name == "masked"
    torch.testing.assert_close(y.view(40, 32), ref, atol=1e-5, rtol=1e-4)
    flops = torch.tensor(layer.flops_E, dtype=torch.float64)
    assert spent_flops(layer, routing) == float((flops[r.topk_ids_TK] * r.mask_TK).sum())
    assert int(routing.tokens_per_expert.sum()) == int(r.mask_TK.sum())
    # Training through the masked backend: gradients equal the reference loop's.
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    layer.train()
    r1 = layer.router(x1)
    call = backends.ExpertCall(layer, x1, r1.topk_ids_TK, r1.topk_weights_TK, mask_TK=r1.mask_TK)
    o1, _ = backends.get("masked").run(call)
    g1 = torch.autograd.grad(o1.square().sum(), [x1, layer.experts.w13, layer.router.weight])
    r2 = layer.router(x2)
    o2 = loop_reference(x2, r2.topk_ids_TK, r2.topk_weights_TK, layer.experts)
    g2 = torch.autograd.grad(o2.square().sum(), [x2, layer.experts.w13, layer.router.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_heterogeneous_experts_equal_a_per_expert_loop():
    widths = [16, 8, 12, 4]
    cfg = MoEConfig(num_experts=4, top_k=2, expert_dim=16, expert_dims=widths)
    layer = _layer(cfg, D=24).train()
    ex = layer.experts
    # Padded units start at zero.
    assert (ex.w13[1, 8:16] == 0).all() and (ex.w13[1, 24:] == 0).all() and (ex.w2[3, :, 4:] == 0).all()
    # The reference: separate narrow SwiGLU FFNs holding copies of the real weights.
    ffns = []
    for e, w in enumerate(widths):
        g = ex.w13[e, :w].detach().clone().requires_grad_(True)
        u = ex.w13[e, 16:16 + w].detach().clone().requires_grad_(True)
        d = ex.w2[e, :, :w].detach().clone().requires_grad_(True)
        ffns.append((g, u, d))
    x = torch.randn(30, 24)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    r = layer.router(xa)
    ya, _ = backends.get("torch").run(backends.ExpertCall(layer, xa, r.topk_ids_TK, r.topk_weights_TK))
    ids, w = r.topk_ids_TK, layer.router(xb).topk_weights_TK  # the same routing, its own graph
    yb = torch.zeros(30, 24)
    for t in range(30):
        for k in range(2):
            g, u, d = ffns[int(ids[t, k])]
            y = w[t, k] * F.linear(F.silu(F.linear(xb[t], g)) * F.linear(xb[t], u), d)
            yb = yb.index_add(0, torch.tensor([t]), y[None])
    torch.testing.assert_close(ya, yb, atol=1e-6, rtol=1e-5)
    gy = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, ex.w13, ex.w2], gy, retain_graph=True)
    gb = torch.autograd.grad(yb, [xb] + [p for f in ffns for p in f], gy)
    torch.testing.assert_close(ga[0], gb[0], atol=1e-6, rtol=1e-5)
    for e, wd in enumerate(widths):
        g, u, d = gb[1 + 3 * e: 4 + 3 * e]
        torch.testing.assert_close(ga[1][e, :wd], g, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ga[1][e, 16:16 + wd], u, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ga[2][e, :, :wd], d, atol=1e-6, rtol=1e-5)
        # Padded units get exactly zero gradient, so they stay zero under AdamW.
        assert (ga[1][e, wd:16] == 0).all() and (ga[1][e, 16 + wd:] == 0).all() and (ga[2][e, :, wd:] == 0).all()
    # Inference kernels on the padded stacks agree too.
    with torch.no_grad():
        layer.eval()
        y_auto, routing = layer(x.view(3, 10, 24))
    torch.testing.assert_close(y_auto.view(30, 24), yb.detach(), atol=1e-5, rtol=1e-4)
    assert spent_flops(layer, routing) == sum(6 * 24 * widths[int(e)] for e in ids.flatten())


def test_heterogeneous_param_count_is_real_and_training_keeps_padding_zero():
    mcfg = MoEConfig(num_experts=4, top_k=2, expert_dim=32, expert_dims=[32, 16, 8, 24], aux_loss_coef=0.0)
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=32, moe=mcfg)
    model = build_model(cfg, seed=0)
    numel = sum(p.numel() for p in model.parameters())
    pc = count_params(cfg)
    assert pc.total_params == numel - padded_expert_params(cfg)
    assert pc.total["routed_experts"] == 2 * 3 * 16 * (32 + 16 + 8 + 24)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ex = model.moe_layers()[0].experts
    assert (ex.w13[2, 8:32] == 0).all() and (ex.w13[2, 40:] == 0).all() and (ex.w2[2, :, 8:] == 0).all()
    with pytest.raises(ConfigError, match="expert_dim"):
        MoEConfig(num_experts=2, top_k=1, expert_dim=32, expert_dims=[16, 8])


def test_cost_penalty_hand_example_and_gradient():
    cfg = _cfg("softmax_topk", E=3, K=1)
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, 0.0]], requires_grad=True)
    # probs: [.25, .25, .5] and [.6, .2, .2]; costs 2, 4, 0 -> normalised .5, 1, 0
    r = route(logits, cfg, None, _plan([2.0, 4.0, 0.0], k=1))
    want = ((0.25 * 0.5 + 0.25 * 1.0) + (0.6 * 0.5 + 0.2 * 1.0)) / 2
    torch.testing.assert_close(r.cost_loss, torch.tensor(want))
    (g,) = torch.autograd.grad(r.cost_loss, logits)
    assert g.abs().sum() > 0
    # In a model: weighted into the loss, with gradients reaching every router.
    mcfg = MoEConfig(num_experts=4, top_k=2, expert_dim=16, expert_dims=[16, 4, 8, 16], cost_loss_coef=0.5)
    model = build_model(ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=32,
                                    moe=mcfg), seed=0)
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, labels=ids)
    assert "cost" in out.aux_losses
    torch.testing.assert_close(out.aux_losses["cost"], 0.5 * sum(r.cost_loss for r in out.routing))
    out.aux_losses["cost"].backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for layer in model.moe_layers())


def test_api_validation_and_top_k_override():
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=32,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_dim=16))
    model = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 64, (1, 8))
    with pytest.raises(MoekitError, match="lambda"):
        set_routing_cost(model, lam=-1)
    with pytest.raises(MoekitError, match="offload"):
        set_routing_cost(model, cost="offload_misses")
    with pytest.raises(MoekitError, match="cheapest"):
        set_routing_cost(model, cost=[1.0, 2.0, 2.0, 4.0], budget=0.1)
    with pytest.raises(ConfigError, match="dynamic_k"):
        MoEConfig(dynamic_k=1.5)
    set_routing_cost(model, top_k=3)
    r = model(ids, return_routing_ids=True).routing[0]
    assert r.expert_ids.shape == (8, 3)
    set_routing_cost(model, top_k=1, dynamic_k=0.0)
    layer = model.moe_layers()[0]
    assert spent_flops(layer, model(ids).routing[0]) == 8 * 6 * 16 * 16
    clear_routing_cost(model)
    assert spent_flops(layer, model(ids).routing[0]) == 2 * 8 * 6 * 16 * 16
    # Config round trip of the new fields.
    c2 = cfg.replace(moe=dataclasses.replace(cfg.moe, cost_lambda=0.1, dynamic_k=0.5, expert_dims=[16, 8, 8, 4]))
    assert ModelConfig.from_json(c2.to_json()).moe == c2.moe


def test_info_counts_real_widths(tmp_path):
    from moekit.info import model_info

    mcfg = MoEConfig(num_experts=4, top_k=2, expert_dim=32, expert_dims=[32, 16, 8, 24])
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, ffn_dim=32, max_seq_len=32, moe=mcfg)
    cfg.to_json(tmp_path / "config.json")
    d = model_info(str(tmp_path / "config.json"))
    assert d["routed_expert_flops"]["per_expert"] == [6 * 16 * w for w in (32, 16, 8, 24)]
    assert d["params"]["total"]["routed_experts"] == count_params(cfg).total["routed_experts"] == 2 * 3 * 16 * 80


def test_cli_train_heterogeneous_with_penalty_then_eval_with_routing(tmp_path, capsys):
    import json

    from moekit.cli import main as cli_main
    from train_helpers import tiny_data

    data = tiny_data(tmp_path)
    out = tmp_path / "run"
    rc = cli_main(["train", "--preset", "tiny-moe", "--data-dir", str(data.root), "--corpus", "x", "--out", str(out),
                   "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--threads", "1",
                   "--expert-dims", "64", "32", "32", "16", "64", "48", "16", "8", "--cost-loss-coef", "0.1"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["cost"] > 0
    flops = {}
    for extra in (["--route-top-k", "1"], ["--route-top-k", "2"], ["--dynamic-k", "0.3", "--cost-lambda", "0.02"]):
        js = tmp_path / "e.json"
        rc = cli_main(["eval", str(out), "--json-out", str(js), "--seq-len", "32", "--max-tokens", "200", *extra])
        assert rc == 0, capsys.readouterr().err
        r = json.loads(js.read_text())
        flops[" ".join(extra)] = r["routing"]["expert_flops_per_token"]
        assert math.isfinite(r["results"]["val"]["bpb"])
    assert 0 < flops["--route-top-k 1"] < flops["--route-top-k 2"]
    capsys.readouterr()
    rc = cli_main(["eval", str(out), "--cost-budget", "0.01", "--seq-len", "32", "--max-tokens", "200"])
    err = capsys.readouterr().err
    assert rc == 2 and "cheapest expert" in err and "Traceback" not in err


@pytest.mark.parametrize("budget", [None, 1.0])
def test_variable_k_stays_in_the_eligible_groups(budget):
    cfg = MoEConfig(num_experts=8, top_k=3, expert_dim=16, router="sigmoid_topk", norm_topk_prob=True, n_group=4,
                    topk_group=2, group_score="max")
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    cost_E = normalise(torch.tensor([1.0, 2.0, 1.0, 4.0, 3.0, 1.0, 2.0, 1.0]))
    r = route(logits, cfg, None, CostPlan(0.05, cost_E, budget, 0.7, 3))
    groups = (logits.sigmoid() - 0.05 * cost_E).view(64, 4, 2).amax(-1).topk(2, -1).indices
    for t in range(64):
        used = r.topk_ids_TK[t][r.mask_TK[t]]
        assert set((used // 2).tolist()) <= set(groups[t].tolist())
        if budget is not None:
            assert float(cost_E[used].sum()) <= budget + 1e-6
