"""Hugging Face import: tiny random models built by transformers load in moekit with the same
logits (<= 1e-4) and the same 20 greedy tokens; sharded and v5-fused layouts; bad files fail
with a CheckpointError naming the file and tensor."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hf_tiny import CASES, build_hf, hf_greedy, moekit_greedy, random_ids, save_hf
from safetensors.torch import load_file, save_file

import moekit
from moekit.checkpoint import CheckpointError
from moekit.checkpoint.hf import load_hf, load_tokenizer
from moekit.checkpoint.hf_config import config_from_hf
from moekit.config import ConfigError
from moekit.errors import MoekitError


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mistral's sliding-window note
        return moekit.load_model(path)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case built once and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for case in CASES:
        hf = build_hf(case)
        out[case] = (hf, save_hf(hf, root / case))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match(saved, case):
    hf, path = saved[case]
    m = _load(path)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        ref, got = hf(ids).logits, m(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    prompt = ids[:1, :5]
    assert moekit_greedy(m, prompt, 20) == hf_greedy(hf, prompt, 20)


def test_config_mapping_reads_the_math_fields(saved):
    q2 = _load(saved["qwen2_moe"][1]).config
    assert q2.moe_layers == [1]  # decoder_sparse_step=2 -> layers 1 and 3; mlp_only_layers=[3]
    assert q2.moe.shared_expert_gate and q2.moe.shared_expert_dim == 40 and q2.moe.norm_topk_prob
    assert q2.attn_bias and q2.tie_embeddings and q2.norm_eps == 1e-6
    q3 = _load(saved["qwen3_moe"][1]).config
    assert q3.qk_norm and not q3.qk_norm_full and q3.hd == 16 and not q3.moe.norm_topk_prob
    assert q3.moe_layers == [1] and q3.rope_scaling["rope_type"] == "yarn"
    ol = _load(saved["olmoe"][1]).config
    assert ol.qk_norm_full and ol.moe.router == "softmax_topk" and not ol.moe.norm_topk_prob
    mx = _load(saved["mixtral"][1]).config
    assert mx.moe.router == "topk_softmax" and mx.rope_theta == 5e5 and mx.hd == 16 and mx.norm_eps == 1e-5
    # Class defaults apply to fields the file leaves out (OLMoE: norm_topk_prob False, eps 1e-5).
    d = json.loads((saved["olmoe"][1] / "config.json").read_text())
    for k in ("norm_topk_prob", "rms_norm_eps", "rope_parameters"):
        d.pop(k, None)
    c = config_from_hf(d)
    assert not c.moe.norm_topk_prob and c.norm_eps == 1e-5 and c.rope_theta == 1e4


def test_mistral_sliding_window_caps_length(saved):
    with pytest.warns(UserWarning, match="sliding_window=128"):
        m = moekit.load_model(saved["mistral"][1])
    assert m.config.max_seq_len == 128


def test_sharded_checkpoint(saved, tmp_path):
    hf, _ = saved["qwen2_moe"]
    path = save_hf(hf, tmp_path / "sharded", max_shard_size="30KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    m = _load(path)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_transformers_v5_fused_expert_layout(saved, tmp_path, case):
    # transformers v5 keeps experts fused in memory (experts.gate_up_proj [E, 2F, D]); a file
    # written from that state dict must load too.
    hf, src = saved[case]
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, tmp_path / "model.safetensors")
    m = _load(tmp_path)
    ids = random_ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_bf16_stays_bf16_and_exact(saved, tmp_path):
    hf, _ = saved["qwen3_moe_norm"]
    path = save_hf(hf.to(torch.bfloat16), tmp_path / "bf16")
    hf.float()
    m = _load(path)
    assert m.dtype == torch.bfloat16 and m.layers[0].ffn.experts.w13.dtype == torch.bfloat16
    ref = load_file(path / "model.safetensors")
    w = ref["model.layers.0.mlp.experts.1.up_proj.weight"]
    assert torch.equal(m.layers[0].ffn.experts.w13[1, w.shape[0]:], w)
    assert _load(saved["qwen3_moe_norm"][1]).dtype == torch.float32
    assert moekit.load_model(path, dtype=torch.float32).dtype == torch.float32


def test_tokenizer_loads_with_model(saved, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, src = saved["llama"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    m = _load(tmp_path)
    assert m.tokenizer.encode("hello world").ids == [0, 1]
    assert load_tokenizer(tmp_path).encode("world").ids == [1]
    assert load_tokenizer(src) is None


# ------------------------------------------------------------------------------ bad files
@pytest.fixture
def llama_dir(saved, tmp_path):
    _, src = saved["qwen2"]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_tensor(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_hf(llama_dir)


def test_wrong_shape(llama_dir):
    def bad(sd):
        sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(40, 32)

    _rewrite(llama_dir, bad)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.up_proj\.weight.*\(40, 32\)"):
        load_hf(llama_dir)


def test_unexpected_tensor(llama_dir):
    _rewrite(llama_dir, lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.9"):
        load_hf(llama_dir)


def test_truncated_file(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_hf(llama_dir)


def test_missing_shard(saved, tmp_path):
    hf, _ = saved["llama"]
    path = save_hf(hf, tmp_path / "sh", max_shard_size="20KB")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_hf(path)


def test_pickle_bin_refused(tmp_path, saved):
    (tmp_path / "config.json").write_text((saved["llama"][1] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loaded.*safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("architectures", ["GPTNeoXForCausalLM"], r"`architectures`.*GPTNeoXForCausalLM"),
    ("hidden_act", "gelu", r"`hidden_act`.*'gelu'"),
    ("attention_bias", True, r"`attention_bias`.*o_proj"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, r"rope_type.*longrope"),
    ("mlp_bias", True, r"`mlp_bias`"),
])
def test_unsupported_config_values(tmp_path, saved, field, value, match):
    d = json.loads((saved["llama"][1] / "config.json").read_text())
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(MoekitError, match=match) as e:
        load_hf(tmp_path)
    assert "config.json" in str(e.value)


def test_olmoe_clip_qkv_refused(saved):
    d = json.loads((saved["olmoe"][1] / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"`clip_qkv`.*8\.0"):
        config_from_hf({**d, "clip_qkv": 8.0})


def test_cli_error_is_one_line(tmp_path, capsys, saved):
    from moekit.cli import main

    (tmp_path / "in").mkdir()
    d = json.loads((saved["llama"][1] / "config.json").read_text())
    (tmp_path / "in" / "config.json").write_text(json.dumps({**d, "architectures": ["FooForCausalLM"]}))
    assert main(["convert", str(tmp_path / "in"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "FooForCausalLM" in err and "Traceback" not in err


def test_v4_style_rope_fields_and_aliases():
    d = {"architectures": ["MixtralForCausalLM"], "vocab_size": 10, "hidden_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
         "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 512}
    c = config_from_hf(d)
    assert c.rope_theta == 1e6 and c.n_kv_heads == 2 and c.moe.num_experts == 4
    assert c.rope_scaling == {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 512}
    q = config_from_hf({**d, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 6, "rope_scaling": None})
    assert q.moe.num_experts == 6 and q.rope_scaling is None and q.norm_eps == 1e-6
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        config_from_hf({**d, "partial_rotary_factor": 0.5})


def test_missing_required_field_names_it():
    with pytest.raises(ConfigError, match=r"`?'hidden_size'`?.*missing"):
        config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}, source="x/config.json")
