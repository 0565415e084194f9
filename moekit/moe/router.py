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
from moekit.moe.cost import CostPlan, resolve, select_variable
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
    mask_TK: torch.Tensor | None = None
    """Dynamic-k / budget routing: which slots run (bool); unused slots have weight 0. None: all."""
    cost_loss: torch.Tensor | None = None
    """Expected normalised expert cost under probs_TE (with a cost plan; see moekit.moe.cost)."""


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
        self.cost_override = None
        """Inference-time cost-routing settings (`moekit.moe.cost.set_routing_cost`); None: the config's."""
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
        return route(logits_TE, cfg, self.score_bias, resolve(self, logits_TE.device))


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


def route(logits_TE: torch.Tensor, cfg: MoEConfig, score_bias_E: torch.Tensor | None = None,
          plan: CostPlan | None = None) -> RouterOutput:
    """Pure routing rule from float32 logits; shared by the layer, tests and analysis tools.

    `plan` (`moekit.moe.cost`): cost-aware selection, dynamic-k / budgets, a top-k override and the
    expected-cost penalty. None (or lambda 0 without dynamic-k or budget) runs the plain top-k ops."""
    # Plan: 1. scores (what weights come from) and the selection score (+ bias, - lambda * cost,
    # group mask); 2. choose ids (top-k, or variable-k with a mask); 3. weights from the unpenalised
    # scores of the chosen ids (unused slots get 0).
    logits_TE = logits_TE.float()
    K = cfg.top_k if plan is None else plan.top_k
    if cfg.router == "soft":
        probs_TE = logits_TE.softmax(-1)
        ids_TK = torch.arange(cfg.num_experts, device=logits_TE.device).expand(logits_TE.shape[0], -1)
        weights_TK = probs_TE
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return RouterOutput(ids_TK, weights_TK, logits_TE, probs_TE)
    if cfg.router == "topk_softmax":
        # Mixtral: choose on raw logits, then softmax over only the chosen k.
        probs_TE = logits_TE.softmax(-1)
        base_TE = logits_TE
    elif cfg.router == "softmax_topk":
        probs_TE = logits_TE.softmax(-1)
        base_TE = probs_TE
    else:  # sigmoid_topk (DeepSeek-V3, Llama 4)
        base_TE = logits_TE.sigmoid()
        probs_TE = base_TE / base_TE.sum(-1, keepdim=True)
    # The correction bias and the cost penalty only steer *which* experts are picked.
    sel_TE = base_TE if score_bias_E is None else base_TE + score_bias_E
    if plan is not None and plan.lam:
        sel_TE = sel_TE - plan.lam * plan.cost_E
    if cfg.n_group > 1:
        sel_TE = _group_mask(sel_TE, cfg)
    mask_TK = None
    if plan is not None and plan.variable:
        ids_TK, mask_TK = select_variable(sel_TE, probs_TE, plan)
    else:
        ids_TK = sel_TE.topk(K, dim=-1).indices
    weights_TK = base_TE.gather(1, ids_TK)
    if cfg.router == "topk_softmax":
        if mask_TK is not None:
            weights_TK = weights_TK.masked_fill(~mask_TK, float("-inf"))
        weights_TK = weights_TK.softmax(-1)
    else:
        if mask_TK is not None:
            weights_TK = weights_TK * mask_TK
        if cfg.norm_topk_prob and cfg.router == "softmax_topk":
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        elif cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    if cfg.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * cfg.routed_scaling_factor
    cost_loss = None if plan is None else (probs_TE * plan.cost_E).sum(-1).mean()
    return RouterOutput(ids_TK, weights_TK, logits_TE, probs_TE, mask_TK, cost_loss)
