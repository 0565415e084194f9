"""Per-row sampling for a continuous batch: every row has its own temperature, top-k, top-p,
penalties and seeded generator (the engine's `sample` takes one setting for the whole batch).

Shape legend: R rows being sampled this step, V vocabulary.
A seeded row draws by the exponential race (argmax of p / q with q ~ Exp(1) from the row's own
generator), so its tokens depend only on its seed and its logits, never on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowParams:
    temperature: float
    top_p: float
    top_k: int
    presence_penalty: float
    frequency_penalty: float
    logprobs: int | None
    generator: torch.Generator | None


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float] | None
    """log p(token) under the model's raw distribution, per row (when any row asked)."""
    top: list[list[tuple[int, float]]] | None
    """Per row, its `logprobs` most likely (id, logprob) pairs."""


def sample_rows(logits_RV: torch.Tensor, rows: list[RowParams], counts_RV: torch.Tensor | None) -> Sampled:
    # Plan: 1. raw logprobs if asked; 2. penalties on generated-token counts; 3. greedy rows by
    # argmax; 4. the rest: temperature, per-row top-k/top-p masks, exponential race.
    logits_RV = logits_RV.float()
    R, V = logits_RV.shape
    want_lp = any(r.logprobs is not None for r in rows)
    lp_out = top_out = None
    if want_lp:
        lp_RV = torch.log_softmax(logits_RV, -1)
    if counts_RV is not None:
        freq_R1 = torch.tensor([r.frequency_penalty for r in rows]).view(R, 1)
        pres_R1 = torch.tensor([r.presence_penalty for r in rows]).view(R, 1)
        c = counts_RV.float()
        logits_RV = logits_RV - freq_R1 * c - pres_R1 * (c > 0).float()
    tokens_R = logits_RV.argmax(-1)
    hot = [i for i, r in enumerate(rows) if r.temperature > 0]
    if hot:
        sub_HV = logits_RV[hot] / torch.tensor([rows[i].temperature for i in hot]).view(-1, 1)
        sub_HV = _filter(sub_HV, [rows[i].top_k for i in hot], [rows[i].top_p for i in hot])
        probs_HV = sub_HV.softmax(-1)
        q_HV = torch.empty_like(probs_HV)
        for j, i in enumerate(hot):
            q_HV[j].exponential_(generator=rows[i].generator)
        tokens_R[hot] = (probs_HV / q_HV).argmax(-1)
    tokens = tokens_R.tolist()
    if want_lp:
        lp_out = lp_RV.gather(1, tokens_R.view(R, 1)).view(R).tolist()
        k = max(r.logprobs or 0 for r in rows)
        top_out = [[] for _ in rows]
        if k:
            vals_RK, ids_RK = lp_RV.topk(min(k, V), dim=-1)
            vals, ids = vals_RK.tolist(), ids_RK.tolist()
            for i, r in enumerate(rows):
                n = r.logprobs or 0
                top_out[i] = list(zip(ids[i][:n], vals[i][:n]))
    return Sampled(tokens, lp_out, top_out)


def _filter(logits_HV: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """-inf outside each row's top-k and nucleus (the most likely token always survives)."""
    H, V = logits_HV.shape
    if all(k <= 0 or k >= V for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits_HV
    sorted_HV, idx_HV = torch.sort(logits_HV, dim=-1, descending=True)
    rank_V = torch.arange(V)
    k_H1 = torch.tensor([k if 0 < k < V else V for k in top_k]).view(H, 1)
    drop_HV = rank_V.view(1, V) >= k_H1
    p_H1 = torch.tensor(top_p).view(H, 1)
    probs_HV = sorted_HV.softmax(-1)
    drop_HV |= (probs_HV.cumsum(-1) - probs_HV) >= p_H1  # mass before this token already >= p
    drop_HV[:, 0] = False
    return logits_HV.masked_fill(drop_HV.scatter(-1, idx_HV, drop_HV), float("-inf"))
