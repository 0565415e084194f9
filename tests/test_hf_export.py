"""Hugging Face export: what moekit writes, transformers' from_pretrained loads with the same
logits; moekit-native models export as the closest HF architecture or fail clearly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_tiny import CASES, build_hf, load_hf_transformers, random_ids, save_hf

import moekit
from moekit.checkpoint import CheckpointError
from moekit.checkpoint.convert import convert
from moekit.checkpoint.hf_export import choose_architecture, export_hf, parse_size
from moekit.config import ConfigError, ModelConfig, MoEConfig


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return moekit.load_model(path, **kw)


def _same_logits(a, b, vocab, atol=1e-4):
    ids = random_ids(vocab)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits.float(), b(ids).logits.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c != "mistral"])
def test_roundtrip_hf_moekit_hf(tmp_path, case):
    hf = build_hf(case)
    m = _load(save_hf(hf, tmp_path / "src"))
    out = export_hf(m, tmp_path / "out")
    back = load_hf_transformers(out)
    assert type(back).__name__ == type(hf).__name__
    _same_logits(back, hf, hf.config.vocab_size)
    # ... and moekit reads its own export back.
    _same_logits(_load(out), hf, hf.config.vocab_size)


def test_mistral_exports_as_llama_math(tmp_path):
    hf = build_hf("mistral")
    m = _load(save_hf(hf, tmp_path / "src"))
    back = load_hf_transformers(export_hf(m, tmp_path / "out"))
    assert type(back).__name__ == "LlamaForCausalLM"
    _same_logits(back, hf, hf.config.vocab_size)


NATIVE = {
    "MixtralForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                      moe=MoEConfig(num_experts=4, top_k=2, expert_dim=24)),
    "Qwen3MoeForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16,
                                       ffn_dim=40, qk_norm=True, first_k_dense=1, tie_embeddings=True,
                                       moe=MoEConfig(num_experts=6, top_k=2, expert_dim=16, router="softmax_topk")),
    "Qwen2MoeForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, ffn_dim=48, attn_bias=True,
                                       moe=MoEConfig(num_experts=4, top_k=1, expert_dim=24, router="softmax_topk",
                                                     num_shared_experts=1, shared_expert_dim=32,
                                                     shared_expert_gate=True)),
    "OlmoeForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, ffn_dim=48, qk_norm=True,
                                    qk_norm_full=True, moe=MoEConfig(num_experts=8, top_k=3, expert_dim=16,
                                                                     router="softmax_topk", norm_topk_prob=True)),
    "LlamaForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, ffn_dim=48,
                                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "Qwen2ForCausalLM": ModelConfig(vocab_size=80, dim=32, n_layers=2, n_heads=4, ffn_dim=48, attn_bias=True),
}


@pytest.mark.parametrize("arch", list(NATIVE))
def test_native_model_exports_to_closest_arch(tmp_path, arch):
    m = moekit.build_model(NATIVE[arch], seed=0).eval()
    with torch.no_grad():  # random, non-trivial norms and biases so every tensor's mapping matters
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    out = export_hf(m, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    back = load_hf_transformers(out)
    assert type(back).__name__ == arch
    _same_logits(back, m, 80)


def test_no_arch_fits_lists_reasons():
    cfg = moekit.get_preset("tiny-qwen-moe")  # q/k norm *and* a gated shared expert
    with pytest.raises(ConfigError, match=r"(?s)no Hugging Face architecture.*Qwen2MoeForCausalLM: .*qk_norm"):
        choose_architecture(cfg)
    with pytest.raises(ConfigError, match="--arch"):
        choose_architecture(NATIVE["LlamaForCausalLM"], "NopeForCausalLM")
    bad = NATIVE["MixtralForCausalLM"].replace(moe=MoEConfig(num_experts=4, top_k=2, expert_dim=24,
                                                             routed_scaling_factor=2.0))
    with pytest.raises(ConfigError, match="routed_scaling_factor"):
        choose_architecture(bad)


def test_sharded_export_and_dtype(tmp_path):
    m = moekit.build_model(NATIVE["MixtralForCausalLM"], seed=1).eval()
    out = export_hf(m, tmp_path / "hf", dtype=torch.bfloat16, max_shard_size="16KB")
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    back = _load(out)
    assert back.dtype == torch.bfloat16
    hf = load_hf_transformers(out)
    _same_logits(hf.float(), back.float(), 80)
    # Re-export unsharded into the same directory: stale shards and index are removed.
    export_hf(m, out, max_shard_size="1GB")
    assert not (out / "model.safetensors.index.json").exists() and [p.name for p in out.glob("*.safetensors")] == [
        "model.safetensors"]
    _same_logits(_load(out), m, 80)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(10) == 10
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_convert_cli_end_to_end(tmp_path, capsys):
    from moekit.cli import main

    hf = build_hf("qwen2_moe")
    src = save_hf(hf, tmp_path / "src")
    assert main(["convert", str(src), str(tmp_path / "native")]) == 0
    native = moekit.load_model(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["moekit_version"] == 1
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf",
                 "--max-shard-size", "40KB"]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    _same_logits(load_hf_transformers(tmp_path / "hf"), hf, 96)
    _same_logits(native, hf, 96)
    # Refuses to overwrite, and the gguf target is a clean error until its exporter exists.
    assert main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf"]) == 2
    import importlib.util

    if importlib.util.find_spec("moekit.checkpoint.gguf_export") is None:
        with pytest.raises(CheckpointError, match="GGUF export"):
            convert(src, tmp_path / "g", to="gguf")
