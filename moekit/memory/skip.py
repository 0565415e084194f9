"""Dynamic expert skipping at inference: NAEE-style and PESF-style, run by the `skip` backend.

Shape legend: T tokens, K experts per token, E experts, A = T*K assignments, S rows kept, B batch
rows, L sequence length (T = B*L).

- NAEE (Lu et al. 2024, "Not all experts are equal"): per token, drop a non-top assignment when
  its weight is below beta x the token's top weight. Any pass (prefill and decode).
- PESF (EAC-MoE's pruning by sequence frequency): prefill only (L > 1): within each sequence, skip
  the experts picked fewer than alpha x the uniform share L*K/E times.
A token's top-weight assignment is never skipped, so every token keeps at least one expert.

Renormalisation: the kept weights are rescaled to the token's original weight sum only when the
config says routed weights are normalised (`norm_topk_prob`, or the `topk_softmax` router, whose
weights are a softmax over the chosen k); otherwise the skipped weights are simply dropped.

How it runs: `set_skipping` stores a `SkipPolicy` on each MoE layer (`layer.skip`) plus a forward
pre-hook that records the batch size (PESF needs the sequence boundaries); the `skip` backend,
registered ahead of the built-in ones, applies whenever a layer has an active policy: it drops the
skipped assignments *before* dispatch (the experts really do less work) and hands the remaining
rows to the experts module (`forward_combine` of GroupedExperts on CPU, else experts + combine).
MoELayer itself is unchanged. Counted: assignments seen and skipped, so expert FLOPs saved =
skipped / total (every assignment of a layer costs the same FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moekit.errors import MoekitError
from moekit.moe import backends
from moekit.moe.dispatch import Dispatched
from moekit.moe.experts import GroupedExperts


@dataclass
class SkipPolicy:
    beta: float = 0.0
    """NAEE threshold (0 = off): drop weights below beta x the token's top weight."""
    alpha: float = 0.0
    """PESF threshold (0 = off): in prefill, skip experts with fewer than alpha x L*K/E picks in a sequence."""
    renormalize: bool = False
    assignments: int = 0
    skipped: int = 0
    skipped_prefill: int = 0
    assignments_prefill: int = 0
    batch: int = field(default=1, repr=False)

    @property
    def active(self) -> bool:
        return self.beta > 0 or self.alpha > 0

    def keep_mask(self, ids_TK: torch.Tensor, w_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
        """[T, K] bool: assignments that run."""
        T, K = ids_TK.shape
        top_TK = torch.zeros_like(ids_TK, dtype=torch.bool)
        top_TK.scatter_(1, w_TK.argmax(-1, keepdim=True), True)
        keep_TK = torch.ones_like(top_TK)
        if self.beta > 0:
            keep_TK &= w_TK >= self.beta * w_TK.amax(-1, keepdim=True)
        B = self.batch if self.batch and T % self.batch == 0 else 1
        L = T // B
        if self.alpha > 0 and L > 1:
            ids_BLK = ids_TK.view(B, L * K)
            count_BE = torch.zeros(B, num_experts, dtype=torch.int64, device=ids_TK.device)
            count_BE.scatter_add_(1, ids_BLK, torch.ones_like(ids_BLK))
            share = L * K / num_experts
            rare_BE = count_BE.float() < self.alpha * share
            keep_TK &= ~rare_BE.gather(1, ids_BLK).view(T, K)
        return keep_TK | top_TK


class SkipBackend(backends.ExpertBackend):
    """Runs only the assignments the layer's `SkipPolicy` keeps (inference only)."""

    name = "skip"

    def why_not(self, call):
        p = getattr(call.layer, "skip", None)
        if p is None or not p.active:
            return "no active skip policy on this layer (moekit.memory.set_skipping)"
        if not call.local:
            return "the dispatcher is not local (expert parallel)"
        if call.cfg.capacity_factor is not None:
            return "capacity-factor dispatch"
        if torch.is_grad_enabled() and (call.x_TD.requires_grad or call.topk_weights_TK.requires_grad):
            return "autograd is recording (skipping is inference-only)"
        return None

    def run(self, call):
        # Plan: 1. keep mask from the policy; 2. optional renormalisation; 3. dispatch only the kept
        # assignments (sorted by expert); 4. experts + weighted combine over the kept rows.
        p: SkipPolicy = call.layer.skip
        ids_TK, w_TK, x_TD = call.topk_ids_TK, call.topk_weights_TK.float(), call.x_TD
        T, K = ids_TK.shape
        E = call.experts.num_experts
        keep_TK = p.keep_mask(ids_TK, w_TK, E)
        if call.mask_TK is not None:  # dynamic-k routing: unused slots never run (weight 0, so not the top)
            keep_TK &= call.mask_TK
        if p.renormalize:
            kept_TK = w_TK * keep_TK
            w_TK = kept_TK * (w_TK.sum(-1, keepdim=True) / kept_TK.sum(-1, keepdim=True).clamp_min(1e-30))
        n_skip = int((~keep_TK).sum())
        if call.mask_TK is not None:  # unused dynamic-k slots were never going to run: not a skip
            n_skip -= int((~call.mask_TK).sum())
        p.assignments += T * K
        p.skipped += n_skip
        if T // max(p.batch, 1) > 1:
            p.assignments_prefill += T * K
            p.skipped_prefill += n_skip
        ids_A, w_A, keep_A = ids_TK.reshape(-1), w_TK.reshape(-1), keep_TK.reshape(-1)
        order_A = torch.argsort(ids_A, stable=True)
        rows_S = order_A[keep_A[order_A]]
        counts_E = torch.bincount(ids_A[keep_A], minlength=E)
        weights_S = w_A[rows_S]
        x_SD = x_TD[rows_S // K]
        zero = torch.zeros((), dtype=torch.int64, device=x_TD.device)
        ex = call.experts
        if call.cfg.weight_on_input:
            x_SD = x_SD * weights_S.to(x_SD.dtype).unsqueeze(-1)
            d = Dispatched(x_SD, counts_E, rows_S, weights_S, T, K, zero, True)
            return call.layer.dispatcher.combine(ex(x_SD, counts_E), d), zero
        if isinstance(ex, GroupedExperts) and x_TD.is_cpu:
            return ex.forward_combine(x_SD, counts_E, rows_S, weights_S, T, K).to(x_TD.dtype), zero
        d = Dispatched(x_SD, counts_E, rows_S, weights_S, T, K, zero)
        return call.layer.dispatcher.combine(ex(x_SD, counts_E), d), zero


backends.register(SkipBackend(), 1000)


def _record_batch(layer, args):
    layer.skip.batch = args[0].shape[0] if args[0].dim() == 3 else 1


def set_skipping(model, beta: float = 0.0, alpha: float = 0.0, renormalize: bool | None = None) -> int:
    """Enable NAEE (beta) and/or PESF (alpha) skipping on every MoE layer; 0/0 turns it off.
    Returns the number of layers. Counters restart (see `skip_stats`)."""
    if not 0 <= beta <= 1:
        raise MoekitError(f"skip beta must be in [0, 1] (a fraction of the top weight), got {beta}")
    if alpha < 0:
        raise MoekitError(f"skip alpha must be >= 0 (a fraction of the uniform share), got {alpha}")
    clear_skipping(model)
    layers = model.moe_layers()
    if not (beta or alpha):
        return len(layers)
    for layer in layers:
        if layer.cfg.capacity_factor is not None:
            raise MoekitError("skipping needs dropless routing (moe.capacity_factor = null)")
        renorm = renormalize if renormalize is not None else (layer.cfg.norm_topk_prob or layer.cfg.router == "topk_softmax")
        layer.skip = SkipPolicy(beta=beta, alpha=alpha, renormalize=renorm)
        layer._skip_hook = layer.register_forward_pre_hook(_record_batch)
    return len(layers)


def clear_skipping(model) -> None:
    for layer in model.moe_layers():
        h = getattr(layer, "_skip_hook", None)
        if h is not None:
            h.remove()
        layer._skip_hook = None
        layer.skip = None


def skip_stats(model) -> dict:
    """Assignments seen/skipped over all MoE layers since `set_skipping`; `flops_saved` is the share
    of routed-expert FLOPs skipped (prefill alone in `flops_saved_prefill`)."""
    ps = [p for layer in model.moe_layers() if (p := getattr(layer, "skip", None)) is not None]
    a = sum(p.assignments for p in ps)
    s = sum(p.skipped for p in ps)
    ap = sum(p.assignments_prefill for p in ps)
    sp = sum(p.skipped_prefill for p in ps)
    return {"assignments": a, "skipped": s, "flops_saved": s / a if a else 0.0,
            "assignments_prefill": ap, "skipped_prefill": sp, "flops_saved_prefill": sp / ap if ap else 0.0}
