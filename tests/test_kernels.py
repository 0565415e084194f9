"""Compiled CPU kernels (moekit.kernels) and the inference fast paths of the MoE layer.

Shape legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, S sorted rows,
M rows of a small linear, N its outputs.

Every kernel test runs once per x86 CPU tier (`kernel_tier`, conftest.py: MOEKIT_CPU_ISA forced
to avx2, avx512, avx512bf16, amx); a tier the CPU lacks is skipped, a tier it has must build. The
fast-path tests run with the kernels forced on, split with F.linear, and off; in the kernel and
split modes they also check that a kernel actually ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import kernels
from moekit.kernels import isa
from moekit.moe import experts as experts_mod
from moekit.config import MoEConfig
from moekit.moe.dispatch import loop_reference
from moekit.moe.experts import GroupedExperts, activate
from moekit.moe.layer import MoELayer

from kernel_tiers import CallCounter

needs_kernels = pytest.mark.usefixtures("kernel_tier")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
KERNEL_FNS = ("moe_experts", "moe_experts_topk", "moe_experts_packed", "moe_experts_topk_packed", "linear",
              "silu_mul", "combine_rows", "decode_attention", "sum_rows", "combine_rows_backward",
              "silu_mul_backward")
MODES = ["kernel", "split", "linear", "off"]
"""kernel: every expert in the kernel; split: experts with <= 2 rows in the kernel, the rest
F.linear; linear: kernels built but never chosen; off: MOEKIT_KERNELS=0."""


def tier_modes(modes: list[str]) -> list[tuple[str, str]]:
    """(tier, mode) pairs: the modes that run kernels on every tier, the others (no kernel, or
    kernels never chosen) on the CPU's best tier only."""
    have = isa.supported_tiers()
    best = have[-1] if have else "avx2"
    return [(t, m) for m in modes for t in (isa.TIERS if m in ("kernel", "split") else (best,))]


def _mode(monkeypatch, mode: str) -> CallCounter:
    """Set the mode; the returned counter sees every kernel call (`_ran` checks it)."""
    if mode == "off":
        monkeypatch.setenv("MOEKIT_KERNELS", "0")
    else:
        monkeypatch.setenv("MOEKIT_KERNEL_MAX_ROWS", {"kernel": "1000000", "split": "2", "linear": "0"}[mode])
    return CallCounter(monkeypatch, *KERNEL_FNS)


def _ran(counter: CallCounter, mode: str, *names: str) -> None:
    """kernel / split modes: some kernel (of `names`, if given) ran; off: none did."""
    got = sum(counter.calls[n] for n in names) if names else counter.total()
    if mode in ("kernel", "split"):
        assert got > 0, f"{mode} mode never reached the kernels: {counter.calls}"
    if mode == "off":
        assert counter.total() == 0, counter.calls


def bf16_logit_tol(want: torch.Tensor, rel: float) -> dict:
    """bf16 tolerances for logits of a multi-layer model: `rel` (about 2^-8 per rounding, times
    the layers' accumulation) relative to the logits' largest magnitude, and per element."""
    return dict(rtol=rel, atol=rel * float(want.abs().max()))


def _ref_experts(x_SD, w13, w2, counts, act, src=None, dst=None, scale=None, n_out=None):
    """float64 per-expert loop: what moe_experts must compute."""
    S = x_SD.shape[0] if src is None else src.numel()
    out = torch.zeros(n_out or S, w13.shape[-1], dtype=torch.float64)
    start = 0
    for e, n in enumerate(counts.tolist()):
        for s in range(start, start + n):
            xs = x_SD[s if src is None else src[s]].double()
            h = activate(F.linear(xs, w13[e].double()), act)
            y = F.linear(h, w2[e].double()) * (1.0 if scale is None else float(scale[s]))
            out[s if dst is None else dst[s]] += y
        start += n
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 45, 77), (3, 13, 31), (4, 64, 1024), (7, 33, 100), (16, 9, 4097), (13, 7, 1000), (37, 66, 515)])
def test_linear_matches_f_linear(dtype, M, N, K):
    torch.manual_seed(M * N + K)
    x, w = torch.randn(M, K).to(dtype), torch.randn(N, K).to(dtype)
    got = kernels.linear(x, w)
    want = F.linear(x.double(), w.double()).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4 * K ** 0.5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("E,D,F_", [(1, 8, 4), (3, 37, 19), (5, 64, 33), (4, 130, 7)])
@pytest.mark.parametrize("rows", [(0, 7), (9, 40)])  # per-row GEMV path (<= 8 rows) and the tile path
def test_moe_experts_matches_loop(dtype, act, E, D, F_, rows):
    torch.manual_seed(E * 100 + D + F_)
    H = F_ if act == "gelu" else 2 * F_
    w13, w2 = (torch.randn(E, H, D) * 0.2).to(dtype), (torch.randn(E, D, F_) * 0.2).to(dtype)
    counts = torch.randint(*rows, (E,))
    counts[0] = 0  # an expert with no rows must be skipped
    S = int(counts.sum())
    x = torch.randn(S, D).to(dtype)
    got = kernels.moe_experts(x, w13, w2, counts, act)
    want = _ref_experts(x.float(), w13.float(), w2.float(), counts, act)
    # bf16: the hidden activation is rounded to bf16 before the second matmul (as F.linear does).
    torch.testing.assert_close(got.double(), want, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32
                                                       else {"rtol": 3e-2, "atol": 3e-2}))


@needs_kernels
def test_moe_experts_gather_scatter_scale():
    """src/dst/scale: rows read from arbitrary tokens, weighted, summed into shared output rows."""
    torch.manual_seed(0)
    E, D, F_, T = 4, 48, 20, 6
    w13, w2 = torch.randn(E, 2 * F_, D) * 0.2, torch.randn(E, D, F_) * 0.2
    x = torch.randn(T, D)
    counts = torch.tensor([3, 0, 14, 2])  # expert 2 takes the tile path (> 8 rows)
    S = int(counts.sum())
    src, dst, scale = torch.randint(0, T, (S,)), torch.randint(0, T, (S,)), torch.rand(S)
    got = kernels.moe_experts(x, w13, w2, counts, "swiglu", src_S=src, dst_S=dst, scale_S=scale, n_out=T)
    want = _ref_experts(x, w13, w2, counts, "swiglu", src, dst, scale, n_out=T)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (1, 2, 8), (5, 3, 6), (8, 8, 8), (20, 2, 4)])
def test_moe_experts_topk_matches_loop_reference(dtype, T, K, E):
    """The one-call path (counting sort inside the kernel) equals the per-expert loop."""
    torch.manual_seed(T * 10 + K)
    D, F_ = 40, 24
    w13, w2 = (torch.randn(E, 2 * F_, D) * 0.2).to(dtype), (torch.randn(E, D, F_) * 0.2).to(dtype)
    x = torch.randn(T, D).to(dtype)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    got = kernels.moe_experts_topk(x, ids, w, w13, w2, "swiglu")
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    want = _ref_experts(x.float(), w13.float(), w2.float(), torch.bincount(flat, minlength=E), "swiglu",
                        src=order // K, dst=order // K, scale=w.reshape(-1)[order], n_out=T)
    torch.testing.assert_close(got.double(), want, **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32
                                                      else {"rtol": 3e-2, "atol": 3e-2}))


@needs_kernels
def test_moe_experts_topk_rejects_bad_expert_ids():
    w13, w2 = torch.zeros(4, 8, 16), torch.zeros(4, 16, 4)
    with pytest.raises(RuntimeError, match="expert id 4 out of range"):
        kernels.moe_experts_topk(torch.zeros(1, 16), torch.tensor([[4]]), torch.ones(1, 1), w13, w2, "swiglu")


def _ref_decode_attention(q, k, v, pos, scale):
    """float64 softmax attention of each row's one query over its keys 0..pos[b] (GQA by repeat)."""
    B, H, d = q.shape
    G = k.shape[1]
    kk = k.double().repeat_interleave(H // G, dim=1)
    vv = v.double().repeat_interleave(H // G, dim=1)
    out = torch.zeros(B, H, d, dtype=torch.float64)
    for b in range(B):
        n = int(pos[b]) + 1
        s = torch.einsum("hd,hld->hl", q[b].double(), kk[b, :, :n]) * scale
        out[b] = torch.einsum("hl,hld->hd", s.softmax(-1), vv[b, :, :n])
    return out


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,G,d,L", [(1, 1, 1, 16, 1), (1, 16, 4, 64, 200), (3, 8, 2, 32, 37), (2, 4, 4, 128, 9)])
def test_decode_attention_matches_reference(dtype, B, H, G, d, L):
    torch.manual_seed(B + H + L)
    q = torch.randn(B, H, d).to(dtype)
    k, v = torch.randn(B, G, L, d).to(dtype), torch.randn(B, G, L, d).to(dtype)
    pos = torch.randint(0, L, (B,))
    pos[0] = L - 1  # one row sees the whole cache; the others stop early (ragged)
    got = kernels.decode_attention(q, k, v, pos, d ** -0.5)
    want = _ref_decode_attention(q.float(), k.float(), v.float(), pos, d ** -0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_tier,mode", tier_modes(["kernel", "off"]), indirect=["kernel_tier"])
def test_bf16_cached_decode_matches_full_forward(monkeypatch, kernel_tier, mode):
    """bf16 decode through the cache (compiled attention kernel, or the PyTorch path with its
    rounded-up key window) gives the full forward's logits, past the 128-slot window edge."""
    calls = _mode(monkeypatch, mode)
    import moekit

    model = moekit.build_model(moekit.get_preset("tiny-moe"), seed=0, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 140), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = model.new_cache(2, 160)
        model(ids[:, :120], cache=cache)
        cache.advance(120)
        got = []
        for t in range(120, 140):
            got.append(model(ids[:, t:t + 1], cache=cache).logits[:, 0].float())
            cache.advance(1)
    got = torch.stack(got, 1)
    # bf16 tolerances relative to the logits' scale (max ~0.6, std 0.16): prefill, decode and the
    # full forward round activations to bf16 at different points in each layer (measured max
    # error 0.025 = 4% of the scale, on 0.1% of the logits; 0.002 with fp32 activations inside the
    # kernels on the avx2/avx512 tiers). A wrong cache row is off by ~0.5 (checked below).
    tol = bf16_logit_tol(full, 6e-2)
    torch.testing.assert_close(got, full[:, 120:140], **tol)
    with pytest.raises(AssertionError):  # a cache off by one position would fail these tolerances
        torch.testing.assert_close(got[:, 1:], full[:, 120:139], **tol)
    _ran(calls, mode)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("T", [1, 5])
def test_dense_ffn_kernel_path_matches_linear(dtype, act, T):
    """The dense FFN (dense baseline, shared experts) at decode sizes runs as one fused-kernel
    expert; it must equal its two F.linear calls (the grad-mode path)."""
    from moekit.moe.experts import DenseFFN

    torch.manual_seed(T)
    ffn = DenseFFN(48, 40, act).to(dtype)
    x = torch.randn(2, T, 48).to(dtype)
    want = ffn(x).detach()  # parameters require grad: the F.linear path
    with torch.no_grad():
        got = ffn(x)
    assert got.shape == want.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def test_switch_off_disables(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert not kernels.enabled() and not kernels.available()
    assert not kernels.usable(torch.zeros(2, 2))


def test_usable_refuses_autograd_and_mixed_dtypes():
    w = torch.zeros(4, 4, requires_grad=True)
    assert not kernels.usable(torch.zeros(2, 4), w)  # grad mode and a weight that needs grad
    assert not kernels.usable(torch.zeros(2, 4, dtype=torch.float16))
    # bf16 activations with fp32 weights: never (fp32 with bf16 weights is the allowed mix)
    assert not kernels.usable(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(4, 4))


CFGS = {
    "mixtral": MoEConfig(num_experts=8, top_k=2, expert_dim=40),
    "qwen": MoEConfig(num_experts=16, top_k=4, expert_dim=24, router="softmax_topk", norm_topk_prob=True,
                      num_shared_experts=1, shared_expert_dim=32, shared_expert_gate=True),
    "deepseek": MoEConfig(num_experts=16, top_k=3, expert_dim=24, router="sigmoid_topk", n_group=4, topk_group=2,
                          score_correction_bias=True, routed_scaling_factor=2.5, norm_topk_prob=True),
    "llama4_gelu": MoEConfig(num_experts=4, top_k=1, expert_dim=32, router="sigmoid_topk", weight_on_input=True,
                             expert_act="gelu"),
    "geglu_soft": MoEConfig(num_experts=4, top_k=4, expert_dim=16, router="soft", expert_act="geglu"),
}


@pytest.mark.parametrize("kernel_tier,mode", tier_modes(MODES), indirect=["kernel_tier"])
@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_inference_matches_loop_reference(monkeypatch, kernel_tier, mode, name, dtype):
    calls = _mode(monkeypatch, mode)
    torch.manual_seed(1)
    layer = MoELayer(32, CFGS[name]).to(dtype).eval()
    for T in (1, 3, 50):
        x = torch.randn(2, T, 32).to(dtype)
        with torch.no_grad():
            y, routing = layer(x)
            layer.use_reference = True
            y_ref, _ = layer(x)
            layer.use_reference = False
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        assert routing.tokens_per_expert.sum() == 2 * T * (CFGS[name].top_k if name != "geglu_soft" else 4)
    _ran(calls, mode)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kernel_tier,mode", tier_modes(["split", "linear", "off"]), indirect=["kernel_tier"])
def test_both_combine_strategies(monkeypatch, kernel_tier, batched, mode):
    """The inference combines of F.linear experts agree with the loop: the compiled combine_rows
    pass when kernels are built (split, linear), else batched or per-expert (off)."""
    calls = _mode(monkeypatch, mode)
    monkeypatch.setattr(experts_mod, "BATCHED_COMBINE", batched)
    torch.manual_seed(5)
    layer = MoELayer(32, CFGS["deepseek"]).eval()
    x = torch.randn(3, 21, 32)
    with torch.no_grad():
        y, _ = layer(x)
        layer.use_reference = True
        y_ref, _ = layer(x)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    _ran(calls, mode)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kernel_tier,mode", tier_modes(["kernel", "split", "off"]), indirect=["kernel_tier"])
@pytest.mark.parametrize("policy", ["score", "position"])
def test_capacity_inference_matches_training_path(monkeypatch, kernel_tier, batched, mode, policy):
    """Capacity drops: the fused inference path must drop exactly what dispatch+combine drops."""
    calls = _mode(monkeypatch, mode)
    monkeypatch.setattr(experts_mod, "BATCHED_COMBINE", batched)
    torch.manual_seed(2)
    layer = MoELayer(32, MoEConfig(num_experts=4, top_k=2, expert_dim=24, capacity_factor=0.75,
                                   drop_policy=policy))
    x = torch.randn(3, 17, 32)
    with torch.no_grad():
        y_fast, r_fast = layer(x)
    y_slow, r_slow = layer(x.clone().requires_grad_())  # autograd on: the dispatch -> combine path
    assert int(r_fast.dropped) == int(r_slow.dropped) > 0
    torch.testing.assert_close(y_fast, y_slow.detach(), **TOL[torch.float32])
    _ran(calls, mode)


@pytest.mark.parametrize("kernel_tier,mode", tier_modes(["kernel", "split"]), indirect=["kernel_tier"])
def test_training_autograd_unaffected(monkeypatch, kernel_tier, mode):
    """With kernels on, a training step still builds the graph and matches the reference grads."""
    calls = _mode(monkeypatch, mode)
    torch.manual_seed(3)
    layer = MoELayer(32, CFGS["qwen"]).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    y, r = layer(x)
    (y.square().sum() + r.aux_loss).backward()
    grads = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    layer.use_reference = True
    y_ref, r_ref = layer(x)
    (y_ref.square().sum() + r_ref.aux_loss).backward()
    torch.testing.assert_close(y, y_ref)
    for g, p in zip(grads, list(layer.parameters()) + [x]):
        torch.testing.assert_close(g, p.grad)
    _ran(calls, mode)


@pytest.mark.parametrize("kernel_tier,mode", tier_modes(MODES), indirect=["kernel_tier"])
def test_grouped_experts_forward_no_grad_equals_grad_path(monkeypatch, kernel_tier, mode):
    calls = _mode(monkeypatch, mode)
    torch.manual_seed(4)
    ex = GroupedExperts(6, 40, 24)
    counts = torch.tensor([0, 5, 1, 3, 0, 20])
    x = torch.randn(int(counts.sum()), 40)
    want = ex(x, counts)  # grad enabled, parameters require grad: per-expert cat path
    with torch.no_grad():
        got = ex(x, counts)
    torch.testing.assert_close(got, want.detach(), **TOL[torch.float32])
    _ran(calls, mode)


@settings(max_examples=15, deadline=None)
@given(E=st.integers(1, 12), k=st.integers(1, 4), T=st.integers(1, 40), D=st.integers(1, 40),
       F_=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_property_inference_equals_loop(E, k, T, D, F_, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=k, expert_dim=F_, router="softmax_topk",
                                  norm_topk_prob=True)).eval()
    x = torch.randn(T, D)
    with torch.no_grad():
        y, _ = layer(x)
        r = layer.router(x)
        y_ref = loop_reference(x, r.topk_ids_TK, r.topk_weights_TK, layer.experts)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,F_", [(1, 1), (3, 17), (64, 2816)])
def test_silu_mul_matches_torch(dtype, S, F_):
    torch.manual_seed(S + F_)
    h = (torch.randn(S, 2 * F_) * 4).to(dtype)
    h[0, 0] = -100.0  # exp clamp: silu(-100) ~ 0, not NaN
    got = kernels.silu_mul(h)
    g, u = h.double().chunk(2, dim=-1)
    want = (torch.nn.functional.silu(g) * u).to(dtype)
    torch.testing.assert_close(got, want, **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("kernel_tier,mode", tier_modes(["kernel", "split", "off"]), indirect=["kernel_tier"])
def test_inference_under_autocast_matches_eager_autocast(monkeypatch, kernel_tier, batched, mode):
    """Eval inside the trainer runs no-grad under bf16 autocast with float32 weights: every
    inference path (buffers written with out=) must follow autocast's dtype and agree with the
    dispatch -> combine path."""
    calls = _mode(monkeypatch, mode)
    monkeypatch.setattr(experts_mod, "BATCHED_COMBINE", batched)
    torch.manual_seed(3)
    layer = MoELayer(32, CFGS["mixtral"])
    x = torch.randn(2, 40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            y_fast, _ = layer(x)
        y_slow, _ = layer(x.clone().requires_grad_())
    torch.testing.assert_close(y_fast.float(), y_slow.detach().float(), rtol=3e-2, atol=3e-2)
    _ran(calls, mode)
