"""gpt-oss import (`GptOssForCausalLM`) against transformers on a tiny random config.

Two checkpoints of the same random model: float experts as `save_pretrained` writes them, and the
hub's MXFP4 layout (`*_blocks` / `*_scales`, built here with moekit's MXFP4 quantizer since
transformers cannot write MXFP4 without its GPU kernels), which transformers loads by dequantizing
on CPU. The window (4) is far shorter than the sequences (24), the clamp limit (1.0) is low enough
to bind, and biases and sinks are far from zero, so each feature changes the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.checkpoint.hf_gpt_oss import codes_to_mx_blocks, config_from_hf, mx_blocks_to_codes
from moekit.config import ConfigError

T = pytest.importorskip("transformers")

V, S, WINDOW = 96, 24, 4
ROPE = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 16, "rope_theta": 150000.0}


def _hf_model():
    torch.manual_seed(0)
    c = T.GptOssConfig(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2, vocab_size=V, hidden_size=64,
                       intermediate_size=32, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                       sliding_window=WINDOW, max_position_embeddings=64, rope_parameters=ROPE, swiglu_limit=1.0,
                       attn_implementation="eager")
    m = T.GptOssForCausalLM(c).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or n.endswith("sinks"):
                p.normal_(0, 0.5)
            elif "experts" in n:
                p.normal_(0, 0.3)  # large enough that the clamp at 1.0 binds
    return m


def _write_mxfp4(src, dst) -> None:
    """The hub layout: experts as `{proj}_blocks` uint8 [E, O, I/32, 16] + `{proj}_scales` [E, O, I/32]
    (O, I of the [E, O, I] = transposed in-memory tensor), everything else as saved."""
    from moekit.quant.modules import QuantizedTensor

    out = {}
    for k, v in load_file(src / "model.safetensors").items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            qt = QuantizedTensor.from_float(v.transpose(1, 2).contiguous(), "mxfp4", 32)
            out[k + "_blocks"] = codes_to_mx_blocks(qt.q).contiguous()
            out[k + "_scales"] = qt.scale.contiguous()
        else:
            out[k] = v
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    hf = _hf_model()
    hf.save_pretrained(root / "plain")
    _write_mxfp4(root / "plain", root / "mx")
    hf_mx = T.GptOssForCausalLM.from_pretrained(str(root / "mx"), dtype=torch.float32,
                                                attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(1))
    return {"plain": root / "plain", "mx": root / "mx", "hf": hf, "hf_mx": hf_mx, "ids": ids}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_config_mapping(ckpt):
    cfg = moekit.load_model(ckpt["plain"]).config
    assert cfg.sliding_window == WINDOW and cfg.sliding_layers == [0, 2]
    assert cfg.attn_sinks and cfg.attn_bias and cfg.attn_out_bias
    assert cfg.moe.expert_act == "clamped_swiglu" and cfg.moe.swiglu_limit == 1.0 and cfg.moe.expert_bias
    assert cfg.moe.router == "topk_softmax" and cfg.moe.router_bias
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["truncate"] is False
    model = moekit.build_model(cfg)
    assert moekit.count_params(cfg).total_params == sum(p.numel() for p in model.parameters())


def test_logits_match_transformers_past_the_window(ckpt):
    model = moekit.load_model(ckpt["plain"])
    ref = _logits(ckpt["hf"], ckpt["ids"])
    torch.testing.assert_close(_logits(model, ckpt["ids"]), ref)
    # Each gpt-oss feature matters here: dropping it moves the logits well past the tolerance.
    for attr, off in (("window", None), ("sinks", None)):
        layer = model.layers[0].attn
        keep = getattr(layer, attr)
        setattr(layer, attr, off)
        layer.local = layer.window is not None
        assert (_logits(model, ckpt["ids"]) - ref).abs().max() > 1e-3, attr
        setattr(layer, attr, keep)
        layer.local = layer.window is not None
    ex = model.layers[1].ffn.experts
    ex.limit = 1e9  # no clamp
    assert (_logits(model, ckpt["ids"]) - ref).abs().max() > 1e-3
    ex.limit = 1.0


@pytest.mark.parametrize("kind", ["plain", "mx"])
def test_cached_decode_equals_full_forward(ckpt, kind):
    model, ids = moekit.load_model(ckpt[kind]), ckpt["ids"]
    full = _logits(model, ids)
    with torch.no_grad():
        cache = model.new_cache(2, 32)
        outs = [model(ids[:, :3], cache=cache).logits]
        cache.advance(3)
        for t in range(3, S):  # one token at a time, far past the window
            outs.append(model(ids[:, t:t + 1], cache=cache).logits)
            cache.advance(1)
        torch.testing.assert_close(torch.cat(outs, 1), full)
        cache = model.new_cache(2, 32)  # chunked prefill: the second chunk's window reaches into the cache
        a = model(ids[:, :7], cache=cache).logits
        cache.advance(7)
        torch.testing.assert_close(torch.cat([a, model(ids[:, 7:], cache=cache).logits], 1), full)


def test_greedy_generation_matches_transformers(ckpt):
    from moekit.inference.engine import generate

    model = moekit.load_model(ckpt["mx"])
    prompts = [ckpt["ids"][0, :5].tolist(), ckpt["ids"][1, :9].tolist()]  # ragged batch
    got = generate(model, prompts, max_new_tokens=10, temperature=0.0)
    for p, g in zip(prompts, got):
        ref = ckpt["hf_mx"].generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert g.tokens == ref[0, len(p):].tolist()


def test_mxfp4_experts_stay_mxfp4_and_match_transformers(ckpt):
    from moekit.quant.modules import QuantizedExperts

    model = moekit.load_model(ckpt["mx"])
    assert model.quant_config.scheme == "mxfp4"
    for i, block in enumerate(model.layers):
        ex = block.ffn.experts
        assert isinstance(ex, QuantizedExperts) and ex.scheme == "mxfp4"
        assert ex.qw13.q.dtype == torch.uint8 and ex.qw13.scale.dtype == torch.uint8
        # No float expert matrix is resident: the only float tensors under `experts` are biases.
        floats = {k for k, v in ex.state_dict().items() if v.is_floating_point()}
        assert floats == {"b13", "b2"}
        # Bit-exact: the codes dequantize to exactly what transformers dequantized from the same bytes.
        hf_ex = ckpt["hf_mx"].model.layers[i].mlp.experts
        F_ = ex.hidden
        gu = hf_ex.gate_up_proj.detach().transpose(1, 2)  # [E, 2F, D], gate/up interleaved
        assert torch.equal(ex.qw13.dequantize(), torch.cat([gu[:, 0::2], gu[:, 1::2]], 1))
        assert torch.equal(ex.qw2.dequantize(), hf_ex.down_proj.detach().transpose(1, 2))
        assert ex.qw13.shape == (4, 2 * F_, 64)
    torch.testing.assert_close(_logits(model, ckpt["ids"]), _logits(ckpt["hf_mx"], ckpt["ids"]))


def test_mx_block_repack_round_trips():
    b = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    q = mx_blocks_to_codes(b)
    assert q.shape == (3, 5, 32)
    assert torch.equal(codes_to_mx_blocks(q), b)
    # Element 2j of a block is byte j's low nibble in HF's layout.
    from moekit.quant.formats import unpack_nibbles

    codes = unpack_nibbles(q)
    assert torch.equal(codes[..., 0:32:2], (b[..., 0, :] & 0xF)) and torch.equal(codes[..., 1:32:2], b[..., 0, :] >> 4)


@pytest.mark.parametrize("kind", ["plain", "mx"])
def test_cli_info_plan_convert_reload(ckpt, kind, tmp_path, capsys):
    from moekit.cli import main

    assert main(["info", str(ckpt[kind])]) == 0
    assert "GptOssForCausalLM" in capsys.readouterr().out
    assert main(["plan", str(ckpt[kind])]) == 0
    out = tmp_path / "native"
    assert main(["convert", str(ckpt[kind]), str(out)]) == 0
    a, b = moekit.load_model(ckpt[kind]), moekit.load_model(out)
    assert type(a.layers[0].ffn.experts) is type(b.layers[0].ffn.experts)
    assert torch.equal(_logits(a, ckpt["ids"]), _logits(b, ckpt["ids"]))


def test_bf16_and_training_paths(ckpt):
    import copy

    # bf16 rounding flips routing in this deliberately sharp tiny model, so transformers' own bf16
    # run is the yardstick: moekit's bf16 error against the fp32 reference is of the same size.
    model = moekit.load_model(ckpt["plain"], dtype=torch.bfloat16)
    ref = _logits(ckpt["hf"], ckpt["ids"])
    hf_err = (_logits(copy.deepcopy(ckpt["hf"]).to(torch.bfloat16), ckpt["ids"]).float() - ref).abs().max()
    assert (_logits(model, ckpt["ids"]).float() - ref).abs().max() < 2 * hf_err + 0.02
    model = moekit.load_model(ckpt["plain"]).train()
    out = model(ckpt["ids"], labels=ckpt["ids"])
    out.loss.backward()
    ex, attn = model.layers[0].ffn.experts, model.layers[0].attn
    assert ex.b13.grad is not None and ex.b13.grad.abs().sum() > 0 and attn.sinks.grad.abs().sum() > 0


def test_bad_configs_name_the_field(ckpt):
    d = json.loads((ckpt["plain"] / "config.json").read_text())
    with pytest.raises(ConfigError, match="quant_method"):
        config_from_hf({**d, "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_hf({**d, "layer_types": ["sliding_attention", "chunked_attention", "full_attention",
                                             "full_attention"]})
    with pytest.raises(ConfigError, match="sliding_layers"):
        moekit.ModelConfig(sliding_window=4)


@pytest.mark.parametrize("kind", ["plain", "mx"])
def test_export_to_hf_round_trips(ckpt, kind, tmp_path):
    """`convert --to hf` writes gpt-oss again (MXFP4 experts as the same bytes) and transformers
    loads it with the same logits."""
    from moekit.cli import main

    out = tmp_path / "hf"
    assert main(["convert", str(ckpt[kind]), str(out), "--to", "hf"]) == 0
    a, b = load_file(ckpt[kind] / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    hf = T.GptOssForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    ref = ckpt["hf"] if kind == "plain" else ckpt["hf_mx"]
    torch.testing.assert_close(_logits(hf, ckpt["ids"]), _logits(ref, ckpt["ids"]))


def test_window_without_sinks_matches_sinks_at_minus_infinity():
    """The SDPA / decode paths a windowed model without sinks takes equal the sink path with every
    sink at -inf (a zero-weight sink column), in a full forward and in cached decode."""
    cfg = moekit.ModelConfig(vocab_size=V, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64,
                             sliding_window=3, sliding_layers=[0, 2],
                             moe=moekit.MoEConfig(num_experts=4, top_k=2, expert_dim=32))
    plain = moekit.build_model(cfg, seed=0).eval()
    sinky = moekit.build_model(cfg.replace(attn_sinks=True), seed=0).eval()
    sinky.load_state_dict(plain.state_dict(), strict=False)
    for b in sinky.layers:
        b.attn.sinks.data.fill_(float("-inf"))
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    full = _logits(plain, ids)
    torch.testing.assert_close(_logits(sinky, ids), full)
    causal = moekit.build_model(cfg.replace(sliding_window=None, sliding_layers=[]), seed=0).eval()
    assert (_logits(causal, ids) - full).abs().max() > 1e-4  # the window is in effect
    with torch.no_grad():
        cache = plain.new_cache(2, 32)
        outs = [plain(ids[:, :5], cache=cache).logits]
        cache.advance(5)
        for t in range(5, 16):
            outs.append(plain(ids[:, t:t + 1], cache=cache).logits)
            cache.advance(1)
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_grouped_mm_path_adds_biases():
    """The CUDA experts path (`torch._grouped_mm`, bf16) with biases and the clamped SwiGLU, run on
    CPU where this torch has the op, against the per-expert path."""
    from moekit.moe.experts import GroupedExperts

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    torch.manual_seed(0)
    ex = GroupedExperts(4, 64, 32, "clamped_swiglu", bias=True, limit=1.0).to(torch.bfloat16)
    with torch.no_grad():
        ex.b13.normal_()
        ex.b2.normal_()
        counts, x = torch.tensor([3, 0, 5, 8]), torch.randn(16, 64, dtype=torch.bfloat16)
        try:
            got = ex._forward_grouped_mm(x, counts)
        except (RuntimeError, NotImplementedError) as e:
            pytest.skip(f"torch._grouped_mm does not run on CPU here ({e})")
        want = torch.cat([ex.expert_forward(e, xx) for e, xx in enumerate(x.split(counts.tolist())) if len(xx)])
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    assert (ex.b2.float().abs().max() > 0.5)  # the biases are large enough to matter
