"""Capacity planner: preset counts vs published figures and vs the Hugging Face modules, counts vs
built models, KV bytes vs allocated caches, FLOPs vs torch's FLOP counter, the distinct-experts
formula vs simulated routing, device fitting, the CLI and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.cli import main as cli_main
from moekit.errors import MoekitError
from moekit.plan import (PUBLISHED, build_plan, decode_step, devices_needed, expected_distinct,
                         expected_distinct_uniform, flops_per_token, kv_bytes_per_token,
                         load_telemetry, matches_published, param_summary, suggest_layout, weight_memory)
from moekit.plan.hardware import GIB, PRESETS as HW
from moekit.plan.spec import LLAMA4_VISION_PARAMS, parse_count

TINY = ["tiny-moe", "tiny-dense", "tiny-deepseek", "tiny-qwen-moe", "small-moe"]


# --------------------------------------------------------------------- presets vs published
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published(name):
    """Totals and active counts agree with the vendor's figure, counted the vendor's way (which
    parts a total covers and whether "active" includes the input embedding: see PUBLISHED)."""
    pub = PUBLISHED[name]
    s = param_summary(moekit.get_preset(name))
    total, _ = s.published_convention()
    active = s.active if pub.active_embedding else s.active_no_embedding
    assert matches_published(total, pub.total, pub.rounding), (total, pub.total)
    assert matches_published(active, pub.active, pub.rounding), (active, pub.active)
    # The total is within 1% everywhere; an active figure given to two digits (e.g. "17B") is
    # only checkable to its printed precision, so allow half a unit of its last digit there.
    assert abs(total - parse_count(pub.total)) <= 0.01 * parse_count(pub.total)


def test_published_precision_rules():
    assert matches_published(17_172_894_720, "17B")  # 1.0% off but "17B" means [16.5B, 17.5B)
    assert not matches_published(18_000_000_000, "17B")
    assert matches_published(3_353_032_704, "3.3B", "truncate")  # Qwen's card truncates 3.35B
    assert not matches_published(3_353_032_704, "3.3B", "round")
    assert matches_published(20_914_757_184, "20.91B")
    assert not matches_published(21_500_000_000, "20.91B")


def _hf_cases():
    import transformers as T

    mixtral = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)
    qwen = dict(vocab_size=151936, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                norm_topk_prob=True, tie_word_embeddings=False)
    oss = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
               num_key_value_heads=8, head_dim=64, num_experts_per_tok=4)
    l4 = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
              num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128, num_experts_per_tok=1)
    return {
        "mixtral-8x7b": (T.MixtralConfig, T.MixtralForCausalLM, mixtral),
        "mixtral-8x22b": (T.MixtralConfig, T.MixtralForCausalLM,
                          {**mixtral, "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                           "num_hidden_layers": 56, "num_attention_heads": 48}),
        "qwen3-30b-a3b": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                          {**qwen, "hidden_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                           "num_attention_heads": 32}),
        "qwen3-235b-a22b": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                            {**qwen, "hidden_size": 4096, "moe_intermediate_size": 1536, "num_hidden_layers": 94,
                             "num_attention_heads": 64}),
        "olmoe-1b-7b": (T.OlmoeConfig, T.OlmoeForCausalLM,
                        dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8)),
        "deepseek-v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
                        dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                             num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                             n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3,
                             q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                             v_head_dim=128, n_group=8, topk_group=4)),
        "gpt-oss-20b": (T.GptOssConfig, T.GptOssForCausalLM, {**oss, "num_hidden_layers": 24, "num_local_experts": 32}),
        "gpt-oss-120b": (T.GptOssConfig, T.GptOssForCausalLM,
                         {**oss, "num_hidden_layers": 36, "num_local_experts": 128}),
        "llama4-scout": (T.Llama4TextConfig, T.Llama4ForCausalLM,
                         {**l4, "num_local_experts": 16, "interleave_moe_layer_step": 1}),
        "llama4-maverick": (T.Llama4TextConfig, T.Llama4ForCausalLM,
                            {**l4, "num_local_experts": 128, "interleave_moe_layer_step": 2}),
    }


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_equals_hf_module(name):
    """The preset (plus the planner's extras) counts exactly what transformers' own module holds
    when built, on the meta device, from the checkpoint's config numbers."""
    pytest.importorskip("transformers")
    cfg_cls, model_cls, kw = _hf_cases()[name]
    with torch.device("meta"):
        hf = model_cls(cfg_cls(**kw))
    s = param_summary(moekit.get_preset(name))
    ours = s.count.total_params + sum(e.total for e in s.extras if e.in_memory and "vision" not in e.name)
    assert ours == sum(p.numel() for p in hf.parameters())


def test_llama4_vision_extra_matches_transformers():
    T = pytest.importorskip("transformers")
    from transformers.models.llama4.modeling_llama4 import Llama4MultiModalProjector, Llama4VisionModel

    vc = T.Llama4VisionConfig(hidden_size=1408, image_size=336, intermediate_size=5632, num_attention_heads=16,
                              num_hidden_layers=34, patch_size=14, projector_input_dim=4096,
                              projector_output_dim=4096, vision_output_dim=4096, pixel_shuffle_ratio=0.5)
    with torch.device("meta"):
        vis = Llama4VisionModel(vc)
        proj = Llama4MultiModalProjector(T.Llama4Config(vision_config=vc.to_dict(), text_config={"hidden_size": 5120}))
    assert sum(p.numel() for m in (vis, proj) for p in m.parameters()) == LLAMA4_VISION_PARAMS


def test_deepseek_mtp_brings_hub_total_to_685b():
    s = param_summary(moekit.get_preset("deepseek-v3"))
    mtp = [e for e in s.extras if "multi-token" in e.name]
    assert len(mtp) == 1 and not mtp[0].in_memory
    assert matches_published(s.count.total_params + mtp[0].total, "685B")


# ----------------------------------------------------------------- counts vs built models
@pytest.mark.parametrize("name", TINY)
def test_count_equals_numel_and_safetensors_size(name, tmp_path):
    cfg = moekit.get_preset(name)
    model = moekit.build_model(cfg, seed=0)
    assert param_summary(cfg).total == sum(p.numel() for p in model.parameters())
    moekit.save_model(model, tmp_path, dtype=torch.bfloat16)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert abs(size - weight_memory(cfg)["bf16"]) <= 0.01 * size


@pytest.mark.parametrize("name,dtype", [("tiny-moe", torch.float32), ("tiny-qwen-moe", torch.bfloat16),
                                        ("tiny-deepseek", torch.bfloat16), ("small-moe", torch.float32)])
def test_kv_bytes_equal_allocated_cache(name, dtype):
    cfg = moekit.get_preset(name)
    model = moekit.build_model(cfg, dtype=dtype, seed=0)
    B, M = 3, 40
    kv = kv_bytes_per_token(cfg, "fp32" if dtype == torch.float32 else "bf16")
    assert model.new_cache(B, M).nbytes() == B * M * kv["model"]
    assert kv["mha"] >= kv["model"]


def test_kv_bytes_equal_allocated_cache_mla():
    cfg = moekit.ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=128, attention="mla",
                             q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    model = moekit.build_model(cfg, dtype=torch.bfloat16, seed=0)
    kv = kv_bytes_per_token(cfg, "bf16")
    assert kv["model"] == 2 * 2 * (32 + 8)
    assert model.new_cache(2, 24).nbytes() == 2 * 24 * kv["model"]


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "tiny-deepseek", "tiny-qwen-moe"])
def test_flops_per_token_equal_torch_flop_counter(name):
    """One decode token at context C: matmuls (reference expert loop, so every expert GEMM is an
    aten mm) plus attention through SDPA's math backend, counted by torch's FLOP counter."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = moekit.get_preset(name)
    model = moekit.build_model(cfg, seed=0).eval()
    for layer in model.moe_layers():
        layer.use_reference = True
    C = 29
    with torch.no_grad():
        cache = model.new_cache(1, 64)
        model(torch.randint(0, cfg.vocab_size, (1, C - 1)), cache=cache)
        cache.advance(C - 1)
        # Grad mode keeps every matmul on aten ops (inference-only compiled CPU kernels are
        # invisible to the FLOP counter); nothing is backpropagated.
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            model(torch.randint(0, cfg.vocab_size, (1, 1)), cache=cache)
    assert fc.get_total_flops() == flops_per_token(cfg, C)["total"]


def test_dense_twin_has_equal_flops_and_smaller_memory():
    for name in PUBLISHED:
        cfg = moekit.get_preset(name)
        twin = moekit.dense_equivalent(cfg)
        f0, f1 = flops_per_token(cfg, 4096)["total"], flops_per_token(twin, 4096)["total"]
        assert abs(f0 - f1) <= 0.005 * f0, name
        assert weight_memory(twin)["bf16"] < weight_memory(cfg)["bf16"]


# ------------------------------------------------------------------------- distinct experts
def _simulate_distinct(E: int, k: int, B: int, trials: int, logits=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(E * 1000 + k * 10 + B)
    scores = torch.rand(trials, B, E, generator=g)
    if logits is not None:  # Gumbel top-k: k distinct experts drawn in proportion to exp(logits)
        scores = logits - torch.log(-torch.log(scores.clamp_min(1e-12)))
    ids = scores.topk(k, dim=-1).indices.reshape(trials, -1)
    hit = torch.zeros(trials, E).scatter_(1, ids, 1.0)
    return hit.sum(1)


@settings(max_examples=25, deadline=None)
@given(E=st.integers(2, 64), data=st.data(), B=st.integers(1, 96))
def test_distinct_experts_formula_matches_uniform_simulation(E, data, B):
    k = data.draw(st.integers(1, E))
    d = _simulate_distinct(E, k, B, trials=1500)
    se = float(d.std()) / math.sqrt(d.numel())
    # 5 standard errors, plus a rare-event allowance for when the sample shows no spread at all.
    assert abs(float(d.mean()) - expected_distinct_uniform(E, k, B)) <= 5 * se + 5 * E / d.numel()


def test_distinct_experts_with_skewed_routing():
    """The general form sum_e 1-(1-p_e)^B with measured marginals p_e matches a skewed simulation
    (and touches fewer experts than uniform routing)."""
    E, k, B = 16, 2, 24
    logits = torch.linspace(0, 3, E)
    ids = _simulate_distinct(E, k, 1, trials=200_000, logits=logits)  # marginals from one-token draws
    g = torch.Generator().manual_seed(1)
    u = torch.rand(200_000, E, generator=g)
    sel = (logits - torch.log(-torch.log(u.clamp_min(1e-12)))).topk(k, -1).indices
    p = torch.bincount(sel.reshape(-1), minlength=E).double() / 200_000
    assert float(ids.mean()) == pytest.approx(k)
    d = _simulate_distinct(E, k, B, trials=4000, logits=logits)
    pred = expected_distinct(p.tolist(), B)
    assert abs(float(d.mean()) - pred) <= 5 * float(d.std()) / math.sqrt(d.numel()) + 0.01
    assert pred < expected_distinct_uniform(E, k, B)


def test_telemetry_file_drives_the_decode_bound(tmp_path):
    cfg = moekit.get_preset("tiny-moe")
    E, k = cfg.moe.num_experts, cfg.moe.top_k
    skew = [[100, 100, 1, 1, 1, 1, 1, 1] for _ in cfg.moe_layers]
    recs = [{"step": i, "layers": [{"layer": j, "counts": c} for j, c in enumerate(skew)]} for i in range(2)]
    f = tmp_path / "routing.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n{torn")
    p = load_telemetry(f, cfg)
    assert len(p) == len(cfg.moe_layers) and sum(p[0]) == pytest.approx(k)
    hw = HW["h100-80gb"]
    skewed, uniform = decode_step(cfg, hw, 16, 128, p_LE=p), decode_step(cfg, hw, 16, 128)
    assert skewed.distinct_experts == pytest.approx(expected_distinct(p[0], 16))
    assert skewed.distinct_experts < uniform.distinct_experts == pytest.approx(expected_distinct_uniform(E, k, 16))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"layers": [{"counts": [1, 2, 3]}]}))
    with pytest.raises(MoekitError, match="MoE layers"):
        load_telemetry(bad, cfg)


# ----------------------------------------------------------------------------- roofline / fit
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 512))
def test_decode_bound_grows_with_batch_and_moe_matches_dense_twin_at_batch_1(b):
    cfg = moekit.get_preset("mixtral-8x7b")
    hw = HW["h100-80gb"]
    t1, t2 = decode_step(cfg, hw, b, 4096), decode_step(cfg, hw, b + 1, 4096)
    assert t2.time_s >= t1.time_s and t2.distinct_experts >= t1.distinct_experts
    twin = decode_step(moekit.dense_equivalent(cfg), hw, b, 4096)
    assert t1.time_s >= 0.99 * twin.time_s  # MoE never beats its equal-active dense twin...
    if b == 1:
        assert t1.time_s == pytest.approx(twin.time_s, rel=0.01)  # ...and ties it at batch 1


def test_devices_needed_is_minimal():
    hw = HW["h100-80gb"]
    for name, dtype in [("mixtral-8x7b", "bf16"), ("deepseek-v3", "fp8"), ("qwen3-235b-a22b", "int4")]:
        need = weight_memory(moekit.get_preset(name))[dtype] + 8 * 8192 * 70_000
        n = devices_needed(need, hw, 8.0)
        usable = (hw.mem_gib - 8.0) * GIB
        assert (n - 1) * usable < need <= n * usable
    assert devices_needed(weight_memory(moekit.get_preset("mixtral-8x7b"))["bf16"], hw, 8.0) == 2
    lay = suggest_layout(moekit.get_preset("deepseek-v3"), 12)
    assert lay["devices"] == 16 and lay["ep"] == 16 and lay["experts_per_device"] == 16


def test_build_plan_json_roundtrips_and_is_consistent():
    cfg = moekit.get_preset("qwen3-30b-a3b")
    plan = build_plan(cfg, HW["h100-80gb"], [1, 64], 4096, "bf16")
    json.loads(json.dumps(plan))
    assert plan["params"]["published"]["total_ok"]
    assert plan["fit"][0]["devices_min"] == 1
    d1, d64 = plan["decode"][0], plan["decode"][1]
    assert d1["moe"]["distinct_experts_per_layer"] == pytest.approx(8)
    assert d64["moe"]["ms"] / d64["dense_equal_active"]["ms"] > d1["moe"]["ms"] / d1["dense_equal_active"]["ms"]
    assert d1["dense_equal_total"]["ms"] > d1["moe"]["ms"]  # memory-matched dense is slower at batch 1


# ----------------------------------------------------------------------------- hardware / CLI
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_this_cpu_measures_once_and_caches(tmp_path, monkeypatch, isa):
    """Also where bf16 is not native (MOEKIT_CPU_ISA=avx2 simulates an AVX2-only CPU): the bf16 peak is
    then the fp32 one (what bf16 weights are computed in), measured in seconds, not a scalar bf16 GEMM."""
    import time

    from moekit.kernels import isa as isa_mod

    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("MOEKIT_CPU_ISA", isa)
    import moekit.plan.hardware as hwmod

    real = hwmod.measure_this_cpu
    # Smaller probes keep the test fast; 256 MiB is still far beyond any cache.
    monkeypatch.setattr(hwmod, "measure_this_cpu", lambda: real(read_gib=0.25, gemm_n=1024, budget_s=2.0))
    t0 = time.perf_counter()
    hw = hwmod.get_hardware("this-cpu")
    assert time.perf_counter() - t0 < 60
    assert hw.bandwidth_gbs > 0.5 and hw.bf16_tflops > 0.001 and hw.mem_gib > 1 and hw.gemv_bandwidth_gbs > 0.1
    if not isa_mod.bf16_native_cpu():
        assert hw.bf16_tflops == hw.fp32_tflops and "computed in fp32" in hw.source
    monkeypatch.setattr(hwmod, "measure_this_cpu", lambda *a, **k: pytest.fail("should use the cache"))
    assert hwmod.get_hardware("this-cpu") == hw
    assert (tmp_path / "this-cpu.json").is_file()


def test_cli_table_json_and_plot(tmp_path, capsys):
    png, out = tmp_path / "p.png", tmp_path / "plan.json"
    assert cli_main(["plan", "tiny-deepseek", "--hardware", "rtx-4090", "--batch", "1", "4", "--context", "512",
                     "--plot", str(png), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "decode step lower bound" in text and "routed experts" in text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.read_text())["decode"][1]["batch"] == 4
    assert cli_main(["plan", "mixtral-8x7b", "--dtype", "int4", "--json", "--hardware", "cpu", "--mem-gib", "64",
                     "--bandwidth-gbs", "50", "--tflops", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["devices"] == 1 and plan["weight_bytes"]["int4"] < 0.3 * plan["weight_bytes"]["bf16"]


@pytest.mark.parametrize("argv,needle", [
    (["plan", "no-such-model"], "unknown preset"),
    (["plan", "tiny-moe", "--hardware", "tpu"], "unknown hardware"),
    (["plan", "tiny-moe", "--hardware", "cpu", "--mem-gib", "8"], "--bandwidth-gbs"),
    (["plan", "tiny-moe", "--batch", "0"], "--batch"),
    (["plan", "tiny-moe", "--reserve-gib", "100"], "reserve"),
])
def test_cli_errors_are_one_line(argv, needle, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_moekit_config_file_and_bad_json(tmp_path, capsys):
    f = tmp_path / "config.json"
    moekit.get_preset("tiny-moe").to_json(f)
    assert cli_main(["plan", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["total_params"] == moekit.count_params(
        moekit.get_preset("tiny-moe")).total_params
    f.write_text('{"moekit_version": 1, "dim": 64, "n_experts": 4}')
    assert cli_main(["plan", str(f)]) == 2
    assert "n_experts" in capsys.readouterr().err
    f.write_text("{not json")
    assert cli_main(["plan", str(f)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


# ------------------------------------------------------------------ Hugging Face config.json
@pytest.mark.parametrize("preset", ["mixtral-8x7b", "mixtral-8x22b", "qwen3-30b-a3b", "qwen3-235b-a22b",
                                    "olmoe-1b-7b", "deepseek-v3", "llama4-scout", "llama4-maverick"])
def test_hf_config_json_plans_like_the_preset(preset, tmp_path):
    cfg_cls, model_cls, kw = _hf_cases()[preset]
    d = cfg_cls(**kw).to_dict()
    d["architectures"] = [model_cls.__name__]  # as in a real checkpoint's config.json
    (tmp_path / "config.json").write_text(json.dumps(d))
    plan = build_plan(moekit.resolve_config(tmp_path), HW["h100-80gb"], [1], 4096)
    ref = param_summary(moekit.get_preset(preset))
    assert plan["params"]["total_params"] == ref.count.total_params
    assert plan["params"]["active_params"] == ref.count.active_params


def test_hf_multimodal_config_warns_about_the_vision_tower(tmp_path, capsys):
    import transformers as T

    text = T.Llama4TextConfig(num_hidden_layers=2, num_local_experts=4).to_dict()
    d = T.Llama4Config(text_config=text).to_dict()
    d["architectures"] = ["Llama4ForConditionalGeneration"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert cli_main(["plan", str(tmp_path), "--json"]) == 0
    assert any("vision tower" in w for w in json.loads(capsys.readouterr().out)["warnings"])


def test_malformed_hf_config_names_the_missing_field(tmp_path, capsys):
    import transformers as T

    d = T.MixtralConfig(num_hidden_layers=2).to_dict()
    del d["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert cli_main(["plan", str(tmp_path)]) == 2
    assert "hidden_size" in capsys.readouterr().err


def test_unsupported_config_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    assert cli_main(["plan", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and len(err.strip().splitlines()) == 1


def test_cli_reads_moekit_training_telemetry(tmp_path, capsys):
    """A telemetry file written by moekit's trainer (moekit.train.telemetry) drives `--telemetry`."""
    from moekit.train import telemetry
    cfg = moekit.get_preset("tiny-moe")
    model = moekit.build_model(cfg, seed=0).eval()
    tel = telemetry.Telemetry(tmp_path / "routing.jsonl")
    with torch.no_grad():
        for step in range(2):
            tel.observe(model(torch.randint(0, cfg.vocab_size, (2, 32))).routing)
            tel.flush(step, kind="eval")
    assert cli_main(["plan", "tiny-moe", "--context", "128", "--batch", "1", "16", "--telemetry",
                     str(tmp_path / "routing.jsonl"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    row = plan["decode"][1]
    assert "moe_uniform" in row and row["moe"]["distinct_experts_per_layer"] <= 8.0
    p = load_telemetry(tmp_path / "routing.jsonl", cfg)
    want = sum(expected_distinct(pl, 16) for pl in p) / len(p)
    assert row["moe"]["distinct_experts_per_layer"] == pytest.approx(want)
