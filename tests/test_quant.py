"""moekit.quant formats and modules: round trips against float64, the E2M1 grid, packing, and the
quantized experts against a per-expert loop over their dequantized weights."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import ModelConfig, MoEConfig, build_model
from moekit.moe.dispatch import loop_reference
from moekit.quant import QuantConfig, QuantError, QuantizedExperts, QuantizedTensor, quantize_rtn
from moekit.quant import formats

SCHEMES = [("int8", False), ("int4", False), ("int4", True), ("mxfp4", False)]


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_dim=64, num_shared_experts=1, shared_expert_dim=64)
    base = dict(vocab_size=128, dim=64, n_layers=3, n_heads=4, ffn_dim=128, max_seq_len=64, first_k_dense=1, moe=moe)
    return ModelConfig(**{**base, **kw})


def _bound_f64(scheme: str, zero_point: bool, w_xNG: torch.Tensor) -> torch.Tensor:
    """Largest allowed |error| per group, derived in float64 from the group's values alone."""
    amax = w_xNG.abs().amax(-1)
    if scheme == "int8":
        step = amax / 127
        return step / 2 * 1.002 + 1e-12  # scale rounded to float16: 2^-11 relative
    if scheme == "int4" and not zero_point:
        return amax / 8 * 1.002 + 1e-12  # half a step, or one step for the clamped +8 side
    if scheme == "int4":
        span = w_xNG.amax(-1).clamp(min=0) - w_xNG.amin(-1).clamp(max=0)
        return span / 15 * 1.002 + 1e-12  # half a step + the zero point's rounding
    X = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    return 2 * X  # half-step <= X (between 4X and 6X); saturation above 6X < 2X


@pytest.mark.parametrize("scheme,zp", SCHEMES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_trip_error_bounded_against_float64(scheme, zp, group_size):
    if scheme == "mxfp4" and group_size != 32:
        with pytest.raises(QuantError, match="mxfp4"):
            QuantConfig(scheme=scheme, group_size=group_size)
        return
    g = torch.Generator().manual_seed(group_size)
    w64 = torch.randn(3, 16, 256, dtype=torch.float64, generator=g) * torch.rand(3, 16, 1, dtype=torch.float64,
                                                                                 generator=g)
    w64[0, 0, :group_size] = 0.0  # an all-zero group
    q = QuantizedTensor.from_float(w64.float(), scheme, group_size, zp)
    err = (q.dequantize(torch.float64) - w64).abs().unflatten(-1, (-1, group_size))
    bound = _bound_f64(scheme, zp, w64.unflatten(-1, (-1, group_size)))
    assert bool((err <= bound.unsqueeze(-1) + 1e-7).all()), float((err - bound.unsqueeze(-1)).max())
    assert float(err[0, 0, 0].max()) == 0.0
    # Storage: codes packed two per byte for 4-bit schemes, scales per group.
    assert q.q.shape[-1] == (256 if scheme == "int8" else 128)
    assert q.scale.shape == (3, 16, 256 // group_size)
    # Per-matrix dequantization of a stack equals the whole stack's.
    torch.testing.assert_close(q.dequantize(torch.float32, 1), q.dequantize(torch.float32)[1], rtol=0, atol=0)


def test_mxfp4_encodes_the_e2m1_grid_exactly():
    grid = formats.e2m1_values()
    for k in (-6, -1, 0, 3):
        # Each group's amax is 6 * 2^k, so its shared scale is 2^k and every grid value is exact.
        vals = torch.cat([grid, grid.flip(0)]) * 2.0 ** k
        w = vals.repeat(4, 1)
        q = QuantizedTensor.from_float(w, "mxfp4", 32)
        assert torch.equal(q.dequantize(), w)
        assert int(q.scale[0, 0]) == 127 + k  # E8M0
    # Round to nearest, ties to the even code, saturating at 6.
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.74, -5.01, 0.1])
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -0.5, -6.0, 0.0])
    assert torch.equal(grid[formats.e2m1_encode(x).long()], want)


def test_int8_codes_and_float16_scales_follow_q8_0():
    w = torch.randn(4, 64)
    q = QuantizedTensor.from_float(w, "int8", 32)
    s = (w.view(4, 2, 32).abs().amax(-1) / 127).half()
    assert torch.equal(q.scale, s)
    assert torch.equal(q.q.view(4, 2, 32), torch.round(w.view(4, 2, 32) / s.float().unsqueeze(-1)).to(torch.int8))


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 3), max_size=2), rows=st.integers(1, 5), groups=st.integers(1, 4),
       gs=st.sampled_from([32, 64, 128]), seed=st.integers(0, 2**16))
def test_nibble_packing_round_trips(lead, rows, groups, gs, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (*lead, rows, groups * gs), generator=g, dtype=torch.uint8)
    packed = formats.pack_nibbles(codes)
    assert packed.shape == (*lead, rows, groups * gs // 2) and packed.dtype == torch.uint8
    assert torch.equal(formats.unpack_nibbles(packed), codes)
    blocks = codes.unflatten(-1, (-1, 32))  # GGUF block order: byte j = element j | element j + 16 << 4
    assert torch.equal(packed.unflatten(-1, (-1, 16)), blocks[..., :16] | (blocks[..., 16:] << 4))
    # Signed int4 codes survive the offset-by-8 storage.
    signed = codes.to(torch.int8) - 8
    assert torch.equal(formats.loaded_codes("int4", formats.stored_codes("int4", signed, False), False), signed)


@settings(max_examples=25, deadline=None)
@given(scheme=st.sampled_from(SCHEMES), rows=st.integers(1, 4), groups=st.integers(1, 3), seed=st.integers(0, 999))
def test_requantizing_dequantized_weights_is_exact(scheme, rows, groups, seed):
    name, zp = scheme
    w = torch.randn(rows, 32 * groups, generator=torch.Generator().manual_seed(seed))
    q = QuantizedTensor.from_float(w, name, 32, zp)
    d = q.dequantize()
    s, z = q.params()
    q2 = QuantizedTensor.from_float(d, name, 32, zp, s, z)
    assert torch.equal(q2.q, q.q) and torch.equal(q2.scale, q.scale)


def test_group_size_must_divide_the_input_dim():
    with pytest.raises(QuantError, match="group-size 32"):
        QuantizedTensor.from_float(torch.randn(4, 96), "int8", 64)


@pytest.mark.parametrize("scheme,zp", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_experts_equal_per_expert_loop_over_dequantized_weights(scheme, zp, dtype):
    from moekit.moe.experts import GroupedExperts, activate

    torch.manual_seed(0)
    ex = GroupedExperts(6, 64, 96, "swiglu")
    qx = QuantizedExperts.from_experts(ex, scheme, 32, zp)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 64).to(dtype)
    with torch.no_grad():
        y = qx(x, counts)
    ref, start = [], 0
    for e, n in enumerate(counts.tolist()):
        w13 = qx.qw13.dequantize(torch.float64, e)
        w2 = qx.qw2.dequantize(torch.float64, e)
        ref.append(activate(x[start:start + n].double() @ w13.t(), "swiglu") @ w2.t())
        start += n
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.double(), torch.cat(ref), **tol)
    assert not any(p.is_floating_point() for p in qx.parameters())


@pytest.mark.parametrize("scheme,zp", SCHEMES)
def test_quantized_layer_matches_reference_loop_and_keeps_router(scheme, zp):
    cfg = tiny_cfg()
    m = build_model(cfg, seed=1).eval()
    q = quantize_rtn(copy.deepcopy(m), QuantConfig(scheme=scheme, zero_point=zp))
    layer = q.layers[1].ffn
    assert isinstance(layer.experts, QuantizedExperts)
    x = torch.randn(2, 9, cfg.dim)
    with torch.no_grad():
        y_kernel, _ = layer(x)  # 18 tokens on CPU: the cpu-quant kernel (int8 activations)
        layer.backend = "torch"  # the generic path: dequantized experts, exact
        y, _ = layer(x)
        layer.backend = None
        r = layer.router(x.reshape(-1, cfg.dim))
        ref = loop_reference(x.reshape(-1, cfg.dim), r.topk_ids_TK, r.topk_weights_TK, layer.experts)
        ref = ref + layer.shared(x.reshape(-1, cfg.dim))
    torch.testing.assert_close(y.reshape(-1, cfg.dim), ref, rtol=1e-5, atol=1e-6)
    # The kernel differs only by its activation rounding (tests/test_quant_kernels.py holds it exactly).
    assert float((y_kernel.reshape(-1, cfg.dim) - ref).norm() / ref.norm()) < 0.03
    # Router, norms and embeddings are untouched (bit-identical).
    sd_m, sd_q = m.state_dict(), q.state_dict()
    for k, v in sd_m.items():
        if "router" in k or "norm" in k or k.startswith("embed"):
            assert torch.equal(sd_q[k], v), k


def test_bf16_model_casts_keep_quantized_storage():
    m = build_model(tiny_cfg(), seed=0).eval()
    q = quantize_rtn(m, QuantConfig(scheme="int4", attention="int8"))
    scale = q.layers[1].ffn.experts.qw13.scale.clone()
    q = q.to(torch.bfloat16)
    assert q.layers[1].ffn.experts.qw13.scale.dtype == torch.float16
    assert torch.equal(q.layers[1].ffn.experts.qw13.scale, scale)
    assert q.layers[0].attn.wqkv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = q(torch.randint(0, 128, (1, 8))).logits
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("zp", [False, True])
def test_int4pack_path_matches_dequantized_reference(zp):
    from moekit.moe.experts import GroupedExperts

    torch.manual_seed(0)
    qx = QuantizedExperts.from_experts(GroupedExperts(3, 64, 96), "int4", 32, zp)
    counts = torch.tensor([4, 0, 6])
    x = torch.randn(10, 64)
    with torch.no_grad():
        ref = qx(x, counts)
        if qx.pack() == 0:
            pytest.skip("torch has no CPU int4 matmul")
        got = qx(x, counts)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
