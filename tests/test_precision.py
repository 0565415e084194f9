"""The compute-dtype policy: `auto` picks bf16 only where it is native; a forced lower ISA tier makes
this CPU act like that tier's CPUs (dtype and library caps); and a guard proves that no bf16/fp16
CPU matmul runs during training or generation where bf16 is not native."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import tiny_data, tiny_model

import moekit
from moekit import precision
from moekit.errors import MoekitError
from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams
from moekit.kernels import isa
from moekit.train import TrainConfig, train

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
           aten.linear.default, aten.addmv.default, aten.mv.default, aten.dot.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default, aten.convolution.default}


class LowPrecisionMatmulGuard(TorchDispatchMode):
    """Records every CPU matmul-like op that receives a bf16/fp16 tensor."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            for a in (*args, *(kwargs or {}).values()):
                if isinstance(a, torch.Tensor) and a.is_cpu and a.dtype in (torch.bfloat16, torch.float16):
                    self.hits.append(f"{func} {a.dtype} {tuple(a.shape)}")
                    break
        return func(*args, **(kwargs or {}))


@pytest.fixture
def avx2(monkeypatch):
    """Act like an AVX2-only CPU (Zen 3): the tier every x86-64 CPU moekit supports can run."""
    if "avx2" not in isa.supported_tiers():
        pytest.skip("this CPU has no AVX2 tier (not x86-64 v3)")
    monkeypatch.setenv(isa.ENV, "avx2")
    assert not precision.bf16_native("cpu")


def test_auto_is_fp32_where_bf16_is_not_native(avx2, monkeypatch):
    assert precision.resolve("auto") == "fp32"
    assert precision.auto_dtype() is torch.float32
    assert precision.inference_dtype(torch.bfloat16, "auto") is torch.float32
    assert precision.inference_dtype(torch.float32, "auto") is torch.float32
    with pytest.warns(precision.BF16SlowWarning, match="10-100x slower"):
        assert precision.resolve("bf16") == "bf16"
    monkeypatch.setenv(isa.ENV, "avx512")  # AVX-512 without BF16 (Ice Lake): emulated, not native
    if "avx512" in isa.supported_tiers():
        assert precision.resolve("auto") == "fp32"
        with pytest.warns(precision.BF16SlowWarning, match="3-4x slower"):
            precision.resolve("bf16")


def test_auto_is_bf16_on_native_tiers(monkeypatch):
    if not {"avx512bf16"} & set(isa.supported_tiers()):
        pytest.skip("no AVX512-BF16 on this CPU")
    monkeypatch.setenv(isa.ENV, "avx512bf16")
    assert precision.resolve("auto") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve("bf16") == "bf16"
    assert precision.inference_dtype(torch.bfloat16, "auto") is torch.bfloat16


def test_bad_precision_and_tier_are_clear_errors(monkeypatch):
    with pytest.raises(MoekitError, match="precision 'fp8' is not one of auto, bf16, fp32"):
        precision.resolve("fp8")
    monkeypatch.setenv(isa.ENV, "avx9")
    with pytest.raises(ValueError, match="MOEKIT_CPU_ISA='avx9' is not a tier"):
        isa.tier()


def test_forced_tier_caps_the_libraries_in_a_fresh_process():
    if "avx2" not in isa.supported_tiers():
        pytest.skip("no AVX2 tier")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env[isa.ENV] = "avx2"
    code = ("import moekit, moekit.precision, os, torch; print(torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'],"
            " moekit.precision.auto_dtype())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["AVX2", "AVX2", "torch.float32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("prec"))


def _train(data, tmp_path, prec: str) -> LowPrecisionMatmulGuard:
    model = tiny_model(data)
    tc = TrainConfig(batch_size=2, seq_len=16, warmup_steps=1, eval_every=2, ckpt_every=100, log_every=1,
                     eval_tokens=256, max_steps=2, precision=prec)
    with LowPrecisionMatmulGuard() as g:
        train(model, data, tmp_path / prec, tc, progress=False)
    return g


def test_guard_training_runs_no_bf16_matmul_where_not_native(avx2, data, tmp_path):
    g = _train(data, tmp_path, "auto")
    assert g.hits == [], g.hits[:5]
    # The guard itself works: an explicit bf16 run (which warns) is caught.
    with pytest.warns(precision.BF16SlowWarning):
        g = _train(data, tmp_path, "bf16")
    assert any("bfloat16" in h for h in g.hits)


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-deepseek", "tiny-qwen-moe"])
def test_guard_generation_runs_no_bf16_matmul_where_not_native(avx2, preset, monkeypatch):
    model = moekit.build_model(moekit.get_preset(preset), seed=0).to(torch.bfloat16)  # bf16 checkpoint
    eng = Engine(model, max_batch_size=2)
    assert eng.model.dtype is torch.float32  # widened once, not computed in bf16
    with LowPrecisionMatmulGuard() as g:
        out = eng.generate([[1, 2, 3, 4, 5], [7, 8]], SamplingParams(max_new_tokens=4))
    assert g.hits == [], g.hits[:5]
    assert all(len(o.tokens) == 4 for o in out)
    # Control: a forced bf16 engine (PyTorch ops only) does run bf16 matmuls, and the guard sees them.
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    model = moekit.build_model(moekit.get_preset(preset), seed=0)
    with pytest.warns(precision.BF16SlowWarning):
        eng = Engine(model, max_batch_size=2, precision="bf16")
    with LowPrecisionMatmulGuard() as g:
        eng.generate([[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=2))
    assert any("bfloat16" in h for h in g.hits)


@pytest.mark.parametrize("kernels_on", ["1", "0"])
@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-deepseek", "tiny-qwen-moe", "tiny-dense"])
def test_bf16_storage_fp32_compute_equals_fp32_model(preset, kernels_on, monkeypatch):
    """widen_compute keeps the big matrices in bf16 and computes in fp32: the same values as the
    whole model widened to fp32 (widening is exact), in a full forward and in cached generation."""
    import copy

    monkeypatch.setenv("MOEKIT_KERNELS", kernels_on)
    bf = moekit.build_model(moekit.get_preset(preset), seed=0).to(torch.bfloat16).eval()
    wide = copy.deepcopy(bf).float()
    mixed = copy.deepcopy(bf)
    kept = precision.widen_compute(mixed)
    assert kept > 0 and mixed.dtype is torch.float32
    assert any(p.dtype is torch.bfloat16 for p in mixed.parameters())
    for m in mixed.moe_layers():
        assert m.router.weight.dtype is torch.float32  # the router stays precise
    ids = torch.randint(0, bf.config.vocab_size, (2, 7))
    with torch.no_grad():
        ref, got = wide(ids).logits, mixed(ids).logits
    assert got.dtype is torch.float32
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    p = SamplingParams(max_new_tokens=5)
    a = Engine(wide, max_batch_size=2, precision="fp32").generate([[1, 2, 3], [4, 5, 6, 7]], p)
    b = Engine(mixed, max_batch_size=2, precision="fp32").generate([[1, 2, 3], [4, 5, 6, 7]], p)
    assert [g.tokens for g in a] == [g.tokens for g in b]
