"""Whole-expert pruning: identity at full keep, equality with routing-masked originals, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.errors import MoekitError
from moekit.memory import calibrate, choose_experts, prune_model
from moekit.memory.prune import num_to_keep
from moekit.moe.router import route


def _cfg(kind: str) -> moekit.ModelConfig:
    if kind == "mixtral":
        return moekit.get_preset("tiny-moe")
    if kind == "qwen":
        return moekit.get_preset("tiny-qwen-moe")
    # sigmoid router with a correction bias and router bias (DeepSeek-V3-like without groups)
    c = moekit.get_preset("tiny-moe")
    return dataclasses.replace(c, moe=dataclasses.replace(c.moe, router="sigmoid_topk", norm_topk_prob=True,
                                                          score_correction_bias=True, router_bias=True))


_MODELS: dict = {}


def _model(kind: str):
    if kind not in _MODELS:
        m = moekit.build_model(_cfg(kind), seed=0).eval()
        with torch.no_grad():  # non-trivial biases so their slicing is exercised
            for layer in m.moe_layers():
                if layer.router.score_bias is not None:
                    layer.router.score_bias.copy_(torch.randn(layer.cfg.num_experts) * 0.05)
                if layer.router.bias is not None:
                    layer.router.bias.copy_(torch.randn(layer.cfg.num_experts) * 0.5)
        _MODELS[kind] = m
    return _MODELS[kind]


def _ids(vocab: int, n: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["mixtral", "qwen", "sigmoid"])
def test_prune_to_all_experts_is_identity(kind):
    m = _model(kind)
    E = m.config.moe.num_experts
    p = prune_model(m, [list(range(E))] * len(m.moe_layers()))
    x = _ids(m.config.vocab_size)
    torch.testing.assert_close(p(x).logits, m(x).logits, rtol=0, atol=0)


def _masked_forward(model, x, keep):
    """The original model with the pruned experts' router logits at -inf (routing masked)."""
    originals = []
    for layer, k in zip(model.moe_layers(), keep):
        r = layer.router
        mask_E = torch.full((layer.cfg.num_experts,), float("-inf"))
        mask_E[k] = 0.0
        orig = r.forward

        def fwd(x_TD, r=r, mask_E=mask_E):
            logits = torch.nn.functional.linear(x_TD.float(), r.weight.float(), None if r.bias is None else r.bias.float())
            return route(logits + mask_E, r.cfg, r.score_bias)

        r.forward = fwd
        originals.append((r, orig))
    try:
        return model(x).logits
    finally:
        for r, orig in originals:
            r.forward = orig


@settings(max_examples=10, deadline=None)
@given(kind=st.sampled_from(["mixtral", "qwen", "sigmoid"]), seed=st.integers(0, 10_000), n_keep=st.integers(2, 7),
       per_layer=st.booleans())
def test_pruned_equals_masked_routing(kind, seed, n_keep, per_layer):
    """Uniform or per-layer counts: the pruned model equals the original with the pruned experts
    masked out of routing."""
    m = _model(kind)
    E = m.config.moe.num_experts
    g = torch.Generator().manual_seed(seed)
    counts = [n_keep] * len(m.moe_layers())
    if per_layer:
        counts = [int(torch.randint(2, E + 1, (1,), generator=g)) for _ in m.moe_layers()]
    keep = [sorted(torch.randperm(E, generator=g)[:n].tolist()) for n in counts]
    p = prune_model(m, keep)
    assert [layer.experts.num_experts for layer in p.moe_layers()] == counts
    assert p.config.moe.num_experts == max(counts)
    assert p.config.moe_layer_experts == ([] if len(set(counts)) == 1 else counts)
    x = _ids(m.config.vocab_size, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(p(x).logits, _masked_forward(m, x, keep), rtol=1e-5, atol=1e-5)


def test_pruned_model_saves_and_loads(tmp_path):
    m = _model("sigmoid")
    p = prune_model(m, [[0, 2, 5, 7]] * len(m.moe_layers()))
    moekit.save_model(p, tmp_path / "p")
    q = moekit.load_model(tmp_path / "p")
    assert q.config.moe.num_experts == 4
    assert q.moe_layers()[0].router.score_bias.shape == (4,)
    x = _ids(m.config.vocab_size)
    torch.testing.assert_close(q(x).logits, p(x).logits, rtol=0, atol=0)


def test_per_layer_counts_save_load_and_refuse_hf_gguf_export(tmp_path):
    from moekit.checkpoint.gguf_export import export_gguf
    from moekit.checkpoint.hf_export import export_hf
    from moekit.checkpoint.native import CheckpointError
    from moekit.model.params import count_params

    m = _model("sigmoid")
    p = prune_model(m, [[0, 2, 5, 7], [1, 3, 4, 5, 6, 7]][: len(m.moe_layers())])
    moekit.save_model(p, tmp_path / "p")
    q = moekit.load_model(tmp_path / "p")
    assert q.config.moe_layer_experts == [4, 6] and q.moe_layers()[0].router.score_bias.shape == (4,)
    assert count_params(q.config).total_params == sum(t.numel() for t in q.parameters())
    x = _ids(m.config.vocab_size)
    torch.testing.assert_close(q(x).logits, p(x).logits, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="per layer"):
        export_hf(q, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="per layer"):
        export_gguf(q, tmp_path / "g.gguf")
    with pytest.raises(moekit.ConfigError, match="moe_layer_experts"):
        dataclasses.replace(q.config, moe_layer_experts=[1, 8])  # below top_k
    from moekit.plan.spec import dense_same_total

    assert not moekit.dense_equivalent(q.config).is_moe  # `info` / `bench` build it
    assert not dense_same_total(q.config).is_moe


def test_per_layer_budget_follows_the_saliency_share():
    """Same total as uniform, at least top_k per layer; a layer whose saliency is spread evenly keeps
    more experts than one where two experts carry it."""
    from types import SimpleNamespace

    from moekit.memory.prune import allocate_experts

    flat = [1.0] * 8
    peaked = [10.0, 9.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    stats = SimpleNamespace(criterion=lambda c: [peaked, flat])
    keep = allocate_experts(stats, 5, "reap", 2)
    assert sum(map(len, keep)) == 10 and all(len(k) >= 2 for k in keep)
    assert keep[0] == [0, 1] and len(keep[1]) == 8
    stats = SimpleNamespace(criterion=lambda c: [flat, flat])
    assert [len(k) for k in allocate_experts(stats, 5, "reap", 2)] == [5, 5]
    m = _model("mixtral")  # real statistics: a valid keep list for prune_model
    st_ = calibrate(m, torch.randint(0, m.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0)),
                    seq_len=64)
    keep = allocate_experts(st_, 5, "reap", m.config.moe.top_k)
    assert sum(map(len, keep)) == 5 * len(m.moe_layers())
    p = prune_model(m, keep)
    assert [layer.experts.num_experts for layer in p.moe_layers()] == [len(k) for k in keep]


def test_criteria_pick_by_their_statistic():
    m = _model("mixtral")
    stats = calibrate(m, torch.randint(0, m.config.vocab_size, (600,), generator=torch.Generator().manual_seed(0)),
                      seq_len=64)
    assert sum(stats.frequency[0]) == stats.tokens * m.config.moe.top_k
    for crit in ("frequency", "reap"):
        keep = choose_experts(stats, 5, crit, 8, len(stats.layers))
        for li, k in enumerate(keep):
            s = stats.criterion(crit)[li]
            assert min(s[e] for e in k) >= max(s[e] for e in range(8) if e not in k)
    r1 = choose_experts(None, 5, "random", 8, 2, seed=1)
    assert r1 == choose_experts(None, 5, "random", 8, 2, seed=1) and all(len(k) == 5 for k in r1)


def test_keep_bounds():
    assert num_to_keep(8, 2, None, 0.75) == 6
    with pytest.raises(MoekitError, match="top_k"):
        num_to_keep(8, 2, 1, None)
    with pytest.raises(MoekitError, match="exactly one"):
        num_to_keep(8, 2, 4, 0.5)


def test_prune_cli(tmp_path, monkeypatch):
    from moekit.cli import main

    m = _model("mixtral")
    moekit.save_model(m, tmp_path / "m")
    assert main(["prune", str(tmp_path / "m"), str(tmp_path / "r"), "--keep", "5", "--criterion", "random"]) == 0
    q = moekit.load_model(tmp_path / "r")
    assert q.config.moe.num_experts == 5
    rep = json.loads((tmp_path / "r" / "prune_stats.json").read_text())
    assert rep["kept"] == 5 and len(rep["keep"]) == len(m.moe_layers())
    assert main(["prune", str(tmp_path / "m"), str(tmp_path / "r2"), "--keep", "5", "--criterion", "reap"]) == 2
    assert main(["prune", str(tmp_path / "m"), str(tmp_path / "r3"), "--keep", "1", "--criterion", "random"]) == 2
    assert main(["prune", str(tmp_path / "m"), str(tmp_path / "r4"), "--keep", "5", "--criterion", "random",
                 "--per-layer-budget"]) == 2
