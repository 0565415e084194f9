"""DeepSeek-V3/V2 import/export parity against transformers, and the MLA compressed cache.

Tiny random models are built by transformers itself (offline, fp32) with configs that exercise
every feature the importer maps: q LoRA, yarn RoPE with mscale / mscale_all_dim, interleaved RoPE,
group-limited sigmoid routing with a selection bias, routed scaling, shared experts, leading dense
layers, and the MTP layer that must be skipped.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import moekit
from moekit.checkpoint.hf_deepseek import config_from_hf, export_deepseek
from moekit.checkpoint.hf_pieces import deinterleave_rows
from moekit.checkpoint.native import CheckpointError
from moekit.config import ConfigError
from moekit.moe.router import route

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config  # noqa: E402
from hf_tiny import hf_greedy, moekit_greedy

VOCAB = 96


def _v3_config(**kw) -> DeepseekV3Config:
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, kv_lora_rank=16,
                q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
                num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                max_position_embeddings=256, initializer_range=0.1, rope_interleave=True,
                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.8,
                                 "beta_fast": 32.0, "beta_slow": 1.0})
    base.update(kw)
    return DeepseekV3Config(**base)


def _build(cfg, path, seed=0, shard=None):
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # a non-zero selection bias, so selection != weighting is exercised
        for mod in ref.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.copy_(torch.randn_like(mod.e_score_correction_bias) * 0.05)
    kw = {"max_shard_size": shard} if shard else {}
    ref.save_pretrained(path, **kw)
    return ref


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MTP note
        return moekit.load_model(path)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv3")
    ref = _build(_v3_config(), path)
    return ref, path


@torch.no_grad()
def test_v3_logits_greedy_and_export(v3, tmp_path):
    ref, path = v3
    model = _load(path)
    cfg = model.config
    assert cfg.attention == "mla" and cfg.first_k_dense == 1 and cfg.moe_layers == [1, 2]
    assert cfg.moe.router == "sigmoid_topk" and cfg.moe.n_group == 4 and cfg.moe.shared_expert_dim == 48
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    expect = ref(ids).logits
    torch.testing.assert_close(model(ids).logits, expect, atol=1e-4, rtol=0)
    prompt = ids[:1, :6]
    assert moekit_greedy(model, prompt, 20) == hf_greedy(ref, prompt, 20)
    # Export (interleaved RoPE rows restored) and reload in transformers.
    export_deepseek(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(back(ids).logits, expect, atol=1e-4, rtol=0)


@torch.no_grad()
def test_v3_without_q_lora_and_plain_rope(tmp_path):
    ref = _build(_v3_config(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1, first_k_dense_replace=0,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0}), tmp_path, seed=3)
    model = _load(tmp_path)
    assert model.layers[0].attn.q_proj is not None and model.config.rope_scaling is None
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_v2_group_limited_greedy(tmp_path):
    cfg = DeepseekV2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                           n_routed_experts=8, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=12,
                           qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=2,
                           topk_method="group_limited_greedy", routed_scaling_factor=1.5, first_k_dense_replace=0,
                           initializer_range=0.1)
    torch.manual_seed(4)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = _load(tmp_path)
    assert model.config.moe.router == "softmax_topk" and model.config.moe.group_score == "max"
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sharded_checkpoint_loads(v3, tmp_path):
    ref, _ = v3
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = _load(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_stays_bf16_with_fp32_selection_bias(v3, tmp_path):
    ref, _ = v3
    half = copy.deepcopy(ref).to(torch.bfloat16)  # the module fixture stays fp32
    half.save_pretrained(tmp_path)
    model = _load(tmp_path)
    assert model.dtype == torch.bfloat16
    assert model.layers[1].ffn.router.score_bias.dtype == torch.float32
    torch.testing.assert_close(model.layers[1].ffn.router.score_bias,
                               half.model.layers[1].mlp.gate.e_score_correction_bias.float())
    torch.testing.assert_close(model.layers[1].ffn.experts.w2[3], half.model.layers[1].mlp.experts.down_proj[3])


@torch.no_grad()
def test_mla_cache_is_compressed_and_matches_full_forward(v3):
    _, path = v3
    model = _load(path)
    cfg = model.config
    ids = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(7))
    full = model(ids).logits
    for absorb in (True, False):
        for layer in model.layers:
            layer.attn.absorb_decode = absorb
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :5], cache=cache).logits]
        cache.advance(5)
        for i in range(5, 14):
            steps.append(model(ids[:, i:i + 1], cache=cache).logits)
            cache.advance(1)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    # Only the latent (C) and the shared rope key (R) per token per layer: nothing per head.
    lat, rope = cache.layers[0]
    assert lat.shape == (2, 16, cfg.kv_lora_rank) and rope.shape == (2, 16, cfg.qk_rope_head_dim)
    assert cache.nbytes() == cfg.n_layers * 2 * 16 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


@torch.no_grad()
def test_fused_expert_layout_loads(v3, tmp_path):
    """transformers' in-memory fused layout (experts.gate_up_proj [E, 2F, D]) loads the same."""
    ref, path = v3
    sd = {k: v for k, v in ref.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(_load(tmp_path)(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_mtp_layer_is_skipped_with_warning(v3, tmp_path):
    ref, path = v3
    sd = load_file(path / "model.safetensors")
    n = ref.config.num_hidden_layers
    sd[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(64, 128)
    sd[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = torch.zeros(4, 4)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.warns(UserWarning, match="MTP"):
        model = moekit.load_model(tmp_path)
    assert model.config.n_layers == n


def _copy_with(path, tmp_path, edit_sd=None, edit_cfg=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    sd = load_file(path / "model.safetensors")
    d = json.loads((path / "config.json").read_text())
    if edit_sd:
        edit_sd(sd)
    if edit_cfg:
        edit_cfg(d)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path


def test_bad_checkpoints_name_file_and_tensor(v3, tmp_path):
    _, path = v3
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    p = _copy_with(path, tmp_path / "missing", edit_sd=lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"missing tensor.*experts\.3\.up_proj"):
        _load(p)
    p = _copy_with(path, tmp_path / "shape", edit_sd=lambda sd: sd.update({key: torch.zeros(24, 63)}))
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj.*shape \(24, 63\)"):
        _load(p)
    p = _copy_with(path, tmp_path / "trunc")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        _load(p)
    p = _copy_with(path, tmp_path / "act", edit_cfg=lambda d: d.update(hidden_act="gelu"))
    with pytest.raises(CheckpointError, match="hidden_act"):
        _load(p)
    p = _copy_with(path, tmp_path / "freq", edit_cfg=lambda d: d.update(moe_layer_freq=2))
    with pytest.raises(CheckpointError, match="moe_layer_freq"):
        _load(p)


def test_config_mapping_reads_the_file_not_defaults():
    d = {**_v3_config(routed_scaling_factor=1.25, topk_group=3, norm_topk_prob=False).to_dict(),
         "num_nextn_predict_layers": 0}
    cfg = config_from_hf(d)
    m = cfg.moe
    assert (m.routed_scaling_factor, m.topk_group, m.norm_topk_prob, m.score_correction_bias) == (1.25, 3, False, True)
    assert cfg.rope_scaling["mscale_all_dim"] == 0.8 and cfg.q_lora_rank == 24
    with pytest.raises(ConfigError, match="scoring_func"):
        config_from_hf({**d, "scoring_func": "softmax"})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1), st.sampled_from([(8, 4, 2, 3), (16, 8, 3, 4), (12, 1, 1, 2)]))
def test_router_matches_hf_topk_router(tokens, seed, shape):
    """moekit's sigmoid group-limited routing picks HF's experts with HF's weights."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, G, TG, K = shape
    hf_cfg = _v3_config(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K)
    g = torch.Generator().manual_seed(seed)
    r = DeepseekV3TopkRouter(hf_cfg)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, 64, generator=g))
        r.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    x = torch.randn(tokens, 64, generator=g)
    logits, w_hf, ids_hf = r(x)
    out = route(logits, config_from_hf({**hf_cfg.to_dict(), "num_nextn_predict_layers": 0}).moe, r.e_score_correction_bias)
    order_hf, order_mk = ids_hf.sort(-1), out.topk_ids_TK.sort(-1)
    assert torch.equal(order_hf.values, order_mk.values)
    torch.testing.assert_close(w_hf.gather(1, order_hf.indices), out.topk_weights_TK.gather(1, order_mk.indices))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 3))
def test_deinterleave_is_a_permutation_with_inverse(heads, half_rope, nope):
    rope = 2 * half_rope
    fwd, inv = deinterleave_rows(heads, nope + rope, nope, rope)
    w = torch.arange(heads * (nope + rope) * 3, dtype=torch.float32).view(-1, 3)
    assert torch.equal(inv(fwd(w)), w)
    assert sorted(fwd(w)[:, 0].tolist()) == sorted(w[:, 0].tolist())
    # Within a head: nope rows untouched, then even rope rows, then odd ones.
    blk = fwd(w)[: nope + rope, 0] / 3
    assert blk.tolist() == list(range(nope)) + list(range(nope, nope + rope, 2)) + list(range(nope + 1, nope + rope, 2))
