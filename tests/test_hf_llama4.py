"""Llama 4 (text) import/export parity against transformers.

The tiny config exercises: no-RoPE layers (every 2nd), chunked attention on the RoPE layers at a
length spanning 3 chunks, L2 q/k norm, attention temperature tuning with a small floor_scale (so
the factor changes inside the test length), MoE every 2nd layer with a shared expert, sigmoid
top-1 routing with the weight on the expert input, interleaved (complex) RoPE, GQA.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.checkpoint.hf_llama4 import config_from_hf, export_llama4
from moekit.checkpoint.native import CheckpointError
from moekit.config import ConfigError

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Llama4TextConfig  # noqa: E402
from hf_tiny import hf_greedy, moekit_greedy  # noqa: E402

VOCAB = 96


def _config(**kw) -> Llama4TextConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=80, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                interleave_moe_layer_step=2, attention_chunk_size=8, no_rope_layer_interval=2, floor_scale=4,
                attn_scale=0.5, use_qk_norm=True, attn_temperature_tuning=True, initializer_range=0.1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base.update(kw)
    return Llama4TextConfig(**base)


def _build(cfg, path, seed=0, **save_kw):
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(path, **save_kw)
    return ref


@pytest.fixture(scope="module")
def l4(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama4")
    return _build(_config(), path), path


@torch.no_grad()
def test_logits_greedy_export(l4, tmp_path):
    ref, path = l4
    model = moekit.load_model(path)
    cfg = model.config
    assert cfg.no_rope_layers == [1, 3] and cfg.attention_chunk_size == 8 and cfg.moe_layers == [1, 3]
    assert cfg.moe.weight_on_input and cfg.moe.router == "sigmoid_topk" and cfg.qk_l2_norm
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    expect = ref(ids).logits
    torch.testing.assert_close(model(ids).logits, expect, atol=1e-4, rtol=0)
    # Greedy crosses chunk boundaries (prompt 6 + 20 tokens > 3 chunks of 8) through the cache.
    prompt = ids[:1, :6]
    assert moekit_greedy(model, prompt, 20) == hf_greedy(ref, prompt, 20)
    export_llama4(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(back(ids).logits, expect, atol=1e-4, rtol=0)


@torch.no_grad()
def test_every_feature_matters(l4):
    """Turning any mapped Llama 4 feature off changes the logits: the parity test is not vacuous."""
    ref, path = l4
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    expect = ref(ids).logits
    model = moekit.load_model(path)
    for attr, off in (("chunk", None), ("qk_l2_eps", None), ("temp_tuning", None)):
        layers = [b.attn for b in model.layers if getattr(b.attn, attr) is not None]
        saved = [getattr(a, attr) for a in layers]
        for a in layers:
            setattr(a, attr, off)
        diff = (model(ids).logits - expect).abs().max().item()
        for a, v in zip(layers, saved):
            setattr(a, attr, v)
        assert diff > 1e-3, f"{attr} has no effect ({diff})"


@torch.no_grad()
def test_cached_decode_equals_full_forward(l4):
    _, path = l4
    model = moekit.load_model(path)
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    full = model(ids).logits
    cache = model.new_cache(2, 24)
    steps = [model(ids[:, :7], cache=cache).logits]
    cache.advance(7)
    for i in range(7, 21):
        steps.append(model(ids[:, i:i + 1], cache=cache).logits)
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


@torch.no_grad()
def test_top2_explicit_moe_layers_and_sharded(tmp_path):
    cfg = _config(num_experts_per_tok=2, moe_layers=[0, 3], interleave_moe_layer_step=1, attention_chunk_size=6,
                  no_rope_layers=[1, 0, 0, 1], rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0,
                  "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    ref = _build(cfg, tmp_path, seed=5, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = moekit.load_model(tmp_path)
    assert model.config.moe_layers == [0, 3] and model.config.no_rope_layers == [1, 2]
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_multimodal_checkpoint_loads_language_model(l4, tmp_path):
    """A Llama4ForConditionalGeneration layout (language_model.* keys, text_config, vision tensors)."""
    ref, path = l4
    sd = {("language_model." + k): v for k, v in load_file(path / "model.safetensors").items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.zeros(4, 4)
    save_file(sd, tmp_path / "model.safetensors")
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Llama4ForConditionalGeneration"],
                                                      "model_type": "llama4", "text_config": text}))
    with pytest.warns(UserWarning, match="vision"):
        from moekit.checkpoint.hf_llama4 import load_llama4

        model = load_llama4(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(moekit.load_model(tmp_path)(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_bad_input(l4, tmp_path):
    _, path = l4
    sd = load_file(path / "model.safetensors")
    sd["model.layers.1.feed_forward.experts.gate_up_proj"] = torch.zeros(4, 64, 60)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj.*shape"):
        moekit.load_model(tmp_path)
    d = _config().to_dict()
    with pytest.raises(ConfigError, match="attention_bias"):
        config_from_hf({**d, "attention_bias": True})
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_hf({**d, "layer_types": ["full_attention", "chunked_attention"] * 2})
