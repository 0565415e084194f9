"""Cross-entropy for LM heads, fused into one pass each way.

Shape legend: N target positions, V vocabulary.

`F.cross_entropy(logits.float(), ...)` keeps a float32 copy of the [N, V] logits for autograd,
runs log_softmax, and in backward zero-fills an [N, V] gradient for the NLL before
log_softmax's own backward: on a small-vocab CPU model (8192 x 4096 positions) those passes
were about half of a whole training step. Here the forward keeps only the target log-probabilities,
and the backward recomputes the softmax and writes `softmax - onehot`, scaled, in a single float32
buffer per row block that is cast once to the logits' dtype. Values and gradients equal
F.cross_entropy's (tests/test_loss.py).

Both passes walk the rows in blocks of about CHUNK_BYTES of float32, so each block's upcast and
softmax run while it is in cache, and both use ATen's fused (log_)softmax kernels with a float32
result straight from bf16 logits: one vectorised pass for max, exp and sum, where logsumexp plus a
separate exp pass cost 2x as much (on 2 Zen 5 cores, [4096, 8192] bf16 logits forward + backward:
30-36 ms against 41-45 ms for logsumexp + exp_, and 85 ms in whole-tensor passes).
"""

from __future__ import annotations

import torch

from moekit import kernels

CHUNK_BYTES = 4 << 20
"""Float32 bytes per row block (4 MiB: inside L2+L3 on current CPUs)."""


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_BYTES // (4 * V))



class _CrossEntropyKernel(torch.autograd.Function):
    """The compiled path (CPU, bf16/fp32): one pass per row computes the loss and, when the logits
    need a gradient, the gradient itself, since the loss is a mean with an upstream gradient that
    is a scalar (1 in training). Backward only scales it when that scalar is not 1."""

    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int,
                want_grad: bool) -> torch.Tensor:
        count = int((target_N != ignore_index).sum())
        loss_N, g_NV = kernels.cross_entropy_rows(logits_NV, target_N, ignore_index, 1.0 / max(count, 1), want_grad)
        ctx.save_for_backward(g_NV)
        return loss_N.sum() / max(count, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (g_NV,) = ctx.saved_tensors
        return (g_NV if bool(grad_out == 1) else g_NV * grad_out.to(g_NV.dtype)), None, None, None


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
        # Softmax statistics in float32 whatever the logits' dtype (bf16 under autocast).
        N, V = logits_NV.shape
        c = _rows_per_chunk(V)
        valid_N = target_N != ignore_index
        tgt_N1 = torch.where(valid_N, target_N, 0).unsqueeze(1)
        logp_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
        for a in range(0, N, c):
            logp = torch.log_softmax(logits_NV[a:a + c], dim=-1, dtype=torch.float32)
            logp_N[a:a + c] = logp.gather(1, tgt_N1[a:a + c]).squeeze(1)
        count = valid_N.sum().clamp_min(1)
        loss = -(logp_N * valid_N).sum() / count
        ctx.save_for_backward(logits_NV, tgt_N1, valid_N, count)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits_NV, tgt_N1, valid_N, count = ctx.saved_tensors
        N, V = logits_NV.shape
        c = _rows_per_chunk(V)
        grad_NV = torch.empty_like(logits_NV)
        # The mean's scale, the upstream gradient and ignored positions, as one factor per row.
        scale_N1 = (valid_N * (grad_out / count)).unsqueeze(1)
        minus_one = torch.full((min(c, N), 1), -1.0, device=logits_NV.device)
        for a in range(0, N, c):
            # softmax recomputed in one float32 block, minus the one-hot, scaled, cast on store.
            g = torch.softmax(logits_NV[a:a + c], dim=-1, dtype=torch.float32)
            g.scatter_add_(1, tgt_N1[a:a + c], minus_one[:g.shape[0]])
            grad_NV[a:a + c] = g.mul_(scale_N1[a:a + c])
        return grad_NV, None, None


def cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not `ignore_index` (float32 scalar)."""
    if kernels.train_usable(logits_NV) and logits_NV.is_contiguous():
        # Decided here: inside forward autograd is off, and eval (no_grad) must not pay for a gradient.
        want_grad = torch.is_grad_enabled() and logits_NV.requires_grad
        return _CrossEntropyKernel.apply(logits_NV, target_N, ignore_index, want_grad)
    return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
