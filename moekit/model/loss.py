"""Cross-entropy for LM heads, fused into one pass each way.

Shape legend: N target positions, V vocabulary.

`F.cross_entropy(logits.float(), ...)` keeps a float32 copy of the [N, V] logits for autograd,
runs log_softmax, and in backward zero-fills an [N, V] gradient for the NLL before
log_softmax's own backward: on a small-vocab CPU model (8192 x 4096 positions) those passes
were about half of a whole training step. Here the forward computes only a float32 logsumexp and
the target logits, and the backward writes `softmax - onehot`, scaled, in a single float32
buffer that is cast once to the logits' dtype. Values and gradients equal F.cross_entropy's
(tests/test_loss.py).
"""

from __future__ import annotations

import torch


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int) -> torch.Tensor:
        # Softmax statistics in float32 whatever the logits' dtype (bf16 under autocast).
        lse_N = torch.logsumexp(logits_NV.float(), dim=-1)
        valid_N = target_N != ignore_index
        tgt_N = torch.where(valid_N, target_N, 0)
        picked_N = logits_NV.gather(1, tgt_N.unsqueeze(1)).squeeze(1).float()
        count = valid_N.sum().clamp_min(1)
        loss = ((lse_N - picked_N) * valid_N).sum() / count
        ctx.save_for_backward(logits_NV, tgt_N, valid_N, lse_N, count)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits_NV, tgt_N, valid_N, lse_N, count = ctx.saved_tensors
        # softmax = exp(logits - lse), built in place in one float32 buffer.
        grad_NV = logits_NV.float().sub_(lse_N.unsqueeze(1)).exp_()
        grad_NV.scatter_add_(1, tgt_N.unsqueeze(1), torch.full_like(lse_N, -1.0).unsqueeze(1))
        # One pass for the mean's scale, the upstream gradient and ignored positions.
        grad_NV.mul_(valid_N.unsqueeze(1) * (grad_out / count))
        return grad_NV.to(logits_NV.dtype), None, None


def cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not `ignore_index` (float32 scalar)."""
    return _CrossEntropy.apply(logits_NV, target_N, ignore_index)
