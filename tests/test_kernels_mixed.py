"""fp32 activations with bf16 weights (the fp32 compute policy of CPUs without native bf16 keeps
big weights in bf16): every inference matmul kernel on every CPU tier against a float64 reference.

bf16 weights are exact in float64, and the kernels widen them to fp32 in registers and keep the
activations in fp32, so the tolerances are fp32's (the only error is fp32 accumulation order).

Shape legend: T tokens, D model dim, F expert hidden, E experts, K experts per token, M rows of a
small linear, N its outputs, B batch rows, H heads, G kv heads, d head dim, L keys.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import kernels
from moekit.moe.experts import activate

pytestmark = pytest.mark.usefixtures("kernel_tier")
B16 = torch.bfloat16


def _ref_topk(x_TD, ids_TK, w_TK, w13, w2, act):
    """float64: out[t] = sum_k w[t, k] * expert_{ids[t, k]}(x[t])."""
    out = torch.zeros(x_TD.shape[0], w13.shape[-1], dtype=torch.float64)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            h = activate(F.linear(x_TD[t:t + 1].double(), w13[e].double()), act)
            out[t] += float(w_TK[t, k]) * F.linear(h, w2[e].double())[0]
    return out


def _tol(want: torch.Tensor) -> dict:
    return dict(rtol=1e-5, atol=1e-5 * max(1.0, float(want.abs().max())))


@pytest.mark.parametrize("M,N,K", [(1, 45, 77), (3, 13, 31), (8, 64, 1024), (13, 7, 1000), (37, 66, 515)])
def test_linear_fp32_x_bf16_w(M, N, K):
    torch.manual_seed(M + N + K)
    x, w = torch.randn(M, K), torch.randn(N, K).to(B16)
    got = kernels.linear(x, w)
    assert got.dtype == torch.float32
    want = F.linear(x.double(), w.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * K ** 0.5)
    with pytest.raises(AssertionError):  # the reference is sharp enough to see bf16 activations
        torch.testing.assert_close(kernels.linear(x.to(B16), w).double(), want, rtol=1e-5, atol=1e-5 * K ** 0.5)


@pytest.mark.parametrize("act", ["swiglu", "geglu", "gelu"])
@pytest.mark.parametrize("T,K,E", [(1, 2, 8), (5, 3, 6), (40, 2, 3)])  # GEMV rows and (40 x 2 / 3) tiles
def test_moe_experts_topk_fp32_x_bf16_w(act, T, K, E):
    torch.manual_seed(T * 10 + K)
    D, F_ = 40, 24
    H = F_ if act == "gelu" else 2 * F_
    w13, w2 = (torch.randn(E, H, D) * 0.2).to(B16), (torch.randn(E, D, F_) * 0.2).to(B16)
    x = torch.randn(T, D)
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    w = torch.rand(T, K)
    want = _ref_topk(x, ids, w, w13, w2, act)
    got = kernels.moe_experts_topk(x, ids, w, w13, w2, act)
    torch.testing.assert_close(got.double(), want, **_tol(want))
    # The row contract of moe_experts (sorted rows, src/dst/scale) on the same inputs.
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    got2 = kernels.moe_experts(x, w13, w2, torch.bincount(flat, minlength=E), act, src_S=order // K,
                               dst_S=order // K, scale_S=w.reshape(-1)[order], n_out=T)
    torch.testing.assert_close(got2.double(), want, **_tol(want))
    # Packed bf16 weights, fp32 rows.
    packed = kernels.pack_experts(w13, w2, act)
    got3 = kernels.moe_experts_topk_packed(x, ids, w, packed)
    torch.testing.assert_close(got3.double(), want, **_tol(want))
    wrong = want.clone()
    wrong[-1] = want[0] if T > 1 else -want[0]  # one token given another's output must fail
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got.double(), wrong, **_tol(want))


@pytest.mark.parametrize("rows", [1, 7, 15, 29])
def test_packed_fp32_x_bf16_w_tiles(rows):
    """Tiles of 1..14 tokens and several tiles per expert (chunked panel walk, D > 256)."""
    torch.manual_seed(rows)
    E, D, F_ = 2, 320, 40
    w13, w2 = (torch.randn(E, 2 * F_, D) * D ** -0.5).to(B16), (torch.randn(E, D, F_) * F_ ** -0.5).to(B16)
    counts = torch.tensor([rows, 3])
    x = torch.randn(int(counts.sum()), D)
    got = kernels.moe_experts_packed(x, kernels.pack_experts(w13, w2, "swiglu"), counts)
    want = torch.cat([F.linear(activate(F.linear(x[s:s + n].double(), w13[e].double()), "swiglu"), w2[e].double())
                      for e, (s, n) in enumerate([(0, rows), (rows, 3)])])
    torch.testing.assert_close(got.double(), want, **_tol(want))


@pytest.mark.parametrize("B,H,G,d,L", [(1, 16, 4, 64, 200), (3, 8, 2, 32, 37)])
def test_decode_attention_fp32_q_bf16_cache(B, H, G, d, L):
    torch.manual_seed(B + L)
    q = torch.randn(B, H, d)
    k, v = torch.randn(B, G, L, d).to(B16), torch.randn(B, G, L, d).to(B16)
    pos = torch.randint(0, L, (B,))
    got = kernels.decode_attention(q, k, v, pos, d ** -0.5)
    kk, vv = k.double().repeat_interleave(H // G, 1), v.double().repeat_interleave(H // G, 1)
    want = torch.stack([torch.einsum("hl,hld->hd", (torch.einsum("hd,hld->hl", q[b].double(), kk[b, :, :int(pos[b]) + 1])
                                                     * d ** -0.5).softmax(-1), vv[b, :, :int(pos[b]) + 1])
                        for b in range(B)])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
