"""The `quantization` section of a quantized checkpoint's config.json: a typed, serialisable config.

It records everything needed to rebuild the quantized modules' shapes before loading (scheme, group
size, zero points, which parts were quantized) and how the weights were produced (method,
calibration), so a checkpoint documents itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moekit.errors import MoekitError

SCHEMES = ("int8", "int4", "mxfp4", "q4_k")
METHODS = ("rtn", "gptq")
ATTENTION = ("int8", "bf16")
GROUP_SIZES = (32, 64, 128)
FORMAT = 1
MX_BLOCK = 32
"""OCP MX block size: one shared E8M0 scale per 32 elements (gpt-oss ships MXFP4 this way)."""


class QuantError(MoekitError, ValueError):
    """A quantization request or quantized checkpoint moekit cannot use; the message names the fix."""


@dataclass
class QuantConfig:
    """How a model's weights are quantized (weight-only, group-wise along the input dim)."""

    scheme: str = "int8"
    """Experts, dense FFNs and shared experts: int8 (symmetric), int4, mxfp4 (E2M1 + E8M0) or q4_k
    (GGML Q4_K: 256-input super-blocks of 8 x 32 with 6-bit scales and mins)."""
    group_size: int = 32
    """Elements sharing one scale, along each row's input dim (mxfp4: always 32)."""
    zero_point: bool = False
    """int4 only: per-group zero point (asymmetric, codes 0..15); False = symmetric like GGUF Q4_0."""
    method: str = "rtn"
    """rtn (round to nearest) or gptq (Hessian-aware, per-expert Hessians from routed tokens)."""
    attention: str = "bf16"
    """int8: attention projections quantized int8 (same group size); bf16: left in float."""
    lm_head: bool = False
    """Quantize the (untied) output head with `scheme` as well."""
    dense: bool = True
    """Quantize dense FFN layers and shared experts with `scheme`."""
    router_calibration: bool = False
    """Routers refit layer by layer on the quantized model's inputs (EAC-MoE QESC)."""
    format: int = 1
    """Storage layout version (1: 4-bit codes in GGUF block order, float16 / E8M0 scales); a loader
    refuses versions it does not know instead of misreading the bytes."""
    calibration: dict[str, Any] = field(default_factory=dict)
    """What produced the weights: corpus, tokens, floors, routing agreement before/after (informative)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        if self.method not in METHODS:
            raise QuantError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.attention not in ATTENTION:
            raise QuantError(f"unknown attention precision {self.attention!r}; choose int8 or bf16")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"group size {self.group_size} unsupported; choose one of {GROUP_SIZES}")
        if self.scheme == "mxfp4" and self.group_size != MX_BLOCK:
            raise QuantError(f"mxfp4 shares one E8M0 scale per {MX_BLOCK} elements (OCP MX); "
                             f"use --group-size {MX_BLOCK}")
        if self.scheme == "q4_k" and self.group_size != 32:
            raise QuantError("q4_k has 32-input sub-blocks inside 256-input super-blocks (GGML Q4_K); "
                             "use --group-size 32")
        if self.scheme == "q4_k" and self.method == "gptq":
            raise QuantError("q4_k picks its scales with llama.cpp's super-block search, which GPTQ cannot drive; "
                             "use --method rtn, or --scheme int4 --method gptq")
        if self.format != FORMAT:
            raise QuantError(f"quantized storage format {self.format} is not readable by this moekit "
                             f"(it reads format {FORMAT}); re-quantize the original model")
        if self.zero_point and self.scheme != "int4":
            raise QuantError("zero points apply to int4 only; drop zero_point or use --scheme int4")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise QuantError(f"unknown quantization field(s) {bad}; known: {sorted(known)}")
        return cls(**d)
