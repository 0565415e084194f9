"""Sparse upcycling: a dense model turned into an MoE has the same logits at initialisation
(copy-upcycling for any router init; fine-grained slices with the zero router + tie-break),
the result is a normal moekit directory, and it trains."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.checkpoint.native import load_native
from moekit.checkpoint.upcycle import upcycle, upcycle_config
from moekit.config import ConfigError, ModelConfig


def _dense(seed=0, **kw) -> moekit.Transformer:
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64, **kw)
    m = moekit.build_model(cfg, seed=seed).eval()
    with torch.no_grad():  # wider than the 0.02 init, so a wrong slice would show in the logits
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def _logits(m, seed=0):
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(ids).logits


@settings(max_examples=25, deadline=None)
@given(E=st.integers(1, 8), K=st.integers(1, 4), G=st.sampled_from([1, 2, 3, 4, 6]),
       router=st.sampled_from(["topk_softmax", "softmax_topk"]), std=st.sampled_from([0.0, 0.02, 1.0]),
       seed=st.integers(0, 3))
def test_upcycled_logits_equal_dense(E, K, G, router, std, seed):
    K = min(K, E)
    d = _dense(seed)
    m = upcycle(d, E, K, G, router=router, router_std=std, seed=seed)
    assert m.config.moe.num_experts == E * G and m.config.moe.top_k == K * G
    assert m.config.moe.expert_dim * G == d.config.ffn_dim
    torch.testing.assert_close(_logits(m, seed), _logits(d, seed), atol=1e-5, rtol=1e-5)


def test_every_and_tied_and_source_untouched():
    d = _dense(tie_embeddings=True, attn_bias=True)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    m = upcycle(d, 4, 2, every=2)
    assert m.config.moe_layers == [1] and not m.layers[0].is_moe
    torch.testing.assert_close(_logits(m), _logits(d), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    for k, v in d.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_experts_are_slices_of_the_dense_ffn():
    d = _dense()
    m = upcycle(d, 2, 1, granularity=3)
    F, Fg = 48, 16
    w13, w2 = d.layers[0].ffn.w13.weight, d.layers[0].ffn.w2.weight
    ex = m.layers[0].ffn.experts
    for c in range(2):
        for g in range(3):
            e = c * 3 + g
            torch.testing.assert_close(ex.w13[e, :Fg], w13[g * Fg:(g + 1) * Fg], atol=0, rtol=0)
            torch.testing.assert_close(ex.w13[e, Fg:], w13[F + g * Fg:F + (g + 1) * Fg], atol=0, rtol=0)
            torch.testing.assert_close(ex.w2[e], w2[:, g * Fg:(g + 1) * Fg], atol=0, rtol=0)


def test_bad_requests():
    d = _dense()
    with pytest.raises(ConfigError, match="--granularity"):
        upcycle(d, 4, 2, granularity=5)
    with pytest.raises(ConfigError, match="--top-k"):
        upcycle(d, 2, 3)
    with pytest.raises(ConfigError, match="--router"):
        upcycle(d, 4, 2, router="sigmoid_topk")
    with pytest.raises(ConfigError, match="already has MoE layers"):
        upcycle_config(moekit.get_preset("tiny-moe"), 4, 2)


def test_short_finetune_moves_router_and_lowers_loss():
    torch.manual_seed(0)
    m = upcycle(_dense(), 4, 2, granularity=2).train()
    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(5))
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    r0 = m.layers[0].ffn.router.weight.detach().clone()
    losses = []
    for _ in range(15):
        out = m(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert not torch.equal(m.layers[0].ffn.router.weight, r0)
    used = out.routing[0].tokens_per_expert
    assert (used > 0).sum() > 4  # routing is no longer the init's fixed K whole copies


def test_upcycle_cli_from_hf_dir(tmp_path, capsys):
    from hf_tiny import build_hf, save_hf

    from moekit.cli import main

    hf = build_hf("llama")
    src = save_hf(hf, tmp_path / "hf")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(src / "tokenizer.json"))
    out = tmp_path / "moe"
    assert main(["upcycle", str(src), str(out), "--experts", "8", "--top-k", "2"]) == 0
    text = capsys.readouterr().out
    assert "init check" in text and "moekit train --init-from" in text
    m = load_native(out)
    assert json.loads((out / "config.json").read_text())["moe"]["num_experts"] == 8
    assert (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    # Copy-upcycled (G=1, topk_softmax) models export to HF as Mixtral with the same logits.
    from hf_tiny import load_hf_transformers

    from moekit.checkpoint.hf_export import export_hf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = load_hf_transformers(export_hf(m, tmp_path / "mixtral"))
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    assert main(["upcycle", str(src), str(out)]) == 2  # not empty, no --overwrite
