"""NAEE / PESF expert skipping: off at 0, equals a reference that drops the same assignments."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.errors import MoekitError
from moekit.inference import Engine, SamplingParams
from moekit.memory import clear_skipping, set_skipping, skip_stats
from moekit.memory.skip import SkipPolicy
from moekit.moe import backends
from moekit.moe.dispatch import loop_reference

_M: dict = {}


def _model(name="tiny-qwen-moe"):
    if name not in _M:
        _M[name] = moekit.build_model(moekit.get_preset(name), seed=0).eval()
    return _M[name]


def _ids(vocab, B=2, S=20, seed=0):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen-moe", "tiny-deepseek"])
def test_zero_thresholds_change_nothing(name):
    m = _model(name)
    x = _ids(m.config.vocab_size)
    with torch.no_grad():
        ref = m(x).logits
        assert set_skipping(m, beta=0.0, alpha=0.0) == len(m.moe_layers())
        torch.testing.assert_close(m(x).logits, ref, rtol=0, atol=0)
        # An active policy whose thresholds never fire (beta tiny) runs the skip backend: same values.
        set_skipping(m, beta=1e-12)
        try:
            out = m(x).logits
            assert skip_stats(m)["skipped"] == 0 and skip_stats(m)["assignments"] > 0
        finally:
            clear_skipping(m)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), K=st.integers(1, 4), beta=st.floats(0, 1), alpha=st.floats(0, 2), B=st.sampled_from([1, 2]))
def test_keep_mask_invariants(T, K, beta, alpha, B):
    E = 6
    g = torch.Generator().manual_seed(T * 100 + K)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T * B)])
    w = torch.rand(T * B, K, generator=g)
    p = SkipPolicy(beta=beta, alpha=alpha, batch=B)
    keep = p.keep_mask(ids, w, E)
    assert keep.any(-1).all()  # every token keeps an expert
    assert keep.gather(1, w.argmax(-1, keepdim=True)).all()  # its top one
    naee = w >= beta * w.amax(-1, keepdim=True)
    top = torch.zeros_like(keep).scatter_(1, w.argmax(-1, keepdim=True), True)
    if T > 1 and alpha > 0:  # PESF: an expert is rare in its sequence when picked < alpha * T*K/E times
        cnt = torch.stack([torch.bincount(ids.view(B, T * K)[b], minlength=E) for b in range(B)])
        rare = torch.stack([cnt[b][ids.view(B, T, K)[b]] for b in range(B)]).view(T * B, K) < alpha * T * K / E
    else:
        rare = torch.zeros_like(keep)
    assert torch.equal(keep, (naee & ~rare) | top)

def test_skip_layer_equals_reference_without_the_skipped():
    m = _model("tiny-qwen-moe")
    layer = m.moe_layers()[0]
    set_skipping(m, beta=0.6, alpha=0.8)
    try:
        x = torch.randn(1, 30, m.config.dim)
        with torch.no_grad():
            r = layer.router(x.reshape(-1, m.config.dim))
            layer.skip.batch = 1
            keep = layer.skip.keep_mask(r.topk_ids_TK, r.topk_weights_TK, layer.cfg.num_experts)
            assert not keep.all()
            w = r.topk_weights_TK * keep
            if layer.skip.renormalize:
                w = w * (r.topk_weights_TK.sum(-1, keepdim=True) / w.sum(-1, keepdim=True))
            ref = loop_reference(x.reshape(-1, m.config.dim), r.topk_ids_TK, w, layer.experts)
            out, _ = backends.get("skip").run(backends.ExpertCall(layer, x.reshape(-1, m.config.dim),
                                                                  r.topk_ids_TK, r.topk_weights_TK))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert layer.skip.skipped == int((~keep).sum())
    finally:
        clear_skipping(m)


def test_engine_options_count_skips_and_pesf_is_prefill_only():
    m = _model("tiny-moe")
    prompts = [_ids(m.config.vocab_size, 1, 16, s)[0].tolist() for s in range(2)]
    sp = SamplingParams(max_new_tokens=6)
    ref = [g.tokens for g in Engine(m).generate(prompts, sp)]
    eng = Engine(m, skip_alpha=1.0)
    eng.generate(prompts, sp)
    s = skip_stats(m)
    assert s["skipped"] > 0 and s["skipped"] == s["skipped_prefill"]  # PESF never skips in decode
    clear_skipping(m)
    assert [g.tokens for g in Engine(m, skip_beta=0.0, skip_alpha=0.0).generate(prompts, sp)] == ref
    with pytest.raises(MoekitError, match="beta"):
        set_skipping(m, beta=2.0)


def test_generate_cli_skip_options(tmp_path, capsys):
    from moekit.cli import main

    assert main(["generate", "tiny-moe", "--prompt", "1 2 3 4 5 6", "--max-new-tokens", "4", "--skip-beta", "0.9",
                 "--skip-alpha", "0.5"]) == 0
    assert "skipping" in capsys.readouterr().err
