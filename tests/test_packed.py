"""Packed expert weights (`kernels.pack_experts`) and the outer-product kernel (bf16, fp32) that runs them.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, S sorted rows.

References: the float64 per-expert loop (in bf16 with the activations rounded to bf16, as both
kernels store them) and the row-major kernel; sizes chosen to hit the padding of hidden units and output
columns to groups of 16/32, an odd number of k-pairs, tiles of 1..14 tokens, several tiles per
expert (the chunked walk over the panel, D > 256) and experts with no rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moekit
from moekit import kernels
from moekit.config import MoEConfig
from moekit.moe.experts import GroupedExperts, activate
from moekit.moe.layer import MoELayer

pytestmark = pytest.mark.usefixtures("kernel_tier")  # every test once per CPU tier (conftest.py)


def _ref(x_SD, w13, w2, counts, act, dst=None, scale=None, n_out=None):
    """float64 per-expert reference, activations rounded to the weights' dtype (what both kernels
    store between the matmuls)."""
    out = torch.zeros(n_out or x_SD.shape[0], w13.shape[-1], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        h = activate(F.linear(x_SD[start:start + n].double(), w13[e].double()), act).to(w13.dtype).double()
        y = F.linear(h, w2[e].double())
        if scale is not None:
            y = y * scale[start:start + n, None].double()
        rows = torch.arange(start, start + n) if dst is None else dst[start:start + n]
        out.index_add_(0, rows, y)
        start += n
    return out


def _weights(E, D, F_, act, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    H = F_ if act == "gelu" else 2 * F_
    w13 = (torch.randn(E, H, D, generator=g) * D ** -0.5).to(dtype)
    w2 = (torch.randn(E, D, F_, generator=g) * F_ ** -0.5).to(dtype)
    return w13, w2


def _close(got, want, dtype=torch.bfloat16):
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale + 1e-6)


SIZES = [(1, 2, 1), (3, 64, 96), (2, 66, 50), (4, 640, 40), (2, 96, 330)]


@pytest.mark.parametrize("dtype,E,D,F_", [(torch.bfloat16, *s) for s in SIZES]
                         + [(torch.float32, *s) for s in SIZES + [(2, 45, 20)]])  # fp32: any dim
@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("rows", [1, 7, 14, 15, 29])
def test_packed_matches_loop(dtype, act, E, D, F_, rows):
    w13, w2 = _weights(E, D, F_, act, seed=E * D + F_, dtype=dtype)
    packed = kernels.pack_experts(w13, w2, act)
    counts = torch.tensor([rows if e % 3 != 1 else 0 for e in range(E)])  # some experts idle
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = kernels.moe_experts_packed(x, packed, counts)
    _close(got, _ref(x, w13, w2, counts, act), dtype)
    # Same values as the row-major kernel on the unpacked weights.
    _close(got, kernels.moe_experts(x, w13, w2, counts, act).double(), dtype)


def test_packed_gather_scatter_scale():
    E, D, F_, T, K = 4, 128, 72, 9, 2
    w13, w2 = _weights(E, D, F_, "swiglu", seed=3)
    packed = kernels.pack_experts(w13, w2, "swiglu")
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(T, D, generator=g).bfloat16()
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.rand(T, K, generator=g)
    got = kernels.moe_experts_topk_packed(x_TD, ids_TK, w_TK, packed)
    want = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids_TK[t, k])
            want[t] += float(w_TK[t, k]) * _ref(x_TD[t:t + 1], w13[e:e + 1], w2[e:e + 1], torch.tensor([1]), "swiglu")[0]
    _close(got, want)
    torch.testing.assert_close(got, kernels.moe_experts_topk(x_TD, ids_TK, w_TK, w13, w2, "swiglu"), rtol=2e-2, atol=2e-2)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(E=st.integers(1, 6), half_d=st.integers(1, 80), F_=st.integers(1, 70), seed=st.integers(0, 10_000),
       act=st.sampled_from(["swiglu", "geglu", "gelu"]), fp32=st.booleans(), data=st.data())
def test_property_packed_equals_loop(E, half_d, F_, seed, act, fp32, data):
    """Any expert count, dim (even in bf16), hidden size and rows per expert (0..40): the loop's values."""
    dtype = torch.float32 if fp32 else torch.bfloat16
    D = 2 * half_d - (fp32 and seed % 2)
    counts = torch.tensor(data.draw(st.lists(st.integers(0, 40), min_size=E, max_size=E)))
    w13, w2 = _weights(E, D, F_, act, seed, dtype)
    x = torch.randn(int(counts.sum()), D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = kernels.moe_experts_packed(x, kernels.pack_experts(w13, w2, act), counts)
    _close(got, _ref(x, w13, w2, counts, act), dtype)


def test_pack_layout_and_refusals():
    w13, w2 = _weights(2, 64, 40, "swiglu", seed=0)
    p = kernels.pack_experts(w13, w2, "swiglu")
    # 40 hidden units -> 3 groups of 16 (gate+up = 32 columns); 64 outputs -> 2 groups of 32.
    assert p.p13.shape == (2, 3, 32, 32, 2) and p.p2.shape == (2, 2, 24, 32, 2)
    # Group 0, k-pair 5, column 3 = gate unit 3, elements 10 and 11; column 19 = up unit 3.
    assert torch.equal(p.p13[1, 0, 5, 3], w13[1, 3, 10:12]) and torch.equal(p.p13[1, 0, 5, 19], w13[1, 40 + 3, 10:12])
    assert p.p13[0, 2, :, 8:16].abs().sum() == 0  # units 40..47 are padding
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.pack_experts(w13.half(), w2.half(), "swiglu")
    p32 = kernels.pack_experts(w13.float(), w2.float(), "swiglu")  # fp32: one element per k-unit
    assert p32.p13.shape == (2, 3, 64, 32, 1) and p32.p2.shape == (2, 2, 48, 32, 1)
    with pytest.raises(ValueError, match="even model dim"):
        kernels.pack_experts(*_weights(2, 63, 40, "swiglu", seed=0), "swiglu")


@pytest.mark.parametrize("cfg", [
    MoEConfig(num_experts=8, top_k=2, expert_dim=48),
    MoEConfig(num_experts=16, top_k=4, expert_dim=24, router="softmax_topk", norm_topk_prob=True,
              num_shared_experts=1, shared_expert_dim=32, shared_expert_gate=True),
    MoEConfig(num_experts=6, top_k=2, expert_dim=40, expert_act="gelu", capacity_factor=1.0),
    MoEConfig(num_experts=4, top_k=1, expert_dim=32, weight_on_input=True),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_packed_matches_unpacked(cfg, dtype):
    torch.manual_seed(0)
    layer = MoELayer(64, cfg).to(dtype).eval()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for T in (1, 5, 70):
            x = torch.randn(2, T, 64).to(dtype)
            layer.experts.unpack()
            want, r_want = layer(x)
            assert layer.experts.pack() > 0
            got, r_got = layer(x)
            torch.testing.assert_close(got.float(), want.float(), **tol)
            assert torch.equal(r_got.tokens_per_expert, r_want.tokens_per_expert)
            assert torch.equal(r_got.dropped, r_want.dropped)


def test_packed_path_is_taken_and_stale_copy_dropped(monkeypatch, caplog):
    torch.manual_seed(0)
    layer = MoELayer(64, MoEConfig(num_experts=4, top_k=2, expert_dim=32)).bfloat16().eval()
    x = torch.randn(1, 20, 64).bfloat16()
    calls = []
    orig = kernels.moe_experts_topk_packed
    monkeypatch.setattr(kernels, "moe_experts_topk_packed", lambda *a: (calls.append(1), orig(*a))[1])
    with torch.no_grad():
        layer.experts.pack()
        layer(x)
        assert calls == [1]
        layer.experts.w2.mul_(2.0)  # weights change after pack(): the old copy must not be used
        got, _ = layer(x)
    assert calls == [1] and "changed since pack()" in caplog.text
    with torch.no_grad():
        want, _ = layer(x)
    torch.testing.assert_close(got, want)
    # Autograd through the weights never takes the packed (forward-only) path.
    layer.experts.pack()
    layer(x)[0].float().sum().backward()
    assert calls == [1] and layer.experts.w13.grad is not None


def test_pack_skips_what_it_cannot_pack():
    assert GroupedExperts(4, 64, 32).half().pack() == 0  # float16
    assert GroupedExperts(4, 63, 32).bfloat16().pack() == 0  # odd dim in bf16
    assert GroupedExperts(4, 63, 32).pack() > 0  # fp32 takes any dim


def test_model_packed_cached_decode_matches_full_forward():
    model = moekit.build_model(moekit.get_preset("tiny-moe"), seed=0, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits.float()
        assert moekit.pack_experts(model) > 0
        full = model(ids).logits.float()
        cache = model.new_cache(2, 48)
        model(ids[:, :30], cache=cache)
        cache.advance(30)
        steps = []
        for t in range(30, 40):
            steps.append(model(ids[:, t:t + 1], cache=cache).logits[:, 0].float())
            cache.advance(1)
    # bf16 relative to the logits' scale (max ~0.6, std 0.16). The packed and the row-major kernel
    # agree to rounding (measured: identical); cached decode vs the full forward: measured 0.004.
    tol = dict(rtol=1.6e-2, atol=1.6e-2 * float(full.abs().max()))
    torch.testing.assert_close(full, want, **tol)
    got = torch.stack(steps, 1)
    torch.testing.assert_close(got, full[:, 30:40], **tol)
    with pytest.raises(AssertionError):  # a cache row off by one position must fail these tolerances
        torch.testing.assert_close(got[:, 1:], full[:, 30:39], **tol)


def test_generate_cli_pack_experts(capsys):
    """`moekit generate --pack-experts` runs end to end and (greedy, tiny model) gives the same tokens."""
    from moekit.cli import main

    args = ["generate", "tiny-moe", "--prompt", "1 2 3", "--max-new-tokens", "6", "--dtype", "bfloat16"]
    assert main(args) == 0
    plain = capsys.readouterr().out.split("\n")[0]
    assert main([*args, "--pack-experts"]) == 0
    packed = capsys.readouterr().out.split("\n")[0]
    assert len(plain.split()) == 6 and packed == plain
