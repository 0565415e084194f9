"""The fused LM cross-entropy equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moekit import kernels
from moekit.model import loss as loss_mod
from moekit.model.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("upstream", [1.0, 1.7])
def test_kernel_matches_torch_cross_entropy(monkeypatch, kernel_tier, dtype, ignore, upstream):
    """The compiled kernel (loss and gradient in one forward pass), on every CPU tier."""
    _check(monkeypatch, dtype, ignore, "kernel", upstream)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("path", ["whole", 1, 5])
@pytest.mark.parametrize("upstream", [1.0, 1.7])
def test_matches_torch_cross_entropy(monkeypatch, dtype, ignore, path, upstream):
    """The PyTorch path in one whole-tensor block or row blocks of 1 and 5 rows (the last one
    partial); eval (no_grad) too."""
    _check(monkeypatch, dtype, ignore, path, upstream)


def _check(monkeypatch, dtype, ignore, path, upstream):
    calls = []
    if path == "kernel":
        orig = kernels.cross_entropy_rows
        monkeypatch.setattr(kernels, "cross_entropy_rows", lambda *a, **k: calls.append(1) or orig(*a, **k))
    else:
        monkeypatch.setenv("MOEKIT_KERNELS", "0")
        if path != "whole":
            monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * 101 * path)
    torch.manual_seed(0)
    N, V = 37, 101  # V not a multiple of 16: the kernel's masked tails
    logits = (torch.randn(N, V) * 4).to(dtype)
    target = torch.randint(0, V, (N,))
    if ignore:
        target[::3] = -100
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la = cross_entropy(a, target)
    lb = F.cross_entropy(b.float(), target, ignore_index=-100)
    assert_close(la, lb)
    (la * upstream).backward()
    (lb * upstream).backward()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    assert_close(a.grad.float(), b.grad.float(), **tol)
    assert a.grad.dtype == dtype
    with torch.no_grad():
        assert_close(cross_entropy(logits, target), lb.detach())
    assert bool(calls) == (path == "kernel")


def test_all_ignored_is_zero_not_nan():
    logits = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
