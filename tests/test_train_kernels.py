"""Compiled CPU training kernels (causal softmax, rotary embedding, RMSNorm, MoE gather / combine /
SwiGLU backward) against the PyTorch reference paths, values and gradients, and the caching CPU
allocator. The cross-entropy kernel is tested with the other cross-entropy paths in test_loss.py.

Shape legend: N rows, V vocabulary, S queries, L keys, T tokens, D model dim, K experts per token.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import moekit
from moekit import kernels
from moekit.config import MoEConfig
from moekit.model import attention as attn_mod
from moekit.model.loss import cross_entropy
from moekit.model.rope import _rope_kernel, apply_rope, rotate_half
from moekit.moe.layer import MoELayer

pytestmark = pytest.mark.usefixtures("kernel_tier")  # every test once per CPU tier (conftest.py)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _calls(monkeypatch, name: str) -> list:
    """Count calls of kernels.<name>, so a test fails if the kernel path is silently skipped."""
    seen = []
    orig = getattr(kernels, name)

    def wrapped(*a, **k):
        seen.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(kernels, name, wrapped)
    return seen


def test_cross_entropy_kernel_bad_target_is_an_error():
    with pytest.raises(RuntimeError, match="out of range"):
        cross_entropy(torch.randn(3, 5, requires_grad=True), torch.tensor([0, 5, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,L", [(19, 19), (7, 23), (33, 33)])
def test_causal_softmax_matches_reference(dtype, S, L):
    """Query i sees keys j <= i + L - S; forward and backward against masked_fill + softmax."""
    torch.manual_seed(S + L)
    s = (torch.randn(3, S, L) * 3).to(dtype)
    scale = 0.37
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    p = attn_mod._CausalSoftmax.apply(a, scale)
    future = torch.ones(S, L, dtype=torch.bool).triu_(L - S + 1)
    q = torch.softmax(b.float().masked_fill(future, float("-inf")) * scale, dim=-1)
    assert_close(p.float(), q, **TOL[dtype])
    assert (p[:, future] == 0).all() and p.dtype == dtype
    g = torch.randn(3, S, L)
    p.backward(g.to(dtype))
    q.backward(g.to(dtype).float())
    assert_close(a.grad.float(), b.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_rotate_half(dtype):
    """The kernel path takes the strided q view of a fused QKV output; values and gradients."""
    torch.manual_seed(1)
    B, S, H, d = 2, 5, 3, 24  # d / 2 = 12: masked tails
    qkv = torch.randn(B, S, H * d + 7, dtype=dtype, requires_grad=True)
    x = qkv[..., :H * d].view(B, S, H, d).transpose(1, 2)
    ang = torch.randn(B, S, d // 2)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    assert _rope_kernel(x, cos, sin) is not None
    y = apply_rope(x, cos, sin)
    gy = torch.randn(y.shape)
    y.backward(gy.to(y.dtype))
    g_kernel = qkv.grad.clone()
    qkv.grad = None
    ref = x.float() * cos.unsqueeze(1) + rotate_half(x.float()) * sin.unsqueeze(1)
    ref.backward(gy.to(dtype).float())
    assert_close(y.float(), ref, **TOL[dtype])
    assert_close(g_kernel.float(), qkv.grad.float(), **TOL[dtype])


def test_rope_kernel_inverse_uses_each_halfs_sine():
    """The backward is the transposed rotation even when the two halves' tables differ."""
    torch.manual_seed(2)
    N, P, d = 6, 2, 8
    x = torch.randn(N, P, d, requires_grad=True)
    cos, sin = torch.randn(N, d), torch.randn(N, d)
    y = kernels.rope_rows(x, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    ref = torch.cat((x1 * c[..., :d // 2] - x2 * s[..., :d // 2], x2 * c[..., d // 2:] + x1 * s[..., d // 2:]), -1)
    assert_close(y, ref)
    g = torch.randn(N, P, d)
    ref.backward(g)
    assert_close(kernels.rope_rows(g, cos, sin, inverse=True), x.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_backward_matches_autograd(dtype):
    torch.manual_seed(3)
    h = (torch.randn(13, 2 * 40) * 3).to(dtype)
    g = torch.randn(13, 40).to(dtype)
    a = h.clone().requires_grad_(True)
    gate, up = a.float().chunk(2, dim=-1)
    (F.silu(gate) * up).backward(g.float())
    assert_close(kernels.silu_mul_backward(h, g).float(), a.grad.float(), **TOL[dtype])


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(E=st.integers(1, 6), k=st.integers(1, 4), T=st.integers(1, 40), D=st.sampled_from([8, 24, 40]),
       seed=st.integers(0, 10_000))
def test_moe_training_kernels_equal_pytorch_path(E, k, T, D, seed):
    """The MoE layer's training forward and backward with the kernels (gather, SwiGLU, combine)
    equal the pure-PyTorch path in fp32, outputs and every gradient."""
    import os

    k = min(k, E)
    cfg = MoEConfig(num_experts=E, top_k=k, expert_dim=16)
    results = []
    for flag in ("1", "0"):
        os.environ["MOEKIT_KERNELS"] = flag
        try:
            torch.manual_seed(seed)
            layer = MoELayer(D, cfg).train()
            x = torch.randn(2, T, D, requires_grad=True)
            y, _ = layer(x)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
        finally:
            os.environ.pop("MOEKIT_KERNELS", None)
    assert len(results[0]) == len(results[1])
    for a, b in zip(*results):
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_training_uses_the_kernels(monkeypatch):
    seen = {n: _calls(monkeypatch, n) for n in ("sum_rows", "combine_rows_backward", "silu_mul_backward")}
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_dim=8)).train()
    y, _ = layer(torch.randn(1, 9, 16, requires_grad=True))
    y.sum().backward()
    assert all(seen.values()), {n: len(v) for n, v in seen.items()}


def test_training_step_kernels_on_equals_off(monkeypatch):
    """A whole tiny-moe training forward + backward: loss and gradients with every training kernel
    equal the PyTorch path (fp32)."""
    cfg = moekit.get_preset("tiny-moe")
    ids = torch.randint(0, cfg.vocab_size, (2, 25), generator=torch.Generator().manual_seed(0))
    out = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MOEKIT_KERNELS", flag)
        model = moekit.build_model(cfg, seed=0).train()
        res = model(ids[:, :-1], labels=ids[:, 1:])
        res.loss.backward()
        out.append((res.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert_close(out[0][0], out[1][0])
    assert out[0][1].keys() == out[1][1].keys()
    for n in out[0][1]:
        assert_close(out[0][1][n], out[1][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_caching_allocator_reuses_and_respects_the_limit(monkeypatch):
    was = kernels.cpu_cache_stats()["installed"]
    try:
        monkeypatch.setenv("MOEKIT_CPU_CACHE_LIMIT_MB", "64")
        assert kernels.cpu_cache(True)
        kernels.cpu_cache_empty()
        a = torch.full((3 << 20,), 7, dtype=torch.uint8)  # 3 MiB: cached size class
        hits0 = kernels.cpu_cache_stats()["hits"]
        del a
        assert kernels.cpu_cache_stats()["cached_bytes"] >= 3 << 20
        b = torch.zeros(3 << 20, dtype=torch.uint8)
        assert kernels.cpu_cache_stats()["hits"] == hits0 + 1 and int(b.sum()) == 0  # reused, then zeroed
        del b
        kernels.cpu_cache_empty()
        assert kernels.cpu_cache_stats()["cached_bytes"] == 0
        monkeypatch.setenv("MOEKIT_CPU_CACHE_LIMIT_MB", "0")
        kernels.cpu_cache(True)
        c = torch.ones(2 << 20, dtype=torch.uint8)
        del c
        assert kernels.cpu_cache_stats()["cached_bytes"] == 0  # over the cap: returned at once
        assert not kernels.cpu_cache(False) and not kernels.cpu_cache_stats()["installed"]
        d = torch.ones(2 << 20)  # the previous allocator serves again
        assert float(d.sum()) == 2 << 20
    finally:
        monkeypatch.setenv("MOEKIT_CPU_CACHE_LIMIT_MB", "4096")
        kernels.cpu_cache(bool(was))


@pytest.mark.parametrize("D", [256, 40])
def test_rms_norm_kernel_matches_reference(monkeypatch, D):
    """Training RMSNorm (float32 rows through the kernel): output, input and weight gradients."""
    from moekit.model.attention import RMSNorm

    calls = _calls(monkeypatch, "rms_norm_backward")
    torch.manual_seed(D)
    norm = RMSNorm(D)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 17, D, requires_grad=True)
    g = torch.randn(3, 17, D)
    y = norm(x)
    y.backward(g)
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
    ref.backward(g)
    assert_close(y, ref)
    assert_close(gx, x.grad)
    assert_close(gw, norm.weight.grad)
    assert calls
