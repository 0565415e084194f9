"""Tiny random Hugging Face models for the import/export/upcycle tests (built offline by
transformers itself), and the greedy decoding loops compared across implementations."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

transformers = __import__("pytest").importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# One config per case, each exercising the fields that change that architecture's math.
CASES: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    rope_theta=5e5, rope_scaling={"rope_type": "linear", "factor": 2.0}, rms_norm_eps=1e-5),
    "qwen2_moe": dict(model_type="qwen2_moe", num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=24, shared_expert_intermediate_size=40, decoder_sparse_step=2,
                      mlp_only_layers=[3], norm_topk_prob=True, qkv_bias=True, tie_word_embeddings=True),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                      head_dim=16, norm_topk_prob=False, mlp_only_layers=[0],
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3_moe_norm": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                           norm_topk_prob=True, decoder_sparse_step=1, tie_word_embeddings=True),
    "olmoe": dict(model_type="olmoe", num_experts=16, num_experts_per_tok=4, intermediate_size=24,
                  norm_topk_prob=False, rms_norm_eps=1e-5, eos_token_id=2, pad_token_id=1),
    "llama": dict(model_type="llama", head_dim=16, tie_word_embeddings=True,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", sliding_window=128, rope_theta=1e6),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1e6),
}


def build_hf(case: str, seed: int = 0, **overrides):
    """A random-init HF causal LM for `case`, with weights spread wider than HF's 0.02 init so
    logits, routing and greedy tokens are well separated (norm weights around 1, not exactly 1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**BASE, **CASES[case], **overrides}
    mt = kw.pop("model_type")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = AutoConfig.for_model(mt, **kw)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def save_hf(model, path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path, **kw)
    return path


def load_hf_transformers(path: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(path).eval()


@torch.no_grad()
def hf_greedy(model, prompt_1S: torch.Tensor, n: int) -> list[int]:
    # No end-of-sequence stop (and no eos suppression either): plain argmax for n steps.
    model.generation_config.eos_token_id = None
    out = model.generate(prompt_1S, max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == prompt_1S.shape[1] + n
    return out[0, prompt_1S.shape[1]:].tolist()


@torch.no_grad()
def moekit_greedy(model, prompt_1S: torch.Tensor, n: int) -> list[int]:
    """Greedy decoding through moekit's KV cache: prefill once, then one token per step."""
    S = prompt_1S.shape[1]
    cache = model.new_cache(1, S + n)
    logits = model(prompt_1S, cache=cache).logits
    cache.advance(S)
    tok = logits[:, -1].argmax(-1)
    toks = [int(tok)]
    for _ in range(n - 1):
        logits = model(tok.view(1, 1), cache=cache).logits
        cache.advance(1)
        tok = logits[:, -1].argmax(-1)
        toks.append(int(tok))
    return toks


def random_ids(vocab: int, batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
