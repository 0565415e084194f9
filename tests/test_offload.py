"""Expert offloading: token-identical to resident, budget respected (cache accounting and RSS),
prefetch on/off identical, bad budgets refused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.inference import Engine, SamplingParams
from moekit.memory import load_offloaded, offload_telemetry, parse_budget
from moekit.memory.offload import close_offload
from moekit.moe.backends import set_backend


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    base = moekit.get_preset("tiny-moe")
    cfg = dataclasses.replace(base, n_layers=3)
    m = moekit.build_model(cfg, seed=0).eval()
    for dt in ("float32", "bfloat16"):
        d = tmp_path_factory.mktemp(f"tiny-{dt}")
        moekit.save_model(m, d, dtype=getattr(torch, dt))
        out[dt] = d
    return out


def _prompts(vocab):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 12, 3)]


def _gen(model, prompts, n=8):
    set_backend(model, "reference")  # the same per-expert math on both sides: bit-identical values
    return [g.tokens for g in Engine(model).generate(prompts, SamplingParams(max_new_tokens=n))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offloaded_generation_is_token_identical(saved, dtype):
    ref_model = moekit.load_model(saved[dtype])
    prompts = _prompts(ref_model.config.vocab_size)
    ref = _gen(ref_model, prompts)
    E = ref_model.config.moe.num_experts
    expert_bytes = ref_model.moe_layers()[0].experts.w13[0].nbytes + ref_model.moe_layers()[0].experts.w2[0].nbytes
    n_layers = len(ref_model.moe_layers())
    if dtype == "float32":  # several budgets (fraction and bytes), LRU/LFU, prefetch on and off
        runs = [("0.125", "lru", True), ("0.125", "lru", False), ("0.5", "lru", True), ("1.0", "lru", False),
                (str(2 * n_layers * expert_bytes + 7), "lru", True), ("0.3", "lfu", False)]
    else:
        runs = [("0.3", "lru", True), ("0.3", "lfu", False)]
    for budget, policy, prefetch in runs:
        if True:
            m = load_offloaded(saved[dtype], budget, policy=policy, prefetch=prefetch)
            try:
                assert _gen(m, prompts) == ref, (budget, policy, prefetch)
                t = offload_telemetry(m)
                limit = parse_budget(budget, E * n_layers * expert_bytes)
                assert 0 < t["max_resident_bytes"] <= limit
                assert t["max_resident_bytes"] <= m.offload_plan["resident_limit_bytes"]
                assert t["hits"] + t["misses"] > 0 and t["bytes_read"] >= t["misses"] * expert_bytes
                if prefetch:
                    assert t["prefetch_accuracy"] is not None
            finally:
                close_offload(m)


@pytest.mark.parametrize("scheme,zero_point", [("int4", False), ("int8", False), ("mxfp4", False), ("int4", True)])
def test_quantized_experts_offload_token_identical(tmp_path, scheme, zero_point):
    """A `moekit quantize` checkpoint offloads its codes and scales: same tokens as the resident
    quantized model, the budget counted in quantized bytes (6x+ more 4-bit experts per byte than fp32)."""
    from moekit.memory.offload import OffloadedExperts
    from moekit.quant.calibrate import quantize_model
    from moekit.quant.checkpoint import load_quantized, save_quantized

    cfg = dataclasses.replace(moekit.get_preset("tiny-moe"), n_layers=3)
    q, _ = quantize_model(moekit.build_model(cfg, seed=0).eval(), scheme, 32, zero_point=zero_point)
    save_quantized(q, q.quant_config, tmp_path / "q")
    ref_model = load_quantized(tmp_path / "q")
    prompts = _prompts(cfg.vocab_size)
    ref = _gen(ref_model, prompts)
    qx = ref_model.moe_layers()[0].experts
    expert_bytes = sum(t[0].nbytes for m in (qx.qw13, qx.qw2) for t in m._buffers.values() if t is not None)
    float_bytes = 4 * (qx.qw13.shape[1] * qx.qw13.shape[2] + qx.qw2.shape[1] * qx.qw2.shape[2])
    assert float_bytes / expert_bytes > (6 if scheme != "int8" else 3.5)  # fp32 / (4 bits + scales [+ zeros])
    for budget, prefetch in (("0.3", True), ("0.3", False), (str(2 * 3 * expert_bytes), True)):
        m = load_offloaded(tmp_path / "q", budget, prefetch=prefetch)
        try:
            assert isinstance(m.moe_layers()[0].experts, OffloadedExperts)
            assert m.quant_config.scheme == scheme
            assert _gen(m, prompts) == ref, (budget, prefetch)
            t = offload_telemetry(m)
            assert 0 < t["max_resident_bytes"] <= parse_budget(budget, cfg.moe.num_experts * 3 * expert_bytes)
            assert t["bytes_read"] >= t["misses"] * expert_bytes > 0
        finally:
            close_offload(m)


def test_offloaded_auto_backend_matches_resident_logits(saved):
    ref_model = moekit.load_model(saved["float32"])
    m = load_offloaded(saved["float32"], "0.25")
    try:
        x = torch.tensor([_prompts(512)[1]])
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, ref_model(x).logits, rtol=1e-4, atol=1e-4)
        assert type(m.moe_layers()[0].experts).__name__ == "OffloadedExperts"
    finally:
        close_offload(m)


def test_budget_parsing_and_errors(saved):
    assert parse_budget("0.4", 1000) == 400
    assert parse_budget("2K", 10) == 2048 and parse_budget("1.5MiB", 1) == int(1.5 * 2**20)
    assert parse_budget("5000", 1000) == 5000
    with pytest.raises(MoekitError, match="expert-memory-budget"):
        parse_budget("lots", 1000)
    with pytest.raises(MoekitError, match="below one expert per MoE layer"):
        load_offloaded(saved["float32"], "100")


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import moekit
    from moekit.inference import Engine, SamplingParams
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    path, mode = sys.argv[1], sys.argv[2]
    torch.zeros(1) @ torch.zeros(1)
    with torch.device("meta"):  # the first meta-device build costs ~70 MB of one-off torch state
        moekit.Transformer(moekit.get_preset("tiny-moe"))
    base = rss()
    if mode == "resident":
        m = moekit.load_model(path)
    else:
        from moekit.memory import load_offloaded, offload_telemetry
        m = load_offloaded(path, mode)
    Engine(m).generate([[1, 2, 3, 4, 5, 6, 7, 8]] * 2, SamplingParams(max_new_tokens=6))
    t = offload_telemetry(m) if mode != "resident" else {}
    print(json.dumps({"rss_delta": rss() - base, "peak_delta": hwm() - base, "max_resident": t.get("max_resident_bytes")}))
""")


def test_rss_stays_under_the_full_expert_size(tmp_path):
    # Experts dominate: 2 layers x 8 experts x 3 x 256 x 1024 fp32 = 48 MiB of experts.
    cfg = dataclasses.replace(moekit.get_preset("tiny-moe"), dim=256, n_heads=4, vocab_size=256,
                              moe=dataclasses.replace(moekit.get_preset("tiny-moe").moe, expert_dim=1024))
    m = moekit.build_model(cfg, seed=0)
    moekit.save_model(m, tmp_path / "m")
    experts = sum(layer.experts.w13.nbytes + layer.experts.w2.nbytes for layer in m.moe_layers())
    del m
    script = tmp_path / "rss.py"
    script.write_text(_RSS_SCRIPT)

    def run(mode):
        r = subprocess.run([sys.executable, str(script), str(tmp_path / "m"), mode], capture_output=True, text=True,
                           timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1",
                                "PYTHONPATH": str(Path(moekit.__file__).parents[1])})
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    res = run("resident")
    off = run("0.25")
    assert off["max_resident"] <= 0.25 * experts
    assert res["peak_delta"] >= experts  # the resident model really holds every expert
    # Same non-expert weights, activations and runtime state on both sides; the offloaded process
    # holds at most 25% of the experts, so its peak is at least 75% of the experts lower (8 MiB slack
    # for allocator noise), and below the size of all experts.
    assert off["peak_delta"] <= res["peak_delta"] - 0.75 * experts + 8 * 2**20, (off, res, experts)
    assert off["peak_delta"] < experts and off["rss_delta"] < experts, (off, experts)


def test_generate_cli_offload(saved, capsys):
    from moekit.cli import main

    assert main(["generate", str(saved["float32"]), "--prompt", "1 2 3 4", "--max-new-tokens", "4",
                 "--expert-memory-budget", "0.3", "--no-prefetch"]) == 0
    err = capsys.readouterr().err
    assert "hit_rate" in err and "stall_ms_per_token" in err
    assert main(["generate", "tiny-moe", "--prompt", "1 2", "--expert-memory-budget", "0.3"]) == 2
