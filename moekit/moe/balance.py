"""Load-balancing losses and aux-loss-free bias balancing, all as pure functions of values.

Shape legend: T tokens, E experts, K experts per token, B sequences, S tokens per sequence.

Nothing here keeps state: losses are returned to the caller (and up through `Routing` /
`ModelOutput`), and the bias update is a function the trainer calls after its optimizer step.
"""

from __future__ import annotations

import torch


def switch_aux_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss  E * sum_e f_e * P_e.

    f_e = (assignments to e) / T (summed over the K slots, as transformers'
    `load_balancing_loss_func` does, so a perfectly balanced top-k router scores K), and
    P_e = mean router probability of e. Only P carries gradient: f comes from a hard top-k.
    """
    T, E = probs_TE.shape
    counts_E = torch.zeros(E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, topk_ids_TK.reshape(-1), torch.ones_like(topk_ids_TK.reshape(-1), dtype=probs_TE.dtype))
    f_E = counts_E / T
    P_E = probs_TE.mean(0)
    return E * (f_E * P_E).sum()


def seq_aux_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor, batch: int) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), averaged over the B sequences.

    Per sequence: f_e = E / (K * S) * count_e, P_e = mean over the sequence of normalised scores,
    loss = sum_e f_e P_e (balanced = 1). Tokens are laid out [B, S] flattened to T = B * S.
    """
    T, E = probs_TE.shape
    K = topk_ids_TK.shape[1]
    S = T // batch
    ids_BSK = topk_ids_TK.reshape(batch, S * K)
    counts_BE = torch.zeros(batch, E, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_BE.scatter_add_(1, ids_BSK, torch.ones_like(ids_BSK, dtype=probs_TE.dtype))
    f_BE = counts_BE * (E / (K * S))
    P_BE = probs_TE.reshape(batch, S, E).mean(1)
    return (f_BE * P_BE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps logits small."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy (nats) of the router distribution; log(E) = uniform, 0 = one-hot."""
    p = probs_TE.float().clamp_min(1e-12)
    return -(p * p.log()).sum(-1).mean()


def bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Aux-loss-free balancing step (DeepSeek-V3): b_e += rate * sign(mean_load - load_e).

    Overloaded experts get their selection bias lowered, starved ones raised. `load_E` is the
    number of tokens routed to each expert since the last update (summed over micro-batches).
    Returns the new bias; updates in place too so module buffers follow.
    """
    load = load_E.float()
    err = load.mean() - load
    bias_E.add_(rate * torch.sign(err).to(bias_E.dtype))
    return bias_E


def load_imbalance(load_E: torch.Tensor) -> tuple[float, float]:
    """(max/mean, coefficient of variation) of per-expert load; (1, 0) is perfect balance."""
    load = load_E.float()
    mean = load.mean().clamp_min(1e-12)
    return float(load.max() / mean), float(load.std(unbiased=False) / mean)
