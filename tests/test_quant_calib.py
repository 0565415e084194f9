"""moekit.quant end to end: GPTQ with per-expert calibration, router calibration, checkpoints and
the `moekit quantize` / `quant-report` commands on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from moekit import ModelConfig, MoEConfig, build_model, load_model, save_model
from moekit.quant import QuantError, QuantizedExperts
from moekit.quant.calibrate import quantize_model
from moekit.quant.checkpoint import save_quantized

from train_helpers import one_thread, tiny_data  # noqa: F401  (autouse fixture: one thread)


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(**{**dict(num_experts=8, top_k=2, expert_dim=64), **kw.pop("moe", {})})
    base = dict(vocab_size=128, dim=64, n_layers=3, n_heads=4, ffn_dim=128, max_seq_len=64, first_k_dense=1, moe=moe)
    return ModelConfig(**{**base, **kw})


def calib(n: int = 8, S: int = 64, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme,zp", [("int8", False), ("int4", False), ("int4", True), ("mxfp4", False)])
def test_loaded_quantized_model_equals_quantize_in_memory(tmp_path, scheme, zp):
    cfg = tiny_cfg(moe=dict(num_shared_experts=1, shared_expert_dim=64))
    m = build_model(cfg, seed=0).eval()
    q, _ = quantize_model(m, scheme, 32, method="gptq", calib=calib(4), attention="int8", lm_head=True, zero_point=zp)
    save_quantized(q, q.quant_config, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    assert isinstance(loaded.layers[1].ffn.experts, QuantizedExperts)
    assert not any("w13" == k.rsplit(".", 1)[-1] for k, _ in loaded.named_parameters())
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        a, b = q(x).logits, loaded(x).logits
    assert torch.equal(a, b)
    assert loaded.quant_config.to_dict() == q.quant_config.to_dict()


def test_bf16_quantized_checkpoint_round_trips(tmp_path):
    m = build_model(tiny_cfg(), seed=0).to(torch.bfloat16).eval()
    q, _ = quantize_model(m, "int4", 32)
    save_quantized(q, q.quant_config, tmp_path / "q")
    loaded = load_model(tmp_path / "q")
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(q(x).logits, loaded(x).logits)
    assert loaded.layers[1].ffn.router.weight.dtype == torch.bfloat16


def test_expert_without_calibration_tokens_is_still_calibrated_and_flagged():
    cfg = tiny_cfg(n_layers=2, first_k_dense=0, moe=dict(router_bias=True))
    m = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for layer in m.moe_layers():
            layer.router.bias[3] = -1e4  # expert 3 is never chosen
    rtn = copy.deepcopy(m)
    q, rep = quantize_model(m, "int4", 32, method="gptq", calib=calib(4))
    rtn_q, _ = quantize_model(rtn, "int4", 32)
    for L in (r for r in rep["layers"] if r.get("moe")):
        assert L["tokens_per_expert"][3] == 0
        assert 3 in L["all_experts_calibration"]
        assert L["hessian_tokens"][3] == 4 * 64  # every calibration token went through it
        assert all(n > 0 for n in L["hessian_tokens"])
    ex, ex_rtn = q.layers[0].ffn.experts, rtn_q.layers[0].ffn.experts
    w = ex.qw13.dequantize(torch.float32, 3)
    assert bool(torch.isfinite(w).all()) and not torch.equal(ex.qw13.q[3], ex_rtn.qw13.q[3])


def test_router_weights_bit_identical_without_router_calibration(tmp_path):
    m = build_model(tiny_cfg(), seed=0).eval()
    orig = {k: v.clone() for k, v in m.state_dict().items() if "router" in k}
    q, _ = quantize_model(m, "int4", 32, method="gptq", calib=calib(4), router_calibration=False, attention="int8")
    for k, v in orig.items():
        assert torch.equal(q.state_dict()[k], v)


def test_router_calibration_raises_agreement():
    cfg = tiny_cfg(n_layers=4, first_k_dense=0, init_std=0.08, max_seq_len=128)
    m = build_model(cfg, seed=0).eval()
    q, rep = quantize_model(m, "int4", 32, calib=calib(16, 128), router_calibration=True, attention="int8")
    rs = [L["router"] for L in rep["layers"] if L.get("moe")]
    before = sum(r["agreement_before"] for r in rs) / len(rs)
    after = sum(max(r["agreement_after"], r["agreement_before"]) for r in rs) / len(rs)
    assert any(r["accepted"] for r in rs)
    assert after > before + 0.005, (before, after)
    # A rejected refit leaves the router exactly as it was.
    assert all(r["accepted"] or r["agreement_after"] <= r["agreement_before"] for r in rs)


def test_gptq_and_router_calibration_need_calibration_data():
    m = build_model(tiny_cfg(), seed=0)
    with pytest.raises(QuantError, match="--calib"):
        quantize_model(m, "int8", 32, method="gptq")


def test_quantize_without_report_data_writes_the_model_and_says_so(tmp_path, capsys):
    """RTN needs no data; the default report corpus missing is a note, not a failure after the work."""
    from moekit.cli import main

    save_model(build_model(tiny_cfg(), seed=0), tmp_path / "orig")
    rc = main(["quantize", str(tmp_path / "orig"), str(tmp_path / "q"), "--scheme", "int8",
               "--data-dir", str(tmp_path / "no-data")])
    assert rc == 0 and (tmp_path / "q" / "config.json").is_file()
    assert not (tmp_path / "q" / "quant_report.json").exists()
    assert "no quantization report" in capsys.readouterr().err


def test_quantize_and_report_commands_end_to_end(tmp_path):
    from moekit.cli import main
    from moekit.quant.cli import quant_report_cli

    data = tiny_data(tmp_path)
    cfg = tiny_cfg(vocab_size=data.vocab_size, moe=dict(num_shared_experts=1, shared_expert_dim=64))
    save_model(build_model(cfg, seed=0), tmp_path / "orig")
    out = tmp_path / "q"
    rc = main(["quantize", str(tmp_path / "orig"), str(out), "--scheme", "int4", "--method", "gptq", "--calib",
               str(data.root), "--calib-tokens", "256", "--seq-len", "32", "--router-calibration",
               "--report-tokens", "256", "--threads", "1"])
    assert rc == 0
    rep = json.loads((out / "quant_report.json").read_text())
    assert set(rep["variants"]) == {"quantized + router calibration", "quantized, original routers"}
    for key in ("kl", "same_top_token", "bpb_orig", "bpb_quant", "bpb_delta_pct", "agreement_exact_mean"):
        assert key in rep["main"]
    assert len(rep["main"]["layers"]) == 2 and len(rep["expert_error"]) == 2
    assert (out / "quant_report.png").stat().st_size > 0 and (out / "quant_report.md").is_file()
    cov = json.loads((out / "quant_calibration.json").read_text())
    assert sum(cov["layers"][1]["tokens_per_expert"]) == 2 * 256
    # quant-report on its own, and a clear error for an unquantized QUANT.
    assert quant_report_cli(str(tmp_path / "orig"), str(out), data=str(data.root), out=str(tmp_path / "r"),
                            max_tokens=128, seq_len=32, decode_tokens=0) == 0
    assert (tmp_path / "r" / "quant_report.json").is_file()
    assert main(["quant-report", str(tmp_path / "orig"), str(tmp_path / "orig"), "--data", str(data.root)]) == 2


def test_loading_peak_memory_is_about_the_file_size(tmp_path):
    """Measured in a fresh process (getrusage): loading never materialises the float experts."""
    from moekit.quant.calibrate import quantize_model as qm
    from moekit.quant.memprobe import probe

    cfg = tiny_cfg(vocab_size=256, dim=256, n_layers=2, first_k_dense=0, moe=dict(num_experts=16, expert_dim=512))
    q, _ = qm(build_model(cfg, seed=0).to(torch.bfloat16), "int8", 32)
    save_quantized(q, q.quant_config, tmp_path / "q")
    r = probe(tmp_path / "q")
    assert r["file_bytes"] > 8e6
    # The bf16 experts alone would be ~1.9x the file: the float experts are never built.
    assert r["load_peak_over_file"] < 1.1, r
