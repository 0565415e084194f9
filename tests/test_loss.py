"""The fused LM cross-entropy equals F.cross_entropy in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moekit.model import loss as loss_mod
from moekit.model.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("rows_per_block", [None, 1, 5])
def test_matches_torch_cross_entropy(monkeypatch, dtype, ignore, rows_per_block):
    """Whole-tensor and row-blocked passes (blocks of 1 and 5 rows, the last one partial)."""
    if rows_per_block:
        monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 4 * 101 * rows_per_block)
    torch.manual_seed(0)
    N, V = 37, 101
    logits = (torch.randn(N, V) * 4).to(dtype)
    target = torch.randint(0, V, (N,))
    if ignore:
        target[::3] = -100
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    la = cross_entropy(a, target)
    lb = F.cross_entropy(b.float(), target, ignore_index=-100)
    assert_close(la, lb)
    g = torch.tensor(1.7)
    (la * g).backward()
    (lb * g).backward()
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    assert_close(a.grad.float(), b.grad.float(), **tol)
    assert a.grad.dtype == dtype


def test_all_ignored_is_zero_not_nan():
    logits = torch.randn(4, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
