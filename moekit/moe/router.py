"""Routers: token -> (top-k expert ids, weights) plus what balancing and telemetry need.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups.

All scoring math runs in float32 whatever the model dtype: softmax/sigmoid over bf16 logits loses
enough precision that near-ties flip, which changes *which* experts run (a discrete decision that
no later upcast can repair) and makes the aux losses noisy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.utils import Fp32Buffers


@dataclass(frozen=True)
class RouterOutput:
    topk_ids_TK: torch.Tensor
    """Chosen experts, int64."""
    topk_weights_TK: torch.Tensor
    """Combine weights (float32), after renormalisation and scaling."""
    logits_TE: torch.Tensor
    """Raw router logits in float32 (for z-loss)."""
    probs_TE: torch.Tensor
    """Normalised score distribution per token (softmax, or sigmoid scores / their sum), float32;
    used for the balance loss and router entropy."""


class Router(Fp32Buffers):
    """Linear gate plus the configured scoring rule. Parameters: `weight` [E, D] (+ optional bias,
    noise weight); buffer `score_bias` [E] for aux-loss-free balancing (selection only), kept
    float32 under model.to(bfloat16): it accumulates many tiny +-gamma steps that bf16 would round
    away, and it decides which experts run."""

    _fp32_buffers = ("score_bias",)

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.weight = nn.Parameter(torch.empty(E, dim))
        self.bias = nn.Parameter(torch.zeros(E)) if cfg.router_bias else None
        # Shazeer 2017: a second linear map gives a per-token, per-expert noise std (softplus).
        self.noise_weight = nn.Parameter(torch.zeros(E, dim)) if cfg.noisy_gating else None
        if cfg.score_correction_bias:
            # fp32 buffer: it accumulates many tiny +-gamma steps, which bf16 would round away.
            self.register_buffer("score_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.score_bias = None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        if self.training and cfg.jitter_eps > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
            x_TD = x_TD * noise
        # Routing math in float32 (see module docstring).
        logits_TE = F.linear(x_TD.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        if self.training and self.noise_weight is not None:
            std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
        return route(logits_TE, cfg, self.score_bias)


def _group_mask(sel_TE: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Keep only experts in the best `topk_group` groups; others get -inf for selection."""
    T, E = sel_TE.shape
    G = cfg.n_group
    grouped_TGe = sel_TE.view(T, G, E // G)
    if cfg.group_score == "top2_sum":
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
    else:
        group_TG = grouped_TGe.amax(dim=-1)
    keep_idx = group_TG.topk(cfg.topk_group, dim=-1).indices
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_idx, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
    return sel_TE.masked_fill(~keep_TE, float("-inf"))


def route(logits_TE: torch.Tensor, cfg: MoEConfig, score_bias_E: torch.Tensor | None = None) -> RouterOutput:
    """Pure routing rule from float32 logits; shared by the layer, tests and analysis tools."""
    logits_TE = logits_TE.float()
    K = cfg.top_k
    if cfg.router == "topk_softmax":
        # Mixtral: choose on raw logits, then softmax over only the chosen k.
        probs_TE = logits_TE.softmax(-1)
        sel_TE = logits_TE if score_bias_E is None else logits_TE + score_bias_E
        if cfg.n_group > 1:
            sel_TE = _group_mask(sel_TE, cfg)
        ids_TK = sel_TE.topk(K, dim=-1).indices
        weights_TK = logits_TE.gather(1, ids_TK).softmax(-1)
    elif cfg.router in ("softmax_topk", "soft"):
        probs_TE = logits_TE.softmax(-1)
        if cfg.router == "soft":
            ids_TK = torch.arange(cfg.num_experts, device=logits_TE.device).expand(logits_TE.shape[0], -1)
            weights_TK = probs_TE
        else:
            sel_TE = probs_TE if score_bias_E is None else probs_TE + score_bias_E
            if cfg.n_group > 1:
                sel_TE = _group_mask(sel_TE, cfg)
            ids_TK = sel_TE.topk(K, dim=-1).indices
            weights_TK = probs_TE.gather(1, ids_TK)
            if cfg.norm_topk_prob:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    else:  # sigmoid_topk (DeepSeek-V3, Llama 4)
        scores_TE = logits_TE.sigmoid()
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        # The correction bias only steers *which* experts are picked; weights use raw scores.
        sel_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E
        if cfg.n_group > 1:
            sel_TE = _group_mask(sel_TE, cfg)
        ids_TK = sel_TE.topk(K, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * cfg.routed_scaling_factor
    return RouterOutput(ids_TK, weights_TK, logits_TE, probs_TE)
