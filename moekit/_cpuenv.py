"""Make a forced lower ISA tier reach the libraries too. Runs first in `import moekit`, before torch.

`MOEKIT_CPU_ISA=avx2` on a newer CPU must reproduce an AVX2 machine for *every* engine in a run, not
just moekit's kernels: oneDNN (bf16/fp32 GEMMs, convolutions), MKL (fp32 GEMMs) and ATen's own
vectorised kernels all pick their ISA at run time. Each has a variable that caps it, read when the
library loads, so they are set here (never overriding a value the user set) before torch is
imported. Worker processes inherit them. Without this, a forced AVX2 run would still get oneDNN's
native bf16 on the AVX512-BF16 CPU it runs on, and the baseline engines would use AVX-512.
"""

from __future__ import annotations

import os
import sys

CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
    "avx512bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}
"""Library caps per forced tier (amx and auto: no cap)."""


def library_caps(tier: str) -> dict[str, str]:
    """The environment that caps oneDNN, ATen and MKL at `tier` (empty for auto/amx/off)."""
    return dict(CAPS.get(tier, {}))


def apply() -> dict[str, str]:
    """Set the caps for MOEKIT_CPU_ISA (if forced and torch is not loaded yet); returns what was set."""
    tier = os.environ.get("MOEKIT_CPU_ISA", "auto").strip().lower()
    if tier not in CAPS or "torch" in sys.modules:
        return {}
    done = {}
    for k, v in library_caps(tier).items():
        if k not in os.environ:
            os.environ[k] = done[k] = v
    return done


apply()
