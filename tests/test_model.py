"""Model-level checks: param counts, cached decode == full forward, save/load, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

import moekit
from moekit.config import ConfigError, ModelConfig, MoEConfig

PRESETS = ["tiny-moe", "tiny-dense", "tiny-deepseek", "tiny-qwen-moe"]


@pytest.mark.parametrize("name", PRESETS + ["small-moe"])
def test_count_params_equals_numel(name):
    cfg = moekit.get_preset(name)
    model = moekit.build_model(cfg)
    pc = moekit.count_params(cfg)
    assert pc.total_params == sum(p.numel() for p in model.parameters())
    assert pc.active_params <= pc.total_params or cfg.tie_embeddings


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-deepseek", "tiny-qwen-moe"])
def test_dense_equivalent_matches_active_params(name):
    cfg = moekit.get_preset(name)
    dense = moekit.dense_equivalent(cfg)
    assert dense.moe is None and not dense.is_moe
    a, b = moekit.count_params(cfg).active_params, moekit.count_params(dense).active_params
    # Equal up to rounding the FFN width to an integer (< one hidden unit per layer).
    assert abs(a - b) <= 3 * cfg.dim * cfg.n_layers, (a, b)


def test_layer_kinds():
    cfg = ModelConfig(n_layers=6, moe=MoEConfig(num_experts=4, top_k=1, expert_dim=8), first_k_dense=1, moe_every=2,
                      dense_layers=[5], dim=32, n_heads=2)
    assert cfg.moe_layers == [1, 3]
    m = moekit.build_model(cfg)
    assert [b.is_moe for b in m.layers] == [False, True, False, True, False, False]


def _variants():
    base = moekit.get_preset("tiny-moe")
    return {
        "moe": base,
        "dense": moekit.get_preset("tiny-dense"),
        "deepseek": moekit.get_preset("tiny-deepseek"),
        "qwen": moekit.get_preset("tiny-qwen-moe"),
        "tied_llama3_rope": base.replace(tie_embeddings=True, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                         "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0}),
        "yarn_bias_olmoe_norm": base.replace(attn_bias=True, qk_norm=True, qk_norm_full=True,
                                             rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64}),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_cached_decode_equals_full_forward(name):
    cfg = _variants()[name]
    model = moekit.build_model(cfg, seed=0).eval()
    torch.manual_seed(1)
    B, S = 2, 12
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(B, 32)
        # prefill 5, then one token at a time
        out = [model(ids[:, :5], cache=cache).logits]
        cache.advance(5)
        for t in range(5, S):
            out.append(model(ids[:, t:t + 1], cache=cache).logits)
            cache.advance(1)
    assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-4)


def test_ragged_cache_rows_are_independent():
    cfg = moekit.get_preset("tiny-moe")
    model = moekit.build_model(cfg, seed=0).eval()
    a = torch.randint(0, cfg.vocab_size, (1, 7))
    b = torch.randint(0, cfg.vocab_size, (1, 4))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits[0, -1], model(b).logits[0, -1]
        cache = model.new_cache(2, 16)
        pad = torch.zeros(1, 3, dtype=torch.long)
        batch = torch.cat([a, torch.cat([b, pad], 1)])
        out = model(batch, cache=cache, logits_at=torch.tensor([6, 3])).logits
        cache.advance(torch.tensor([7, 4]))
        assert_close(out[0, 0], ref_a, atol=1e-5, rtol=1e-4)
        assert_close(out[1, 0], ref_b, atol=1e-5, rtol=1e-4)
        # next token for row b lands at position 4 and must not see the padding at 4..6
        nxt = torch.tensor([[1], [2]])
        step = model(nxt, cache=cache).logits
        ref_b2 = model(torch.cat([b, nxt[1:]], 1)).logits[0, -1]
        ref_a2 = model(torch.cat([a, nxt[:1]], 1)).logits[0, -1]
    assert_close(step[1, 0], ref_b2, atol=1e-5, rtol=1e-4)
    assert_close(step[0, 0], ref_a2, atol=1e-5, rtol=1e-4)


def test_cache_overflow_is_clear():
    model = moekit.build_model(moekit.get_preset("tiny-dense")).eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_exact(tmp_path, name, dtype):
    cfg = moekit.get_preset(name)
    model = moekit.build_model(cfg, seed=3, dtype=dtype)
    if cfg.moe is not None and cfg.moe.score_correction_bias:
        for layer in model.moe_layers():
            layer.router.score_bias.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "m")
    loaded = moekit.load_model(tmp_path / "m")
    assert loaded.config == model.config
    sd1, sd2 = model.state_dict(), loaded.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype, k
        assert torch.equal(sd1[k], sd2[k]), k
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


def test_router_bias_stays_fp32_under_bf16():
    model = moekit.build_model(moekit.get_preset("tiny-deepseek"), dtype=torch.bfloat16)
    for layer in model.moe_layers():
        assert layer.router.score_bias.dtype == torch.float32
        assert layer.experts.w13.dtype == torch.bfloat16


def test_config_json_roundtrip():
    cfg = moekit.get_preset("tiny-deepseek")
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("bad,field", [
    (lambda: MoEConfig(num_experts=4, top_k=5), "moe.top_k"),
    (lambda: ModelConfig(dim=100, n_heads=3), "n_heads"),
    (lambda: MoEConfig(router="expert_choice"), "moe.router"),
    (lambda: ModelConfig(n_heads=4, n_kv_heads=3), "n_kv_heads"),
    (lambda: MoEConfig(num_experts=8, n_group=3), "moe.n_group"),
    (lambda: MoEConfig(capacity_factor=0.0), "moe.capacity_factor"),
    (lambda: MoEConfig(bias_update_rate=0.01), "moe.bias_update_rate"),
    (lambda: ModelConfig.from_dict({"dim": 64, "n_heads": 4, "moe": {"num_experts": 4, "top_k": 9}}), "moe.top_k"),
    (lambda: ModelConfig.from_dict({"dimension": 64}), "unknown config field"),
])
def test_bad_config_names_field(bad, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        bad()


def test_load_errors_name_file_and_tensor(tmp_path):
    from moekit.checkpoint import CheckpointError
    from safetensors.torch import load_file, save_file

    cfg = moekit.get_preset("tiny-moe")
    moekit.build_model(cfg).save_pretrained(tmp_path / "m")
    wf = tmp_path / "m" / "model.safetensors"
    sd = load_file(wf)
    # wrong shape
    bad = dict(sd)
    bad["embed.weight"] = torch.zeros(3, 3)
    save_file(bad, wf)
    with pytest.raises(CheckpointError, match="embed.weight"):
        moekit.load_model(tmp_path / "m")
    # missing tensor
    bad = dict(sd)
    del bad["norm.weight"]
    save_file(bad, wf)
    with pytest.raises(CheckpointError, match="norm.weight"):
        moekit.load_model(tmp_path / "m")
    # truncated file
    save_file(sd, wf)
    data = wf.read_bytes()
    wf.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        moekit.load_model(tmp_path / "m")
    # bad config value
    save_file(sd, wf)
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d["moe"]["router"] = "nope"
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="moe.router"):
        moekit.load_model(tmp_path / "m")


def test_interrupted_save_keeps_previous(tmp_path, monkeypatch):
    from moekit.checkpoint import native

    cfg = moekit.get_preset("tiny-moe")
    m1 = moekit.build_model(cfg, seed=1)
    m1.save_pretrained(tmp_path / "m")
    m2 = moekit.build_model(cfg, seed=2)

    def boom(sd, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(native, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        m2.save_pretrained(tmp_path / "m")
    loaded = moekit.load_model(tmp_path / "m")
    assert torch.equal(loaded.embed.weight, m1.embed.weight)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.endswith(".tmp")]


def test_training_step_reduces_loss_and_bias_update():
    cfg = moekit.get_preset("tiny-deepseek")
    model = moekit.build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    losses = []
    for _ in range(15):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_router_biases([r.tokens_per_expert for r in out.routing if r is not None])
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert any(layer.router.score_bias.abs().sum() > 0 for layer in model.moe_layers())


@pytest.mark.parametrize("H,G", [(4, 4), (8, 2)])
def test_training_attention_math_path_equals_sdpa(H, G):
    """The CPU training attention (two matmuls + float32 softmax) equals SDPA's causal attention,
    outputs and input gradients, fp32, with and without GQA."""
    from moekit.model.attention import causal_attention_math

    torch.manual_seed(H + G)
    B, S, d = 2, 19, 16
    q, k, v = (torch.randn(B, n, S, d, requires_grad=True) for n in (H, G, G))
    go = torch.randn(B, H, S, d)
    got = causal_attention_math(q, k, v, d ** -0.5)
    got.backward(go)
    g_got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5,
                                                            enable_gqa=G != H)
    want.backward(go)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b)


def test_training_forward_equals_inference_forward():
    """Grad-enabled forward (math attention on CPU) gives the logits of the no-grad forward (SDPA)."""
    cfg = moekit.get_preset("tiny-moe")
    model = moekit.build_model(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    train_logits = model(ids).logits
    with torch.no_grad():
        infer_logits = model(ids).logits
    torch.testing.assert_close(train_logits.detach(), infer_logits, rtol=1e-5, atol=1e-5)
