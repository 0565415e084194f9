"""Gating of the compiled-kernel tests by CPU tier (used by the `kernel_tier` fixture in conftest.py).

A tier the CPU lacks is skipped, naming the missing flags; a tier the CPU has must build: a build
failure there fails the test with the compiler's message (never a skip, which would hide a broken
kernel source behind a green run).
"""

from __future__ import annotations

from typing import Callable

import pytest

from moekit import kernels
from moekit.kernels import isa


def require_kernels(tier: str, load: Callable[[], object] | None = None,
                    error: Callable[[], str | None] | None = None) -> object:
    """The compiled module for `tier` (MOEKIT_CPU_ISA already set to it), or skip/fail the test.
    `load` and `error` default to kernels.load / kernels.build_error (a test passes a broken build)."""
    missing = isa.missing_flags(tier)
    if missing:
        pytest.skip(f"CPU lacks tier {tier}: missing {' '.join(missing)}")
    mod = (load or kernels.load)()
    if mod is None:
        reason = (error or kernels.build_error)() or "kernels.load() returned None without an error"
        pytest.fail(f"moekit kernels for tier {tier} failed to build on a CPU that has it:\n{reason}", pytrace=False)
    return mod


class CallCounter:
    """Counts calls of kernels.<name> for the given names, so a test fails if the kernel path is
    silently skipped (the PyTorch fallback gives the same numbers)."""

    def __init__(self, monkeypatch, *names: str):
        self.calls = {n: 0 for n in names}
        for n in names:
            fn = getattr(kernels, n)

            def wrapped(*a, _fn=fn, _n=n, **k):
                self.calls[_n] += 1
                return _fn(*a, **k)

            monkeypatch.setattr(kernels, n, wrapped)

    def total(self) -> int:
        return sum(self.calls.values())
