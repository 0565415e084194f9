"""`moekit demo`: build a preset, run a batch through it, show routing statistics."""

from __future__ import annotations

import torch


def demo(preset: str = "tiny-moe", tokens: int = 256, seed: int = 0) -> int:
    """Build a model from a preset, run one random batch through it and print per-layer routing.

    Args:
        preset: model preset name.
        tokens: tokens in the batch.
        seed: random seed.
    """
    import moekit
    from moekit.moe.balance import load_imbalance

    cfg = moekit.get_preset(preset)
    model = moekit.build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=g)
    with torch.no_grad():
        out = model(ids, labels=ids)
    pc = moekit.count_params(cfg)
    print(f"{preset}: {pc.total_params:,} params, {pc.active_params:,} active; loss {out.ce_loss.item():.3f}")
    for i, r in enumerate(out.routing):
        if r is None:
            print(f"layer {i}: dense")
            continue
        mx, cv = load_imbalance(r.tokens_per_expert)
        print(f"layer {i}: tokens/expert {r.tokens_per_expert.tolist()}  max/mean {mx:.2f}  cv {cv:.2f}  "
              f"entropy {r.entropy.item():.3f}  aux {r.aux_loss.item():.3f}  dropped {int(r.dropped)}")
    return 0
