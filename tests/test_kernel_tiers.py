"""The per-tier builds of the compiled CPU kernels: module per tier, MOEKIT_CPU_ISA switching in
one process, build errors kept and failing (never skipping) the kernel tests, the mixed-dtype rule
and the per-tier row thresholds.

Shape legend: M rows of a small linear, N its outputs, K reduction length.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kernel_tiers import require_kernels
from moekit import kernels
from moekit.kernels import isa


def test_each_tier_loads_its_own_module(kernel_tier):
    """The module in use carries the tier in its name and was built with explicit flags."""
    mod = kernels.load()
    assert kernels.tier() == kernel_tier and kernels.build_error() is None
    assert mod.__name__ == kernels.module_name(kernel_tier)
    assert "-march=native" not in " ".join(kernels.TIER_FLAGS[kernels.BUILD_TIER[kernel_tier]])
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    torch.testing.assert_close(kernels.linear(x, w), x @ w.T, rtol=1e-5, atol=1e-5)


def test_switching_tiers_in_one_process(monkeypatch):
    """load() follows MOEKIT_CPU_ISA call by call; MOEKIT_KERNELS=0 and MOEKIT_CPU_ISA=off switch off."""
    have = isa.supported_tiers()
    if not have:
        pytest.skip("not an x86 CPU with AVX2: no kernel tier")
    mods = {}
    for t in have:
        monkeypatch.setenv(isa.ENV, t)
        mods[t] = require_kernels(t)
        assert kernels.load() is mods[t] and kernels.tier() == t
    assert len({id(kernels.load()) for _ in range(2)}) == 1
    monkeypatch.setenv(isa.ENV, "off")
    assert kernels.load() is None and kernels.tier() == "off" and not kernels.available()
    monkeypatch.setenv(isa.ENV, have[0])
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert kernels.load() is None and kernels.tier() == "off"


def test_pinned_fixes_the_switches_for_one_forward_and_one_thread(monkeypatch):
    """Inside kernels.pinned() (a model forward) the tier and the on/off switch are read once; a
    nested pin keeps the outer snapshot; other threads and code after the block read the environment."""
    import threading

    have = isa.supported_tiers()
    if not have:
        pytest.skip("not an x86 CPU with AVX2: no kernel tier")
    monkeypatch.setenv(isa.ENV, have[0])
    seen = {}
    with kernels.pinned():
        monkeypatch.setenv(isa.ENV, "off")
        assert isa.tier() == have[0] and kernels.enabled()
        with kernels.pinned():
            assert isa.tier() == have[0]
        assert isa.tier() == have[0]  # the inner exit does not drop the outer pin
        t = threading.Thread(target=lambda: seen.update(tier=isa.tier(), on=kernels.enabled()))
        t.start()
        t.join()
    assert seen == {"tier": "off", "on": False}
    assert isa.tier() == "off" and not kernels.enabled() and kernels.load() is None


def test_a_forward_pins_the_switches(monkeypatch):
    """Transformer.forward runs under kernels.pinned(): an env flip from inside a layer takes effect
    at the next forward, not half-way through this one."""
    import moekit

    have = isa.supported_tiers()
    if not have:
        pytest.skip("not an x86 CPU with AVX2: no kernel tier")
    monkeypatch.setenv(isa.ENV, have[-1])
    m = moekit.build_model(moekit.get_preset("tiny-moe"), seed=0).eval()
    tiers = []

    def hook(module, args):
        tiers.append(isa.tier())
        monkeypatch.setenv(isa.ENV, "off")

    for block in m.layers:
        block.register_forward_pre_hook(hook)
    with torch.no_grad():
        m(torch.randint(0, m.config.vocab_size, (1, 4)))
    assert tiers == [have[-1]] * len(m.layers)
    assert isa.tier() == "off"


def test_missing_tier_is_skipped_naming_the_flags(monkeypatch):
    """On a CPU without a tier's instructions the gate skips, and says which flags are missing."""
    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    with pytest.raises(pytest.skip.Exception, match="avx512bf16: missing .*avx512_bf16"):
        require_kernels("avx512bf16")


def test_build_error_is_kept_and_fails_the_gate(monkeypatch):
    """A failed build: load() gives None, build_error() keeps the message, the gate fails."""
    if not isa.supported_tiers():
        pytest.skip("not an x86 CPU with AVX2: no kernel tier")
    tier = isa.supported_tiers()[0]
    monkeypatch.setenv(isa.ENV, tier)
    monkeypatch.setattr(kernels, "_modules", {})
    monkeypatch.setattr(kernels, "_errors", {})

    def broken(t):
        raise RuntimeError("Error building extension: main.cpp:1:1: error: expected unqualified-id")

    monkeypatch.setattr(kernels, "build", broken)
    assert kernels.load() is None and not kernels.available() and kernels.tier() == "off"
    assert "expected unqualified-id" in kernels.build_error()
    with pytest.raises(pytest.fail.Exception, match="failed to build on a CPU that has it"):
        require_kernels(tier)


def test_broken_kernel_source_fails_not_skips(tmp_path):
    """A real compile of a deliberately broken copy of the sources (a syntax error on the first
    line of simd.h; -Wfatal-errors stops the compiler there, so this takes seconds), under a
    throwaway module name and build dir: the build raises with the compiler's message and the
    gate used by every kernel test fails on it. The real tree builds."""
    if not isa.supported_tiers():
        pytest.skip("not an x86 CPU with AVX2: no kernel tier")
    tier = isa.supported_tiers()[0]
    src = tmp_path / "src"
    src.mkdir()
    for f in kernels.SOURCES:
        shutil.copy(os.path.join(os.path.dirname(kernels.__file__), f), src / f)
    (src / "simd.h").write_text("int broken_on_purpose = ;\n" + (src / "simd.h").read_text())
    with pytest.raises(Exception) as info:
        kernels.build(tier, name=f"moekit_broken_{os.getpid()}", src_dir=src, build_dir=tmp_path / "build",
                      extra_cflags=["-Wfatal-errors"])
    message = f"{type(info.value).__name__}: {info.value}"
    assert "broken_on_purpose" in message or "expected primary-expression" in message
    with pytest.raises(pytest.fail.Exception, match="broken_on_purpose|expected primary-expression"):
        require_kernels(tier, load=lambda: None, error=lambda: message)
    assert require_kernels(tier) is not None  # the untouched tree still builds and loads


def test_usable_mixed_dtype_rule(kernel_tier):
    """Weights may be bf16 under fp32 activations; everything else one dtype (bf16 or fp32)."""
    f32, b16 = torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bfloat16)
    w32, w16 = torch.zeros(4, 4), torch.zeros(4, 4, dtype=torch.bfloat16)
    assert kernels.usable(f32, w16, w16) and kernels.usable(f32, w32) and kernels.usable(b16, w16)
    assert not kernels.usable(b16, w32)  # bf16 activations with fp32 weights: no kernel
    assert not kernels.usable(f32.half(), w16)
    with pytest.raises(RuntimeError, match="float32 with bfloat16 weights"):
        kernels.linear(b16, w32)


def test_row_thresholds_per_tier(monkeypatch):
    """amx keeps only the GEMV rows in bf16; avx512bf16 the measured 64 / 16; avx2 and avx512
    their own; MOEKIT_KERNEL_MAX_ROWS overrides every tier."""
    monkeypatch.delenv("MOEKIT_KERNEL_MAX_ROWS", raising=False)
    monkeypatch.delenv(isa.ENV, raising=False)
    monkeypatch.setattr(isa, "is_x86", lambda: True)
    flags = {t: frozenset(isa._NEEDS[t]) for t in isa.TIERS}
    monkeypatch.setattr(isa, "cpu_flags", lambda: flags["amx"])
    assert kernels.has_amx() and isa.tier() == "amx"
    assert kernels.max_rows(torch.bfloat16) == kernels.max_linear_rows(torch.bfloat16) == kernels.GEMV_ROWS
    assert kernels.max_rows(torch.float32) == 512
    monkeypatch.setattr(isa, "cpu_flags", lambda: flags["avx512bf16"])
    assert not kernels.has_amx()
    assert kernels.max_rows(torch.bfloat16) == 64 and kernels.max_linear_rows(torch.bfloat16) == 16
    for t in ("avx2", "avx512"):
        monkeypatch.setattr(isa, "cpu_flags", lambda t=t: flags[t])
        assert kernels.max_rows(torch.float32) == kernels._ROWS[t][torch.float32]
        assert kernels.max_linear_rows(torch.float32) == kernels._LINEAR_ROWS[t][torch.float32]
    # fp32 activations with bf16 weights: no limit on any tier (PyTorch has no mixed GEMM)
    assert kernels.max_rows(torch.float32, torch.bfloat16) == kernels.MIXED_ROWS
    assert kernels.max_linear_rows(torch.float32, torch.bfloat16) == kernels.MIXED_ROWS
    assert kernels.max_rows(torch.float32, torch.float32) == kernels._ROWS["avx512"][torch.float32]
    monkeypatch.setenv("MOEKIT_KERNEL_MAX_ROWS", "3")
    assert kernels.max_rows(torch.bfloat16) == 3 == kernels.max_linear_rows(torch.float32)
    assert kernels.max_rows(torch.float32, torch.bfloat16) == 3


def gil_free_increments(call, n: int = 5) -> int:
    """How far a spinning Python thread gets during `n` calls. The switch interval is 1 s and the
    spinner has just held the GIL for it, so the main thread holds the GIL with a fresh 1-s timer:
    the spinner can only run while a call has released the GIL (0 otherwise)."""
    import sys
    import threading
    import time

    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    t = threading.Thread(target=spin)
    try:
        t.start()
        time.sleep(0)  # hand the GIL to the spinner; we get it back after its 1-s turn
        before = count[0]
        for _ in range(n):
            call()
        return count[0] - before
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()


def test_kernels_release_the_gil(kernel_tier):
    """A kernel call lets other Python threads run (the offload prefetch thread, the server's loop)."""
    kernels.load()
    x, w = torch.randn(8, 2048), torch.randn(8192, 2048)
    kernels.linear(x, w)  # warm
    assert gil_free_increments(lambda: kernels.linear(x, w)) > 1000
