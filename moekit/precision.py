"""The compute-dtype policy: one place that decides whether a device computes in bf16 or fp32.

bf16 compute (autocast, bf16 GEMMs) pays only where the hardware runs it natively. On a CPU without
AVX512-BF16 / AMX / AVX2-VNNI-2, PyTorch's bf16 `mm` falls back to ATen's scalar GEMM (measured on a
Zen 3: 6.7 GFLOP/s against 59 for fp32 on one core; pytorch#146508 reports 44-499x on AVX2 Xeons),
and on AVX-512 without BF16 oneDNN emulates it 3-4x slower than fp32. So `auto` means bf16 where it
is native and fp32 elsewhere; inference may still *store* weights in bf16 (half the bytes) and
widen them in the kernels. `MOEKIT_CPU_ISA` forcing a lower tier makes `auto` choose what that
tier's CPUs would get (`moekit.kernels.isa`), so a newer CPU reproduces an older CPU's whole run.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch

from moekit.errors import MoekitError
from moekit.kernels import isa

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = ("auto", "bf16", "fp32")

SLOWDOWN_NOTE = {
    "avx2": "bf16 matmuls run on ATen's scalar fallback here: expect 10-100x slower than fp32",
    "avx512": "bf16 is emulated by oneDNN here (no AVX512-BF16): expect 3-4x slower than fp32",
    "off": "bf16 is not native on this CPU: expect it to be several times slower than fp32",
}


class BF16SlowWarning(UserWarning):
    """bf16 compute was asked for on a device that does not run it natively."""


def device_type(device: str | torch.device | None) -> str:
    if device is None:
        return "cpu"
    return torch.device(device).type


def bf16_native(device: str | torch.device | None = "cpu") -> bool:
    """Whether bf16 matmuls run natively (not emulated, not a scalar fallback) on `device`."""
    dev = device_type(device)
    if dev == "cpu":
        return isa.bf16_native_cpu()
    if dev == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev in ("mps", "xpu"):
        return True
    return False


def auto_dtype(device: str | torch.device | None = "cpu") -> torch.dtype:
    """The compute dtype `auto` picks on `device`: bf16 where native, else fp32."""
    return torch.bfloat16 if bf16_native(device) else torch.float32


def slowdown_note(device: str | torch.device | None = "cpu") -> str:
    if device_type(device) != "cpu":
        return "bf16 is not supported natively on this device: expect it to be slow"
    t = isa.tier()
    return SLOWDOWN_NOTE.get(t if t in SLOWDOWN_NOTE else "off", SLOWDOWN_NOTE["off"])


def resolve(precision: str, device: str | torch.device | None = "cpu", what: str = "compute") -> Literal["bf16", "fp32"]:
    """'auto' | 'bf16' | 'fp32' (also 'bfloat16' / 'float32') -> 'bf16' or 'fp32' for `device`.

    An explicit bf16 where bf16 is not native is honoured, with a warning that says how much slower
    to expect and how to avoid it."""
    p = {"bfloat16": "bf16", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}.get(precision, precision)
    if p not in PRECISIONS:
        raise MoekitError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if p == "auto":
        return "bf16" if bf16_native(device) else "fp32"
    if p == "bf16" and not bf16_native(device):
        msg = (f"moekit: {what} precision bf16 on {describe(device)}: {slowdown_note(device)}. "
               "Use --precision auto (or fp32) to compute in fp32.")
        warnings.warn(msg, BF16SlowWarning, stacklevel=2)
        log.warning(msg)
    return p  # type: ignore[return-value]


def to_dtype(p: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[p]


def describe(device: str | torch.device | None = "cpu") -> str:
    dev = device_type(device)
    if dev == "cpu":
        return f"{isa.cpu_model()} (tier {isa.tier()}{', forced' if isa.forced() else ''})"
    if dev == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return dev


def inference_dtype(stored: torch.dtype, requested: str = "auto", device: str | torch.device | None = "cpu") -> torch.dtype:
    """The weight dtype an inference run uses for weights stored as `stored`.

    requested 'auto': keep the stored dtype where the device computes it natively; low-precision
    weights (bf16/fp16) on a device without native bf16 are widened to fp32 (a bf16 model would
    otherwise run every matmul on the slow path). An explicit dtype is used as given (with the
    bf16 warning where it applies)."""
    if requested in ("auto", None):
        if stored in (torch.bfloat16, torch.float16) and not bf16_native(device):
            return torch.float32
        return stored
    dt = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}.get(requested)
    if dt is None:
        raise MoekitError(f"dtype {requested!r} is not one of auto, float32, bfloat16, float16")
    if dt in (torch.bfloat16, torch.float16) and not bf16_native(device):
        resolve("bf16", device, what="inference")
    return dt


def widen_compute(model: torch.nn.Module, compute: torch.dtype = torch.float32) -> int:
    """Compute in `compute` while the big matrices stay in their stored (bf16/fp16) dtype.

    For CPUs without native bf16: decode is bound by weight bandwidth, so bf16 storage reads half
    the bytes of fp32, and the kernels widen each weight to fp32 in registers (no bf16 arithmetic).
    Kept narrow: the stacked expert weights, dense FFN and attention projections, embeddings and
    the LM head (all consumed through `decode_linear` / the expert backends, which handle the mixed
    dtypes). Everything else (norms, routers, gates, MLA projections, biases) becomes `compute`;
    the router in particular stays precise. Returns the bytes kept narrow."""
    from moekit.model.attention import Attention
    from moekit.moe.experts import DenseFFN, GroupedExperts

    keep: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, GroupedExperts):
            keep |= {id(mod.w13), id(mod.w2)}
        elif isinstance(mod, DenseFFN):
            keep |= {id(mod.w13.weight), id(mod.w2.weight)}
        elif isinstance(mod, Attention):
            keep |= {id(mod.wqkv.weight), id(mod.wo.weight)}
    for name in ("embed", "lm_head"):
        mod = getattr(model, name, None)
        if mod is not None:
            keep.add(id(mod.weight))
    kept = 0
    for p in model.parameters():
        if id(p) in keep and p.dtype in (torch.bfloat16, torch.float16):
            kept += p.numel() * p.element_size()
        elif p.is_floating_point() and p.dtype != compute:
            p.data = p.data.to(compute)
    for mod in model.modules():
        if getattr(mod, "keeps_storage_dtype", False):  # quantized codes and float16 scales (moekit.quant)
            continue
        for k, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != compute:
                mod._buffers[k] = b.to(compute)
    return kept


def apply_inference_policy(model: torch.nn.Module, requested: str = "auto") -> str:
    """Put `model` in the dtype(s) an inference run should use; returns a short description.

    auto on a device without native bf16, for bf16/fp16 weights: fp32 compute with the big matrices
    kept in their stored dtype when the compiled kernels (which widen them in registers) are
    available, else everything in fp32. Otherwise the dtype `inference_dtype` gives."""
    from moekit import kernels

    stored = model.dtype
    device = getattr(model, "device", "cpu")
    low = stored in (torch.bfloat16, torch.float16)
    if requested in ("auto", None) and low and not bf16_native(device):
        if device_type(device) == "cpu" and stored == torch.bfloat16 and kernels.available():
            n = widen_compute(model, torch.float32)
            return f"fp32 compute, {n / 2**20:.0f} MiB of weights kept in {str(stored).removeprefix('torch.')}"
        model.to(torch.float32)
        return "fp32 (weights widened)"
    want = inference_dtype(stored, requested, device)
    if want != stored:
        model.to(want)
    return str(want).removeprefix("torch.")
