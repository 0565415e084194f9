"""Shared fixtures: `kernel_tier` runs a test once per x86 CPU tier (tests/kernel_tiers.py)."""

from __future__ import annotations

import pytest

from moekit.kernels import isa
from kernel_tiers import require_kernels


@pytest.fixture(params=isa.TIERS)
def kernel_tier(request, monkeypatch) -> str:
    """MOEKIT_CPU_ISA forced to each tier in turn, kernels switched on and built for it: skipped
    where the CPU lacks the tier, failed where it has it but the build fails."""
    monkeypatch.setenv(isa.ENV, request.param)
    monkeypatch.delenv("MOEKIT_KERNELS", raising=False)
    require_kernels(request.param)
    return request.param
