"""Sparse upcycling: turn a dense model into an MoE whose logits equal the dense model's at init.

Shape legend: E experts copied, G granularity (slices per copy), K top-k copies, F dense FFN
width, D model dim; the MoE has E*G experts of width F/G and routes each token to K*G of them.

Why the output is exact at initialisation:

* G = 1 (copy-upcycling, Komatsuzaki et al. 2022): every expert is the dense FFN, and the routing
  weights of the K chosen experts are normalised to sum to 1, so sum_k w_k FFN(x) = FFN(x) for
  *any* router. The router starts small-random (`router_std`), which breaks the symmetry between
  the identical experts as soon as training starts.
* G > 1 (fine-grained): the FFN's hidden dim is cut into G slices (SwiGLU is separable over its
  hidden units, so FFN(x) = sum_g slice_g(x)); expert c*G+g is copy c of slice g. The output is
  G * sum_i w_i slice(i)(x) (`routed_scaling_factor` = G), which equals FFN(x) exactly when the
  chosen set is K whole copies with equal weights 1/(K*G). So the router weight starts at zero
  (equal weights) and a tiny selection-only bias (`score_correction_bias`, 1e-4 on copies
  0..K-1) breaks the tie in favour of whole copies. The bias is below anything a trained router
  produces, so routing becomes learned as soon as the router weights move; it is not trained
  (unless aux-loss-free balancing is switched on later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from moekit.checkpoint.native import CheckpointError, atomic_write_text, save_model
from moekit.config import ConfigError, ModelConfig, MoEConfig

TIE_BREAK = 1e-4
"""Selection bias for fine-grained upcycling: far below learned routing-score gaps."""


def upcycle_config(cfg: ModelConfig, num_experts: int, top_k: int, granularity: int = 1,
                   router: str = "topk_softmax", every: int = 1, aux_loss_coef: float = 0.01) -> ModelConfig:
    """The MoE config an upcycled `cfg` gets (validates the request)."""
    if cfg.is_moe:
        raise ConfigError(f"upcycle: model {cfg.name!r} already has MoE layers {cfg.moe_layers}; upcycle a dense model")
    if granularity < 1 or cfg.ffn_dim % granularity:
        raise ConfigError(f"--granularity: must divide the FFN width {cfg.ffn_dim}, got {granularity}")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"--top-k: must be between 1 and --experts={num_experts}, got {top_k}")
    if router not in ("topk_softmax", "softmax_topk"):
        raise ConfigError(f"--router: {router!r} cannot reproduce the dense output; use topk_softmax or softmax_topk")
    G = granularity
    moe = MoEConfig(num_experts=num_experts * G, top_k=top_k * G, expert_dim=cfg.ffn_dim // G, expert_act="swiglu",
                    router=router, norm_topk_prob=True, routed_scaling_factor=float(G),
                    score_correction_bias=G > 1, aux_loss_coef=aux_loss_coef)
    return cfg.replace(moe=moe, first_k_dense=0, moe_every=every, dense_layers=[],
                       name=f"{cfg.name}-upcycled-{num_experts}x{G}-top{top_k}",
                       source=f"upcycled from {cfg.name} ({cfg.source})")


@torch.no_grad()
def upcycle(model_or_path, num_experts: int, top_k: int, granularity: int = 1, router: str = "topk_softmax",
            router_std: float = 0.02, every: int = 1, aux_loss_coef: float = 0.01, seed: int = 0):
    """Return an MoE `Transformer` upcycled from a dense model (or a path `load_model` reads).

    Non-FFN weights are copied from the source; each upcycled layer's FFN becomes
    `num_experts * granularity` experts. See the module docstring for why logits are unchanged.
    """
    # Plan: 1. load the source, derive the MoE config; 2. build on meta; 3. reuse every non-FFN
    # tensor; 4. per MoE layer slice the dense w13/w2 into experts, init the router (and tie-break
    # bias for G > 1); 5. materialise buffers.
    from moekit.checkpoint import load_any
    from moekit.checkpoint.native import materialize_buffers
    from moekit.model.transformer import Transformer

    src = load_any(model_or_path) if isinstance(model_or_path, (str, Path)) else model_or_path
    cfg = upcycle_config(src.config, num_experts, top_k, granularity, router, every, aux_loss_coef)
    G, E, K, F = granularity, num_experts, top_k, src.config.ffn_dim
    Fg = F // G
    with torch.device("meta"):
        model = Transformer(cfg)
    old = src.state_dict()
    dtype = src.dtype
    gen = torch.Generator().manual_seed(seed)
    new: dict[str, torch.Tensor] = {}
    for key, meta in model.state_dict().items():
        if key in old and tuple(old[key].shape) == tuple(meta.shape):
            new[key] = old[key].clone()  # the dense model stays usable (and untouched by training)
    for i in cfg.moe_layers:
        p = f"layers.{i}.ffn."
        w13_HD, w2_DF = old[p + "w13.weight"], old[p + "w2.weight"]
        gate_GfD = w13_HD[:F].reshape(G, Fg, -1)
        up_GfD = w13_HD[F:].reshape(G, Fg, -1)
        # Expert c*G + g = copy c of slice g: gate rows of slice g, then its up rows.
        w13_slices = torch.cat([gate_GfD, up_GfD], dim=1)  # [G, 2*Fg, D]
        new[p + "experts.w13"] = w13_slices.repeat(E, 1, 1).contiguous()
        w2_GDf = w2_DF.reshape(w2_DF.shape[0], G, Fg).permute(1, 0, 2)
        new[p + "experts.w2"] = w2_GDf.repeat(E, 1, 1).contiguous()
        std = router_std if G == 1 else 0.0
        w = torch.randn(E * G, cfg.dim, generator=gen, dtype=torch.float32) * std
        new[p + "router.weight"] = w.to(dtype)
        if G > 1:
            bias = torch.zeros(E * G, dtype=torch.float32)
            bias[: K * G] = TIE_BREAK
            new[p + "router.score_bias"] = bias
    missing = sorted(set(model.state_dict()) - set(new))
    if missing:
        raise CheckpointError(f"upcycle: no source for {missing[:5]}; is the source a moekit-compatible dense model?")
    model.load_state_dict(new, strict=True, assign=True)
    materialize_buffers(model)
    model = model.to(src.device).eval()
    if getattr(src, "tokenizer", None) is not None:
        model.tokenizer = src.tokenizer
    return model


@torch.no_grad()
def max_logit_diff(a, b, vocab: int, seed: int = 0, batch: int = 2, seq: int = 32) -> float:
    """max |logits_a - logits_b| on random tokens (the init-equality check the CLI reports)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, min(seq, a.config.max_seq_len)), generator=g).to(a.device)
    return (a(ids).logits.float() - b(ids).logits.float()).abs().max().item()


def upcycle_cli(src: str, out: str, experts: int = 8, top_k: int = 2, granularity: int = 1,
                router: Literal["topk_softmax", "softmax_topk"] = "topk_softmax", router_std: float = 0.02,
                every: int = 1, aux_loss_coef: float = 0.01, seed: int = 0, overwrite: bool = False) -> int:
    """Turn a dense model into an MoE (sparse upcycling) with identical logits at initialisation.

    Each dense FFN is copied into EXPERTS experts (or, with --granularity G, split into G slices
    per copy: EXPERTS*G experts of width F/G, top-k becomes TOP_K*G) and a router is added. The
    output is a normal moekit model directory: continue with `moekit train --init-from OUT`.

    Args:
        src: dense source model (moekit or Hugging Face directory, or .gguf file).
        out: output directory (moekit format).
        experts: number of expert copies E.
        top_k: experts (copies) each token uses.
        granularity: slices per copy G (fine-grained experts); must divide the FFN width.
        router: routing rule (both renormalise the chosen weights, which keeps the logits exact).
        router_std: std of the random router init for G = 1 (G > 1 starts at zero, see docs).
        every: upcycle layer i when (i + 1) % every == 0 (1 = every layer).
        aux_loss_coef: load-balancing loss weight for training.
        seed: router init seed.
        overwrite: allow writing into a non-empty directory.
    """
    from moekit.checkpoint import load_any
    from moekit.model.params import count_params

    outp = Path(out)
    if outp.is_dir() and any(outp.iterdir()) and not overwrite:
        raise CheckpointError(f"{outp}: directory is not empty; pass --overwrite or choose an empty directory")
    dense = load_any(src)
    moe = upcycle(dense, experts, top_k, granularity, router, router_std, every, aux_loss_coef, seed)
    diff = max_logit_diff(moe, dense, moe.config.vocab_size)
    save_model(moe, outp)
    if getattr(moe, "tokenizer", None) is not None:
        atomic_write_text(outp / "tokenizer.json", moe.tokenizer.to_str())
    a, b = count_params(dense.config), count_params(moe.config)
    print(f"upcycled {src} -> {outp}: {moe.config.moe.num_experts} experts of width {moe.config.moe.expert_dim}, "
          f"top-{moe.config.moe.top_k}, MoE layers {moe.config.moe_layers}")
    print(f"params total {a.total_params / 1e6:.2f}M -> {b.total_params / 1e6:.2f}M, "
          f"active {a.active_params / 1e6:.2f}M -> {b.active_params / 1e6:.2f}M")
    print(f"init check: max |logits(moe) - logits(dense)| = {diff:.3g} on 2x32 random tokens")
    print(f"next: moekit train --init-from {outp}")
    return 0


__all__ = ["TIE_BREAK", "max_logit_diff", "upcycle", "upcycle_cli", "upcycle_config"]
