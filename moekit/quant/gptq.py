"""GPTQ (Frantar et al. 2022) for stacks of matrices, group-wise, on any of the formats.

Shape legend: B matrices in the stack (experts), O output rows, I input columns, G group size,
N samples (tokens) of a matrix's input.

Each matrix b minimises ||X_b W_b^T - X_b Q_b^T||^2 over its own inputs X_b: columns are quantized
left to right and each column's rounding error is spread onto the columns not yet quantized through
the inverse Hessian's Cholesky factor. A group's scale is chosen when its first column is reached,
from the already-updated weights. All B matrices run in lockstep (one batched op per column), so an
expert stack costs I small batched steps rather than B * I.
"""

from __future__ import annotations

import torch

from moekit.quant import formats

DAMP = 0.01
"""Hessian damping as a fraction of its mean diagonal (GPTQ's default)."""
BLOCK = 128


class Hessian:
    """Running sum of X^T X per matrix of a stack: [B, I, I] float64, and the samples seen."""

    def __init__(self, B: int, I: int, single: bool = False):
        self.single = single
        """One plain matrix (not a stack): GPTQ's results are returned unstacked."""
        self.H = torch.zeros(B, I, I, dtype=torch.float64)
        self.n = torch.zeros(B, dtype=torch.int64)

    def add(self, b: int, x_NI: torch.Tensor) -> None:
        if x_NI.shape[0]:
            x = x_NI.reshape(-1, x_NI.shape[-1]).double()
            self.H[b] += x.t() @ x
            self.n[b] += x.shape[0]

    def mean(self) -> torch.Tensor:
        """E[x x^T] per matrix (zero for a matrix with no samples)."""
        return (self.H / self.n.clamp(min=1).view(-1, 1, 1)).float()


def _inverse_chol(H_BII: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping (more damping if H is still not positive definite)."""
    B, I, _ = H_BII.shape
    eye = torch.eye(I, dtype=torch.float64)
    H = H_BII.double()
    diag = H.diagonal(dim1=-2, dim2=-1)
    mean = diag.mean(-1).clamp(min=1e-8).view(B, 1, 1)
    for damp in (DAMP, 0.1, 1.0):
        L, info = torch.linalg.cholesky_ex(H + damp * mean * eye)
        if not bool(info.any()):
            break
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True).float()


@torch.no_grad()
def gptq(w_BOI: torch.Tensor, H_BII: torch.Tensor, scheme: str, group_size: int, zero_point: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize each w[b] against Hessian H[b]; returns (values on the grid [B, O, I] float32,
    scale [B, O, I/G], zero [B, O, I/G] or None) for `QuantizedTensor.from_float(..., scale, zero)`.

    Plan: 1. dead inputs (zero Hessian diagonal) get weight 0 and unit diagonal; 2. damped inverse
    Hessian, upper Cholesky factor U; 3. per block of BLOCK columns, column by column: pick the group
    scale at a group's first column, round, push the error onto the block's later columns (row i of
    U); 4. after a block, push its errors onto all later columns at once.
    """
    W = w_BOI.detach().float().clone()
    B, O, I = W.shape
    G = group_size
    H = H_BII.clone().float()
    dead = H.diagonal(dim1=-2, dim2=-1) == 0
    H.diagonal(dim1=-2, dim2=-1)[dead] = 1.0
    W.masked_fill_(dead.unsqueeze(1), 0.0)
    U = _inverse_chol(H)
    Q = torch.empty_like(W)
    scale = torch.empty(B, O, I // G)
    zero = torch.empty(B, O, I // G) if zero_point else None
    blk = max(G, BLOCK // G * G)  # whole groups per block
    for i1 in range(0, I, blk):
        i2 = min(i1 + blk, I)
        W1, E1 = W[:, :, i1:i2].clone(), torch.empty(B, O, i2 - i1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:
                s, z = formats.group_params(scheme, W1[:, :, i:i + G], zero_point)
                scale[:, :, col // G] = s
                if zero is not None:
                    zero[:, :, col // G] = z
                s_BO1, z_BO1 = s.unsqueeze(-1), (None if z is None else z.unsqueeze(-1))
            w_BO1 = W1[:, :, i:i + 1]
            q_BO1 = formats.fake_quant(scheme, w_BO1, s_BO1, z_BO1)
            Q[:, :, col:col + 1] = q_BO1
            err_BO1 = (w_BO1 - q_BO1) / U1[:, i, i].view(B, 1, 1)
            W1[:, :, i:] -= err_BO1 * U1[:, i:i + 1, i:]
            E1[:, :, i:i + 1] = err_BO1
        if i2 < I:
            W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    return Q, scale, zero
