"""HyperMoE (moekit.moe.hypermoe): a zero-initialised HyperExpert leaves the base MoE unchanged,
gradients reach the shared hypernetwork, per-set generation equals the paper's per-token one, and
the model keeps working through decode, save/load, counting, planning and config validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

import moekit
from moekit.config import ConfigError, ModelConfig, MoEConfig
from moekit.moe.hypermoe import HyperNetwork, expert_sets, generator_params
from train_helpers import one_thread  # noqa: F401  (autouse fixture: one torch thread)


def _cfg(hyper_dim: int = 8, **moe) -> ModelConfig:
    cfg = moekit.get_preset("tiny-moe").replace(max_seq_len=64)
    return cfg.replace(moe=dataclasses.replace(cfg.moe, hyper_dim=hyper_dim, hyper_emb_dim=16, **moe))


def _wake(model) -> None:
    """Give the zero-initialised up heads random values, as training would."""
    hn = model.hypernet
    with torch.no_grad():
        for p in (hn.up_w, hn.up_b, hn.up_bias_w, hn.up_bias_b):
            p.normal_(std=0.05)


def _reference(hn: HyperNetwork, x_TD: torch.Tensor, ids_TK: torch.Tensor, slot: int) -> torch.Tensor:
    """The paper's formulation, token by token: the mean embedding of the token's unselected experts
    and the layer embedding -> hidden code h -> that token's own generated adapter weights."""
    E = hn.cfg.num_experts
    out = []
    for t in range(x_TD.shape[0]):
        unsel = [e for e in range(E) if e not in ids_TK[t].tolist()]
        z = torch.cat([hn.expert_emb[slot, unsel].mean(0), hn.layer_emb[slot]])
        h = F.relu(hn.in_w @ z + hn.in_b)
        w_down = hn.down_w @ h + hn.down_b  # [D, R]
        b_down = hn.down_bias_w @ h + hn.down_bias_b
        w_up = torch.einsum("rhd,h->rd", hn.up_w, h) + hn.up_b  # [R, D]
        b_up = hn.up_bias_w @ h + hn.up_bias_b
        out.append(F.relu(x_TD[t] @ w_down + b_down) @ w_up + b_up)
    return torch.stack(out)


# ------------------------------------------------------------------------------- equivalence
def test_zero_init_equals_base_moe_and_waking_changes_it():
    base_cfg = moekit.get_preset("tiny-moe").replace(max_seq_len=64)
    base, hyper = moekit.build_model(base_cfg, seed=0), moekit.build_model(_cfg(), seed=0)
    ids = torch.randint(0, base_cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    b, h = base(ids, labels=ids), hyper(ids, labels=ids)
    # Same seed, same base weights (the hypernetwork is initialised last) and a zero up generator.
    assert_close(h.logits, b.logits, atol=0, rtol=0)
    assert_close(h.loss, b.loss, atol=0, rtol=0)
    _wake(hyper)
    assert (hyper(ids).logits - b.logits).abs().max() > 1e-4  # the HyperExpert does contribute once non-zero


def test_gradients_reach_the_hypernetwork():
    model = moekit.build_model(_cfg(), seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    hn = model.hypernet
    model(ids, labels=ids).loss.backward()
    # At init only the (zero) up heads get a gradient: the adapter's hidden units are live.
    for p in (hn.up_w, hn.up_b, hn.up_bias_w, hn.up_bias_b):
        assert p.grad.abs().sum() > 0
    assert hn.down_w.grad.abs().sum() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.step()
    opt.zero_grad()
    model(ids, labels=ids).loss.backward()
    for name, p in hn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name  # every generator weight, both layers' embeddings
    assert hn.expert_emb.grad[0].abs().sum() > 0 and hn.expert_emb.grad[1].abs().sum() > 0


@pytest.mark.parametrize("path", ["grouped", "factorised"])
def test_hyperexpert_equals_per_token_reference_forward_and_backward(path):
    """Per-set generation + grouped GEMM, and the factorised fallback, both equal generating every
    token's own adapter weights (the paper), values and gradients."""
    cfg = MoEConfig(num_experts=6, top_k=2, expert_dim=16, hyper_dim=4, hyper_emb_dim=8)
    torch.manual_seed(0)
    hn = HyperNetwork(12, 2, cfg)
    with torch.no_grad():
        for p in (hn.up_w, hn.up_b, hn.up_bias_w, hn.up_bias_b):
            p.normal_(std=0.1)
    x = torch.randn(20, 12, requires_grad=True)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(20)])
    ids[5:9] = ids[0]  # repeated sets share one generated adapter
    g = torch.randn(20, 12)
    out = hn(x, ids, slot=1) if path == "grouped" else hn.forward_factorised(x, ids, slot=1)
    (out * g).sum().backward()
    got = {n: p.grad.clone() for n, p in hn.named_parameters()} | {"x": x.grad.clone()}
    hn.zero_grad()
    x.grad = None
    ref = _reference(hn, x, ids, 1)
    (ref * g).sum().backward()
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in [*hn.named_parameters(), ("x", x)]:
        assert_close(got[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 70), st.data())
def test_expert_sets_recover_every_tokens_set(E, data):
    """The int64 bitmask path (E <= 62) and the row-unique path (E > 62) both give distinct sets and
    an inverse that maps each token back to exactly the experts it selected."""
    k = data.draw(st.integers(1, E - 1))
    T = data.draw(st.integers(1, 30))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if T > 3:
        ids[1] = ids[0][torch.randperm(k, generator=g)]  # same set, other order
    sel_UE, inv_T = expert_sets(ids, E)
    want = torch.zeros(T, E, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(sel_UE[inv_T], want)
    assert torch.unique(sel_UE.to(torch.uint8), dim=0).shape[0] == sel_UE.shape[0]
    assert (sel_UE.sum(1) == k).all()


# ---------------------------------------------------------------------------- model features
def test_cached_decode_equals_full_forward():
    model = moekit.build_model(_cfg(), seed=0).eval()
    _wake(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 32)
        out = [model(ids[:, :5], cache=cache).logits]
        cache.advance(5)
        for t in range(5, 12):
            out.append(model(ids[:, t:t + 1], cache=cache).logits)
            cache.advance(1)
    assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-4)


def test_save_load_roundtrip(tmp_path):
    from moekit.checkpoint.native import load_native, save_model

    model = moekit.build_model(_cfg(), seed=0).eval()
    _wake(model)
    save_model(model, tmp_path / "m")
    back = load_native(tmp_path / "m")
    assert back.config.moe.hyper_dim == 8 and back.config.moe.hyper_emb_dim == 16
    assert all(layer.hyper[0] is back.hypernet for layer in back.moe_layers())  # shared, not copies
    assert [layer.hyper[1] for layer in back.moe_layers()] == [0, 1]
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_hypernetwork_is_counted_once():
    cfg = _cfg()
    model = moekit.build_model(cfg, seed=0)
    pc = moekit.count_params(cfg)
    hyper_numel = sum(p.numel() for p in model.hypernet.parameters())
    assert pc.total["hypernetwork"] == pc.active["hypernetwork"] == hyper_numel == generator_params(64, 2, cfg.moe)
    assert pc.total_params == sum(p.numel() for p in model.parameters())
    assert sum(v.numel() for k, v in model.state_dict().items() if "hyper" in k) == hyper_numel  # stored once
    # One generator for all layers: a deeper model adds only one expert and one layer embedding per layer.
    deeper = generator_params(64, 5, cfg.moe) - generator_params(64, 2, cfg.moe)
    assert deeper == 3 * (cfg.moe.num_experts + 1) * cfg.moe.hyper_emb_dim
    assert moekit.count_params(_cfg(hyper_dim=0)).total["hypernetwork"] == 0


def test_plan_flops_equal_torch_flop_counter():
    """One decode token (its own expert set): the planner's HyperMoE FLOPs are what torch counts (its
    counter skips grouped_mm, so the adapter's two [1, D] x [D, R] products are added by hand), and
    the factorised fallback costs the same."""
    from torch.utils.flop_counter import FlopCounterMode

    from moekit.plan.spec import flops_per_token

    cfg = _cfg()
    model = moekit.build_model(cfg, seed=0).eval()
    x = torch.randn(1, cfg.dim)
    ids = torch.tensor([[1, 5]])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for slot in range(2):
            model.hypernet(x, ids, slot)
    with torch.no_grad(), FlopCounterMode(display=False) as fc2:
        for slot in range(2):
            model.hypernet.forward_factorised(x, ids, slot)
    f = flops_per_token(cfg, 16)
    adapter = 2 * 2 * 2 * cfg.dim * cfg.moe.hyper_dim  # 2 layers x 2 projections x 2 FLOPs per multiply-add
    assert f["hypernetwork"] == fc.get_total_flops() + adapter == fc2.get_total_flops() > 0
    assert f["total"] == f["matmul"] + f["attention"] + f["hypernetwork"]
    assert flops_per_token(_cfg(hyper_dim=0), 16)["matmul"] == f["matmul"]  # not double counted


def test_train_cli_builds_hypermoe_and_rejects_dense(tmp_path):
    from moekit.train.trainer import TrainError, build_for_training
    from train_helpers import tiny_data

    tiny_data(tmp_path)
    prepared = next((tmp_path / "data").glob("*/prepared.json")).parent
    kw = dict(data_dir=prepared, corpus="tiny", vocab_size=320, progress=False)
    model, _ = build_for_training(preset="tiny-moe", hyper_dim=4, **kw)
    assert model.hypernet is not None and model.config.moe.hyper_dim == 4
    with pytest.raises(TrainError, match="hyper-dim"):
        build_for_training(preset="tiny-dense", hyper_dim=4, **kw)


# ----------------------------------------------------------------------------------- config
@pytest.mark.parametrize("changes, field", [
    ({"hyper_dim": -1}, "moe.hyper_dim"),
    ({"hyper_dim": 4, "hyper_emb_dim": 0}, "moe.hyper_emb_dim"),
    ({"hyper_dim": 4, "top_k": 8}, "moe.hyper_dim"),
    ({"hyper_dim": 4, "router": "soft", "top_k": 8}, "moe.hyper_dim"),
])
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MoEConfig(num_experts=8, expert_dim=16, **changes)


def test_config_roundtrip_and_old_configs_load():
    cfg = _cfg(hyper_dim=12)
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg and back.moe.hyper_dim == 12
    d = moekit.get_preset("tiny-moe").to_dict()
    for f in ("hyper_dim", "hyper_emb_dim"):
        d["moe"].pop(f)
    assert ModelConfig.from_dict(d).moe.hyper_dim == 0  # configs written before HyperMoE still load
