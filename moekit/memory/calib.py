"""Calibration statistics per expert: routing frequency, gate mass and REAP saliency.

Shape legend: T tokens, D model dim, K experts per token, E experts, N rows routed to one expert.

REAP saliency of expert e (Lasby et al. 2025, "REAP: router-weighted expert activation pruning"):
the mean, over the tokens routed to e, of gate weight x ||e's output||_2. Frequency only counts
how often e is picked; REAP also asks how much e moves the residual stream when it is.

The statistics come from a forward hook on each router (it sees the layer's input rows and the
routing decision), so MoELayer needs no change; each routed expert is then run once more on its
rows to measure its output norm (calibration cost ~2x the expert FLOPs, inference-only).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from moekit.errors import MoekitError


@dataclass
class ExpertStats:
    """Per-layer, per-expert calibration statistics (lists indexed [moe layer][expert])."""

    layers: list[int]
    """Block index of each MoE layer."""
    tokens: int = 0
    frequency: list[list[int]] = field(default_factory=list)
    """Assignments routed to each expert."""
    gate_mass: list[list[float]] = field(default_factory=list)
    """Sum of the combine weights given to each expert."""
    reap_sum: list[list[float]] = field(default_factory=list)
    """Sum over routed tokens of gate weight x output norm (REAP numerator)."""

    @property
    def reap(self) -> list[list[float]]:
        """REAP saliency: mean over routed tokens of gate weight x ||expert output|| (0 if never routed)."""
        return [[s / n if n else 0.0 for s, n in zip(rs, fs)] for rs, fs in zip(self.reap_sum, self.frequency)]

    def criterion(self, name: str) -> list[list[float]]:
        if name == "frequency":
            return [list(map(float, f)) for f in self.frequency]
        if name == "reap":
            return self.reap
        if name == "gate_mass":
            return self.gate_mass
        raise MoekitError(f"unknown criterion {name!r}; choose frequency, reap, gate_mass or random")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reap"] = self.reap
        return d


def _observe(stats: ExpertStats, li: int, layer, x_TD: torch.Tensor, r) -> None:
    ids_TK, w_TK = r.topk_ids_TK, r.topk_weights_TK.float()
    E = layer.experts.num_experts
    for e in range(E):
        tok, slot = torch.where(ids_TK == e)
        if tok.numel() == 0:
            continue
        w_N = w_TK[tok, slot]
        x_ND = x_TD[tok]
        if layer.cfg.weight_on_input:  # Llama 4: the weight scales the input, so measure that output
            y_ND = layer.experts.expert_forward(e, x_ND * w_N.to(x_ND.dtype).unsqueeze(-1)).float()
            contrib_N = y_ND.norm(dim=-1)
        else:
            y_ND = layer.experts.expert_forward(e, x_ND).float()
            contrib_N = w_N * y_ND.norm(dim=-1)
        stats.frequency[li][e] += int(tok.numel())
        stats.gate_mass[li][e] += float(w_N.sum())
        stats.reap_sum[li][e] += float(contrib_N.sum())


@torch.no_grad()
def calibrate(model, tokens: np.ndarray | torch.Tensor, *, seq_len: int = 256, batch_size: int = 8) -> ExpertStats:
    """Run `tokens` (1-D token ids) through `model` in windows and collect per-expert statistics."""
    # Plan: 1. hook every MoE layer's router; 2. forward the calibration windows; 3. unhook.
    from moekit.data import iter_eval_batches

    blocks = [i for i, b in enumerate(model.layers) if b.is_moe]
    if not blocks:
        raise MoekitError("the model has no MoE layers: nothing to calibrate or prune")
    moe = [model.layers[i].ffn for i in blocks]
    stats = ExpertStats(layers=blocks)
    for m in moe:
        E = m.experts.num_experts
        stats.frequency.append([0] * E)
        stats.gate_mass.append([0.0] * E)
        stats.reap_sum.append([0.0] * E)
    hooks = [m.router.register_forward_hook(lambda mod, args, out, li=li, m=m: _observe(stats, li, m, args[0], out))
             for li, m in enumerate(moe)]
    was_training = model.training
    model.eval()
    try:
        toks = np.asarray(tokens)
        seq_len = min(seq_len, model.config.max_seq_len)
        if len(toks) < 2:
            raise MoekitError("calibration needs at least 2 tokens; give more --calib-tokens or another --calib")
        for x_BS, _ in iter_eval_batches(toks, batch_size, seq_len):
            model(x_BS, return_routing_ids=False)
            stats.tokens += int(x_BS.numel())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return stats


def plot_stats(stats: ExpertStats, path, keep: list[list[int]] | None = None) -> None:
    """One row per MoE layer: frequency share, gate mass share and REAP saliency per expert
    (kept experts in blue, pruned in grey)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(stats.layers)
    fig, axes = plt.subplots(L, 3, figsize=(12, 2.2 * L + 0.6), squeeze=False)
    rows = [("frequency share", [np.array(f, float) / max(sum(f), 1) for f in stats.frequency]),
            ("gate mass share", [np.array(g) / max(sum(g), 1e-30) for g in stats.gate_mass]),
            ("REAP saliency", [np.array(r) for r in stats.reap])]
    for li in range(L):
        for c, (title, vals) in enumerate(rows):
            v = vals[li]
            colors = ["tab:blue" if keep is None or e in keep[li] else "0.75" for e in range(len(v))]
            ax = axes[li][c]
            ax.bar(range(len(v)), v, color=colors)
            ax.set_title(f"layer {stats.layers[li]}: {title}", fontsize=9)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
