"""The MoE layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.moe import backends, balance, cost
from moekit.moe.dispatch import Dispatcher
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.router import Router


@dataclass(frozen=True)
class Routing:
    """What one MoE layer decided on one forward: returned as a value, never stored globally."""

    tokens_per_expert: torch.Tensor
    """[E] int64: assignments routed to each expert (before capacity drops)."""
    dropped: torch.Tensor
    """int64 scalar: assignments dropped for lack of capacity (0 when dropless)."""
    entropy: torch.Tensor
    """float32 scalar: mean per-token router entropy in nats."""
    aux_loss: torch.Tensor
    """Unweighted balance loss (Switch-style, or sequence-wise when configured)."""
    z_loss: torch.Tensor
    """Unweighted router z-loss."""
    expert_ids: torch.Tensor | None = None
    """[T, K] chosen experts, only when requested (telemetry, analysis)."""
    weights: torch.Tensor | None = None
    """[T, K] combine weights, only when requested."""
    cost_loss: torch.Tensor | None = None
    """Unweighted expected-cost penalty (with cost-aware routing configured; see moekit.moe.cost)."""

    @property
    def num_experts(self) -> int:
        return self.tokens_per_expert.numel()


class MoELayer(nn.Module):
    """Sparse MoE feed-forward block."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_dim, cfg.expert_act, bias=cfg.expert_bias,
                                      alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, widths=cfg.expert_dims)
        self.dispatcher = Dispatcher(cfg)
        self.shared = DenseFFN(dim, cfg.shared_expert_dim, cfg.expert_act) if cfg.num_shared_experts else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if (self.shared is not None and cfg.shared_expert_gate) else None
        self.use_reference = False
        """Run the per-expert loop instead of dispatch (tests / debugging); same as backend="reference"."""
        self.backend: str | None = None
        """Force an expert-execution backend by name (`moekit.moe.backends`); None chooses per call."""
        self.flops_E = cost.expert_flops(cfg, dim)
        """FLOPs of one token through each expert (real widths): `moekit.moe.cost.spent_flops`."""
        self.loss_stats = True
        """Compute balance/z losses and entropy per forward; generation turns this off (they cost
        ~0.2 ms per layer per decode step) and gets zeros in `Routing` instead."""
        self.hyper: tuple | None = None
        """HyperMoE: (the model's shared `HyperNetwork`, this layer's slot), set by the model. A plain
        reference, not a submodule, so the shared weights are stored and counted once."""

    def forward(self, x_BSD: torch.Tensor, return_ids: bool = False) -> tuple[torch.Tensor, Routing]:
        # Plan:
        # 1. route all tokens (float32) -> top-k ids and weights;
        # 2. the expert backend chosen for this call (device, dtype, ISA tier, grad mode; see
        #    moekit.moe.backends) dispatches rows by expert, runs the experts and combines;
        # 3. add the shared expert; 4. compute balance losses and statistics as values.
        shape = x_BSD.shape
        x_TD = x_BSD.reshape(-1, shape[-1])
        r = self.router(x_TD)
        out_TD, dropped = backends.run(backends.ExpertCall(self, x_TD, r.topk_ids_TK, r.topk_weights_TK,
                                                           mask_TK=r.mask_TK))
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            out_TD = out_TD + s_TD
        if self.hyper is not None:  # the HyperExpert generated from the unselected experts
            hypernet, slot = self.hyper
            out_TD = out_TD + hypernet(x_TD, r.topk_ids_TK, slot)
        routing = self._routing(r, shape[0] if len(shape) == 3 else 1, dropped, return_ids)
        return out_TD.view(shape), routing

    def _routing(self, r, batch: int, dropped: torch.Tensor, return_ids: bool) -> Routing:
        cfg = self.cfg
        ids = r.topk_ids_TK
        used = ids.reshape(-1) if r.mask_TK is None else ids[r.mask_TK]  # dynamic-k: unused slots don't count
        tokens_per_expert = torch.bincount(used, minlength=cfg.num_experts)
        # Cheap (O(T*E)) next to the experts, so always computed: eval telemetry sees real values.
        if not self.loss_stats:
            aux = z = entropy = torch.zeros((), device=ids.device)
        elif cfg.seq_aux_loss:
            aux = balance.seq_aux_loss(r.probs_TE, ids, batch)
        else:
            aux = balance.switch_aux_loss(r.probs_TE, ids)
        if self.loss_stats:
            z = balance.z_loss(r.logits_TE)
            with torch.no_grad():
                entropy = balance.router_entropy(r.probs_TE)
        return Routing(
            tokens_per_expert=tokens_per_expert,
            dropped=dropped,
            entropy=entropy,
            aux_loss=aux,
            z_loss=z,
            expert_ids=ids if return_ids else None,
            weights=r.topk_weights_TK.detach() if return_ids else None,
            cost_loss=r.cost_loss,
        )

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step; call after the optimizer step with the summed load."""
        if self.router.score_bias is None or not self.cfg.bias_update_rate:
            return
        balance.bias_update(self.router.score_bias, load_E.to(self.router.score_bias.device), self.cfg.bias_update_rate)


def pack_experts(model: nn.Module) -> int:
    """Pack the expert weights of every MoE layer in `model` for the CPU outer-product kernel
    (`GroupedExperts.pack`); returns the bytes added. CPU inference then runs each layer's
    experts in one outer-product kernel call at any batch size. Re-run after changing weights."""
    return sum(m.pack() for m in model.modules() if isinstance(m, GroupedExperts))
