"""Whole-expert pruning: remove the least salient experts of every MoE layer, and `moekit prune`.

Shape legend: E experts before pruning, N experts kept, D model dim, H = 2F fused gate/up rows.

What is removed per pruned expert: its slices of the stacked weights (w13 [E, H, D], w2 [E, D, F]),
its router row (weight, optional bias and noise weight) and its entry of the score-correction bias.
The result is an ordinary moekit model with `moe.num_experts = N`: it saves, loads, evaluates,
quantizes and benchmarks like any other. Routing over the kept experts equals the original routing
with the pruned experts' logits set to -inf (tested).

`--per-layer-budget` keeps the same total (N x layers) but lets the counts differ: every layer keeps
at least top_k, and the rest of the budget goes to the experts with the largest share of their own
layer's total saliency, so the pruning minimises the summed share of saliency removed. A layer whose
saliency is spread evenly over its experts keeps more of them than one where a few experts carry it
and the tail is near zero. The counts land in `ModelConfig.moe_layer_experts`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch

from moekit.errors import MoekitError
from moekit.memory.calib import ExpertStats, calibrate, plot_stats

Criterion = Literal["frequency", "reap", "random", "gate_mass"]
_ROUTER_ROWS = ("router.weight", "router.bias", "router.noise_weight", "router.score_bias")
_EXPERT_ROWS = ("experts.w13", "experts.w2")


def num_to_keep(num_experts: int, top_k: int, keep: int | None, keep_frac: float | None) -> int:
    """Experts kept per layer from --keep / --keep-frac, checked against top_k."""
    if (keep is None) == (keep_frac is None):
        raise MoekitError("give exactly one of --keep N or --keep-frac F")
    if keep_frac is not None:
        if not 0 < keep_frac <= 1:
            raise MoekitError(f"--keep-frac must be in (0, 1], got {keep_frac}")
        keep = max(1, round(keep_frac * num_experts))
    assert keep is not None
    if not top_k <= keep <= num_experts:
        raise MoekitError(f"cannot keep {keep} experts: the model routes each token to top_k={top_k} of "
                          f"{num_experts}; keep between {top_k} and {num_experts}")
    return keep


def choose_experts(stats: ExpertStats | None, keep: int, criterion: str, num_experts: int, n_layers: int,
                   seed: int = 0) -> list[list[int]]:
    """Sorted ids of the experts to keep per MoE layer: the `keep` highest by `criterion`
    (ties broken by lower id), or a seeded random choice."""
    if criterion == "random":
        g = torch.Generator().manual_seed(seed)
        return [sorted(torch.randperm(num_experts, generator=g)[:keep].tolist()) for _ in range(n_layers)]
    if stats is None:
        raise MoekitError(f"criterion {criterion!r} needs calibration statistics (--calib)")
    out = []
    for scores in stats.criterion(criterion):
        order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
        out.append(sorted(order[:keep]))
    return out


def allocate_experts(stats: ExpertStats, keep: int, criterion: str, top_k: int) -> list[list[int]]:
    """Per-layer budget: sorted ids kept per MoE layer, `keep` x layers in total, at least top_k per
    layer, the rest by the largest share of the layer's summed `criterion` score (greedy, which is
    optimal for the summed share removed: within a layer the shares are taken in descending order)."""
    per = stats.criterion(criterion)
    kept, cand = [], []
    for li, sc in enumerate(per):
        order = sorted(range(len(sc)), key=lambda e: (-sc[e], e))
        if keep > len(sc):
            raise MoekitError(f"cannot keep {keep} experts per layer on average: layer {li} has {len(sc)}")
        tot = float(sum(sc)) or 1.0
        kept.append(order[:top_k])
        cand += [(sc[e] / tot, r, li, e) for r, e in enumerate(order[top_k:])]
    # Equal shares go round-robin (lower rank within its layer first), not all to the first layer.
    cand.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
    for _, _, li, e in cand[: (keep - top_k) * len(per)]:
        kept[li].append(e)
    return [sorted(k) for k in kept]


@torch.no_grad()
def prune_model(model, keep: list[list[int]]):
    """A new model keeping, in MoE layer i (in order), only the experts `keep[i]`; when the counts
    differ they go to `config.moe_layer_experts` (moe.num_experts becomes the largest)."""
    # Plan: 1. check the request; 2. config with the new expert count; 3. slice the state dict
    # (expert stacks, router rows, correction bias); 4. load it into a model built on meta.
    from moekit.model.transformer import Transformer
    from moekit.checkpoint.native import materialize_buffers

    cfg = model.config
    blocks = [i for i, b in enumerate(model.layers) if b.is_moe]
    if len(keep) != len(blocks):
        raise MoekitError(f"keep lists for {len(keep)} MoE layers, the model has {len(blocks)}")
    counts = [len(k) for k in keep]
    Es = cfg.experts_per_layer()
    for k, E in zip(keep, Es):
        if len(set(k)) != len(k) or not all(0 <= e < E for e in k):
            raise MoekitError(f"bad expert ids {k}: need distinct ids in [0, {E})")
    n, uniform = max(counts), len(set(counts)) == 1
    changed = any(c != E for c, E in zip(counts, Es))
    if cfg.moe.n_group > 1 and changed:
        raise MoekitError(f"group-limited routing (n_group={cfg.moe.n_group}) ties experts to groups; "
                          "pruning such models is not supported")
    if (cfg.moe.expert_dims or cfg.moe.cost_vector) and changed:
        raise MoekitError("the config holds one width/cost per expert (moe.expert_dims / moe.cost_vector), shared by "
                          "every layer; pruning such models is not supported")
    if cfg.moe.router == "soft" and not uniform:
        raise MoekitError("a soft router runs every expert (top_k = num_experts): keep the same count in every layer")
    if cfg.moe.router == "soft":
        moe_cfg = cfg.moe.__class__(**{**cfg.moe.__dict__, "num_experts": n, "top_k": n})
    else:
        moe_cfg = cfg.moe.__class__(**{**cfg.moe.__dict__, "num_experts": n})
    new_cfg = cfg.replace(moe=moe_cfg, moe_layer_experts=[] if uniform else counts)
    sd = model.state_dict()
    for li, b in enumerate(blocks):
        idx = torch.tensor(keep[li], dtype=torch.int64)
        for suffix in _ROUTER_ROWS + _EXPERT_ROWS:
            key = f"layers.{b}.ffn.{suffix}"
            if key in sd:
                sd[key] = sd[key].index_select(0, idx.to(sd[key].device)).contiguous()
    with torch.device("meta"):
        new = Transformer(new_cfg)
    new.load_state_dict(sd, strict=True, assign=True)
    materialize_buffers(new)
    return new.to(model.device).train(model.training)


def prune_cli(model: str, out: Path, keep: int | None = None, keep_frac: float | None = None,
              criterion: Literal["frequency", "reap", "random", "gate_mass"] = "reap", calib: str | None = None,
              calib_split: str = "train", calib_tokens: int = 65536, seq_len: int = 256,
              per_layer_budget: bool = False, seed: int = 0, threads: int = 0) -> int:
    """Prune whole experts from every MoE layer by measured saliency and save an ordinary moekit model.

    Calibration runs --calib-tokens tokens of a prepared data directory through the model and
    records per expert: routing frequency, gate mass and REAP saliency (mean gate weight x expert
    output norm over the tokens routed to it). The --keep experts ranked highest by --criterion
    stay; the rest lose their weights, router rows and correction-bias entries. Writes OUT (model
    directory), OUT/prune_stats.json and OUT/prune_stats.png.

    Args:
        model: moekit model directory (or a training run directory: its newest checkpoint).
        out: output model directory.
        keep: experts kept per MoE layer.
        keep_frac: fraction of the experts kept per layer (e.g. 0.75 prunes 25%).
        criterion: reap (default), frequency, gate_mass, or random (seeded; no calibration needed).
        calib: prepared data directory (`moekit data prepare`) for calibration.
        calib_split: split used for calibration (train keeps val/test untouched).
        calib_tokens: calibration tokens.
        seq_len: calibration window length.
        per_layer_budget: the same total kept, counts per layer by saliency share (at least top_k each;
            see the module docstring); needs a saliency criterion and --calib.
        seed: seed of the random criterion.
        threads: torch CPU threads (0 = torch's default).
    """
    from moekit.checkpoint.native import atomic_write, atomic_write_text, save_model
    from moekit.train.evaluate import resolve_checkpoint

    if threads:
        torch.set_num_threads(threads)
    if per_layer_budget and criterion == "random":
        raise MoekitError("--per-layer-budget shares the budget by saliency: use --criterion reap, frequency or "
                          "gate_mass with --calib")
    src = resolve_checkpoint(model)
    import moekit

    m = moekit.load_model(src)
    cfg = m.config
    if not cfg.is_moe:
        raise MoekitError(f"{src}: a dense model has no experts to prune")
    n = num_to_keep(cfg.moe.num_experts, cfg.moe.top_k, keep, keep_frac)
    stats = None
    if calib is not None:
        from moekit.data import load_prepared

        data = load_prepared(calib)
        toks = data.dataset(calib_split).tokens[: calib_tokens + 1]
        stats = calibrate(m, toks, seq_len=seq_len)
    elif criterion != "random":
        raise MoekitError(f"--criterion {criterion} needs --calib DATA (a prepared data directory)")
    if per_layer_budget:
        if cfg.moe_layer_experts:
            raise MoekitError(f"{src} already has per-layer expert counts; --keep applies to a uniform model")
        chosen = allocate_experts(stats, n, criterion, cfg.moe.top_k)
    else:
        if cfg.moe_layer_experts:
            raise MoekitError(f"{src} has per-layer expert counts {cfg.moe_layer_experts}; prune the original model")
        chosen = choose_experts(stats, n, criterion, cfg.moe.num_experts, len(cfg.moe_layers), seed)
    pruned = prune_model(m, chosen)
    save_model(pruned, out, dtype=next(m.parameters()).dtype)
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", Path(out) / "tokenizer.json")
    report = {"source": str(src), "criterion": criterion, "num_experts": cfg.moe.num_experts, "kept": n,
              "per_layer_budget": per_layer_budget, "kept_per_layer": [len(k) for k in chosen],
              "keep": chosen, "calib": calib, "calib_split": calib_split,
              "stats": stats.to_dict() if stats is not None else None}
    atomic_write_text(Path(out) / "prune_stats.json", json.dumps(report, indent=1))
    if stats is not None:
        atomic_write(Path(out) / "prune_stats.png", lambda tmp: plot_stats(stats, tmp, chosen))
    per = f"{[len(k) for k in chosen]} (budget {n} per layer on average)" if per_layer_budget else f"{n}"
    print(f"pruned {src} -> {out}: {per}/{cfg.moe.num_experts} experts per layer by {criterion}; kept {chosen}")
    return 0
