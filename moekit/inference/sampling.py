"""Token sampling on the model's device: greedy, temperature, top-k, top-p, repetition penalty.

Shape legend: B batch rows, V vocabulary.
Everything stays on device (no `.item()`), so a decode step never waits on the host for sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError


class SamplingError(MoekitError):
    """Invalid sampling parameters."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters;
    repetition_penalty 1.0 disables it (HF/CTRL convention: positive logits of already-seen tokens
    are divided by it, negative ones multiplied).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (got {self.top_k}); use 0 to disable")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1] (got {self.top_p}); use 1.0 to disable")
        if self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (got {self.repetition_penalty}); use 1.0 to disable")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise tokens marked in the boolean `seen_BV` (prompt + generated so far)."""
    if penalty == 1.0:
        return logits_BV
    penalised = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised, logits_BV)


def filter_top_k_top_p(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf (the most likely token always survives)."""
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, idx_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(-1).cumsum(-1)
        # Drop a token when the mass *before* it already reaches top_p: keeps the first token.
        drop_sorted_BV = (cum_BV - sorted_BV.softmax(-1)) >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, idx_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def sample(logits_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           seen_BV: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row, int64 [B], computed in float32 on the logits' device."""
    logits_BV = logits_BV.float()
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if params.greedy:
        return logits_BV.argmax(-1)
    logits_BV = filter_top_k_top_p(logits_BV / params.temperature, params.top_k, params.top_p)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)
