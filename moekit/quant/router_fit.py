"""Router calibration (EAC-MoE's QESC) and routing-agreement measures.

Shape legend: T tokens, D model dim, E experts, K experts per token, K' width of the fit mask.

After the layers below have been quantized, a router sees shifted inputs h_q instead of the
full-precision h_fp and picks other experts. The refit solves, per expert e, a ridge least squares
over the tokens where e is among the K' largest full-precision logits (K' > K: the experts that
matter for the top-K decision, including its runners-up):

    min_w  sum_t in mask_e (h_q[t] . w + b_e - logit_fp[t, e])^2 + lam * ||w - w_fp||^2

which is closed form: (X^T X + lam I) w = X^T y + lam w_fp. The ridge toward the original weights
keeps logits off the mask (and experts with few masked tokens) where they were. Entries outside the
mask do not enter the loss: their exact values never change the top-K decision much, and fitting
them would spend the router's capacity on experts that are never chosen.
"""

from __future__ import annotations

from typing import Any

import torch

RIDGE = 0.05
"""lam as a fraction of the mean diagonal of X^T X (per expert)."""


def set_agreement(ids_a_TK: torch.Tensor, ids_b_TK: torch.Tensor) -> float:
    """Fraction of tokens whose top-K expert *sets* are equal."""
    a, b = ids_a_TK.sort(-1).values, ids_b_TK.sort(-1).values
    return float((a == b).all(-1).float().mean()) if a.numel() else 1.0


def shared_agreement(ids_a_TK: torch.Tensor, ids_b_TK: torch.Tensor) -> float:
    """Fraction of tokens whose top-K sets share at least one expert."""
    if not ids_a_TK.numel():
        return 1.0
    return float((ids_a_TK.unsqueeze(-1) == ids_b_TK.unsqueeze(-2)).flatten(1).any(-1).float().mean())


@torch.no_grad()
def fit_router(router, h_q_TD: torch.Tensor, h_fp_TD: torch.Tensor, mask_k: int,
               fp_ids_TK: torch.Tensor | None = None) -> dict[str, Any]:
    """Refit `router.weight` (and its bias, if any) in place; keeps the refit only if it raises
    top-K set agreement on these tokens. Returns agreement before/after and whether it was kept."""
    # Plan: 1. full-precision target logits and the top-K' mask; 2. per-expert ridge solve in float64;
    # 3. measure agreement with old and new weights, keep the better.
    W_ED = router.weight
    E, D = W_ED.shape
    mask_k = min(mask_k, E)
    tgt_TE = router(h_fp_TD).logits_TE.double()
    fp_ids = router(h_fp_TD).topk_ids_TK if fp_ids_TK is None else fp_ids_TK
    mask_TE = torch.zeros_like(tgt_TE, dtype=torch.bool).scatter_(1, tgt_TE.topk(mask_k, -1).indices, True)
    before = set_agreement(router(h_q_TD).topk_ids_TK, fp_ids)
    has_bias = router.bias is not None
    X = h_q_TD.double()
    if has_bias:
        X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    w0 = W_ED.double()
    if has_bias:
        w0 = torch.cat([w0, router.bias.double().unsqueeze(1)], 1)
    new = w0.clone()
    eye = torch.eye(X.shape[1], dtype=torch.float64)
    for e in range(E):
        Xe = X[mask_TE[:, e]]
        if Xe.shape[0] == 0:
            continue
        A = Xe.t() @ Xe
        lam = RIDGE * float(A.diagonal().mean().clamp(min=1e-12))
        new[e] = torch.linalg.solve(A + lam * eye, Xe.t() @ tgt_TE[mask_TE[:, e], e] + lam * w0[e])
    old_w = W_ED.detach().clone()
    old_b = None if not has_bias else router.bias.detach().clone()
    W_ED.copy_(new[:, :D].to(W_ED.dtype))
    if has_bias:
        router.bias.copy_(new[:, D].to(router.bias.dtype))
    after = set_agreement(router(h_q_TD).topk_ids_TK, fp_ids)
    accepted = after > before
    if not accepted:
        W_ED.copy_(old_w)
        if has_bias:
            router.bias.copy_(old_b)
    return {"agreement_after": after, "accepted": accepted, "mask_k": mask_k,
            "masked_tokens_per_expert": mask_TE.sum(0).tolist()}
