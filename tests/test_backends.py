"""Expert-execution backends: every backend equals the reference loop wherever it applies; selection
follows device, dtype, grad mode and the dispatcher; forcing works and fails clearly; a new backend
plugs in without touching the layer. Shape legend: T tokens, D dim, K top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from moekit import kernels
from moekit.errors import MoekitError
from moekit.moe import backends
from moekit.moe.layer import MoELayer, pack_experts
from test_moe import make_layer as _make_layer

ROUTERS = {
    "mixtral": dict(router="topk_softmax", top_k=2),
    "qwen": dict(router="softmax_topk", top_k=2, norm_topk_prob=True, num_shared_experts=1, shared_expert_dim=16,
                 shared_expert_gate=True),
    "deepseek": dict(router="sigmoid_topk", top_k=3, norm_topk_prob=True, n_group=4, topk_group=2,
                     routed_scaling_factor=2.5, score_correction_bias=True),
    "llama4": dict(router="sigmoid_topk", top_k=1, weight_on_input=True),
    "capacity": dict(router="softmax_topk", top_k=2, capacity_factor=0.5),
    "gelu": dict(router="topk_softmax", top_k=2, expert_act="gelu"),
}

# Tolerances from the dtype: fp32 kernels reorder sums (~1e-6 relative); bf16 rounds each GEMM's
# output to 8 bits of mantissa (~4e-3 relative), on outputs of O(1).
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def close(out, ref, dtype):
    """assert_close with the absolute tolerance scaled to the output's size (bf16 errors scale
    with it), so a wrong or missing row (an error of the output's own size) still fails."""
    tol = dict(TOL[dtype])
    tol["atol"] *= max(1.0, float(ref.abs().max()))
    assert_close(out, ref, **tol)


def make_layer(seed=0, D=32, E=8, F=16, dtype=torch.float32, **kw) -> MoELayer:
    return _make_layer(seed=seed, D=D, E=E, F=F, **kw).to(dtype).eval()


def _run(layer, x, name):
    layer.backend = name
    try:
        with torch.no_grad():
            return layer(x)[0]
    finally:
        layer.backend = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 70])
@pytest.mark.parametrize("variant", sorted(ROUTERS))
def test_every_applicable_backend_equals_reference(variant, T, dtype):
    layer = make_layer(dtype=dtype, **ROUTERS[variant])
    x = torch.randn(1, T, 32).to(dtype)
    ref = _run(layer, x, "reference")
    if layer.cfg.capacity_factor is None:
        assert ref.abs().max() > 0.1  # a real signal, so a wrong row cannot hide in the tolerance
    pack_experts(layer)
    ran = []
    for name in backends.names():
        if name == "reference":
            continue
        call = backends.ExpertCall(layer, x.view(T, 32), *_route(layer, x))
        with torch.no_grad():
            if backends.get(name).why_not(call) is not None:
                continue
        ran.append(name)
        out = _run(layer, x, name)
        if layer.cfg.capacity_factor is None:
            close(out, ref, dtype)
        else:  # drops: compare against the generic path, which shares the drop rule
            close(out, _run(layer, x, "torch"), dtype)
    assert "torch" in ran
    if kernels.available() and layer.cfg.capacity_factor is None and not layer.cfg.weight_on_input:
        assert "cpu-packed" in ran


def _route(layer, x):
    with torch.no_grad():
        r = layer.router(x.reshape(-1, x.shape[-1]))
    return r.topk_ids_TK, r.topk_weights_TK


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 9), k=st.integers(1, 3), T=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_property_selected_backend_equals_reference(E, k, T, seed):
    k = min(k, E)
    layer = make_layer(seed=seed, E=E, top_k=k, router="softmax_topk")
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(seed))
    assert_close(_run(layer, x, None), _run(layer, x, "reference"), **TOL[torch.float32])


def test_selection_follows_grad_mode_and_size():
    layer = make_layer(F=16)
    layer.train()
    assert backends.would_use(layer, 4, grad=True) == "torch"
    layer.eval()
    decode = backends.would_use(layer, 1)
    big = backends.would_use(layer, 4096)
    if kernels.available():
        assert decode.startswith("cpu-fused-topk")
        assert big.startswith("cpu-grouped")
        pack_experts(layer)
        assert backends.would_use(layer, 4096).startswith("cpu-packed")
    else:
        assert decode.startswith("cpu-grouped") and big.startswith("cpu-grouped")


def test_forced_backend_that_cannot_run_is_a_clear_error(monkeypatch):
    layer = make_layer(capacity_factor=0.5, top_k=2)
    x = torch.randn(3, 32)
    with pytest.raises(MoekitError, match="cpu-fused-topk.*capacity"):
        _run(layer, x, "cpu-fused-topk")
    with pytest.raises(MoekitError, match="unknown expert backend 'nope'"):
        _run(layer, x, "nope")
    monkeypatch.setenv(backends.ENV, "reference")
    layer2 = make_layer(top_k=2)
    calls = []
    orig = backends.ReferenceBackend.run
    monkeypatch.setattr(backends.ReferenceBackend, "run", lambda self, c: calls.append(1) or orig(self, c))
    with torch.no_grad():
        layer2(x)
    assert calls == [1]


def test_training_goes_through_torch_backend_and_gradients_match_reference():
    a, b = make_layer(top_k=2), make_layer(top_k=2)
    a.train(), b.train()
    b.backend = "reference"
    x = torch.randn(2, 9, 32)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = a(xa)[0], b(xb)[0]
    assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert_close(xa.grad, xb.grad)
    assert_close(a.experts.w13.grad, b.experts.w13.grad)
    assert_close(a.router.weight.grad, b.router.weight.grad)


class _CountingBackend(backends.TorchBackend):
    name = "test-counting"
    calls = 0

    def run(self, call):
        type(self).calls += 1
        return super().run(call)


def test_new_backend_plugs_in_without_touching_the_layer():
    layer = make_layer(top_k=2)
    backends.register(_CountingBackend(), priority=10_000)
    try:
        with torch.no_grad():
            y = layer(torch.randn(4, 32))[0]
        assert _CountingBackend.calls == 1
        assert backends.would_use(layer, 4) == "test-counting"
    finally:
        backends.unregister("test-counting")
    assert "test-counting" not in backends.names()
    assert y.shape == (4, 32)


class _RemoteDispatcher:
    """A dispatcher that is not local (as an expert-parallel one): only generic backends may run it."""

    local = False

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def dispatch(self, *a):
        self.calls += 1
        return self.inner.dispatch(*a)

    def combine(self, *a):
        return self.inner.combine(*a)


def test_non_local_dispatcher_takes_the_generic_path():
    layer = make_layer(top_k=2)
    pack_experts(layer)
    ref = _run(layer, torch.ones(3, 32), "reference")
    layer.dispatcher = _RemoteDispatcher(layer.dispatcher)
    assert backends.would_use(layer, 1) == "torch"
    with torch.no_grad():
        y = layer(torch.ones(3, 32))[0]
    assert layer.dispatcher.calls == 1
    assert_close(y, ref, **TOL[torch.float32])
    with pytest.raises(MoekitError, match="not local"):
        _run(layer, torch.ones(3, 32), "cpu-packed")


def test_set_backend_on_a_model():
    import moekit

    model = moekit.build_model(moekit.get_preset("tiny-moe"), seed=0).eval()
    n = backends.set_backend(model, "reference")
    assert n == len(list(model.moe_layers())) > 0
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        ref = model(ids).logits
    backends.set_backend(model, None)
    with torch.no_grad():
        auto = model(ids).logits
    assert_close(auto, ref, **TOL[torch.float32])
