"""Decoder-only LM: embeddings -> N x (attention, FFN or MoE) -> norm -> head.

Shape legend: B batch, S sequence, D model dim, V vocab, L keys attended.
The model is single-device: parallelism (expert parallel dispatch) is applied from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit import kernels
from moekit.config import ModelConfig
from moekit.model.loss import cross_entropy
from moekit.model.attention import Attention, KVCache, RMSNorm, decode_linear
from moekit.model.rope import RotaryEmbedding
from moekit.moe.experts import DenseFFN, GroupedExperts
from moekit.moe.hypermoe import build_hypernet
from moekit.moe.layer import MoELayer, Routing
from moekit.moe.router import Router


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V] (or [B, 1, V] when `logits_at` was given)."""
    loss: torch.Tensor | None = None
    """Cross-entropy + weighted aux losses, when labels were given."""
    ce_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weighted aux losses summed over MoE layers: {"balance": ..., "z": ...} (empty for dense)."""
    routing: tuple[Routing | None, ...] = ()
    """Per layer: a `Routing` for MoE layers, None for dense ones."""


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.attention == "mla":
            from moekit.model.mla import MLAttention  # DeepSeek-V2/V3 latent attention

            self.attn = MLAttention(cfg, idx)
        else:
            self.attn = Attention(cfg, idx)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(idx)
        self.ffn = MoELayer(cfg.dim, cfg.layer_moe(idx)) if self.is_moe else DenseFFN(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, pos, cache, mask, seen, return_ids):
        x = x + self.attn(self.attn_norm(x), cos, sin, pos, cache, mask, seen)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, routing = self.ffn(h, return_ids=return_ids)
        else:
            y, routing = self.ffn(h), None
        return x + y, routing


class Transformer(nn.Module):
    """An MoE (or dense) decoder LM built from a `ModelConfig`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        rope_dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.hd
        self.rope = RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        # HyperMoE: one hypernetwork for all MoE layers; each layer gets a reference and its slot.
        self.hypernet = build_hypernet(cfg)
        if self.hypernet is not None:
            for slot, layer in enumerate(self.moe_layers()):
                layer.hyper = (self.hypernet, slot)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std) everywhere, residual output projections (attention `wo`,
        FFN/expert `w2`) scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not
        grow with depth; norms at 1, biases at 0."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, mod in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, RMSNorm):
                nn.init.ones_(mod.weight)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
            elif isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=out_std if leaf in ("wo", "w2") else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, GroupedExperts):
                nn.init.normal_(mod.w13, std=std)
                nn.init.normal_(mod.w2, std=out_std)
                for b in (mod.b13, mod.b2):
                    if b is not None:
                        nn.init.zeros_(b)
                mod.zero_padding()  # heterogeneous widths: padded units stay zero
            elif isinstance(mod, Router):
                nn.init.normal_(mod.weight, std=std)
                for p in (mod.bias, mod.noise_weight):
                    if p is not None:
                        nn.init.zeros_(p)
        if self.hypernet is not None:
            self.hypernet.reset_parameters()  # its own init (zero up generator: starts as the base MoE)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (compute) dtype. Usually every weight's too; after
        `moekit.precision.widen_compute` the big matrices stay bf16 while this is float32."""
        return self.norm.weight.dtype

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if b.is_moe]

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """Preallocate a KV cache for `batch_size` sequences of up to `max_len` tokens."""
        max_len = max_len or self.config.max_seq_len
        dtype = dtype or self.dtype
        layers = [b.attn.init_cache(batch_size, max_len, dtype, self.device) for b in self.layers]
        return KVCache(layers, batch_size, max_len, self.device)

    @torch.no_grad()
    def update_router_biases(self, loads: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing: one bias step per MoE layer from its accumulated [E] load."""
        for layer, load in zip(self.moe_layers(), loads):
            layer.update_bias(load)

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, *, labels: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_at: torch.Tensor | None = None, return_routing_ids: bool = False) -> ModelOutput:
        """Run the model.

        input_ids [B, S]; labels [B, S] (already shifted: labels[b, s] is the target for position s,
        -100 ignored); cache: a `KVCache` to read and extend (the caller advances `cache.lengths`);
        logits_at [B]: only compute logits at these positions (generation), giving [B, 1, V].
        """
        # The kernel switches (MOEKIT_KERNELS, MOEKIT_CPU_ISA) are read once per forward, not at
        # each of the layers' ~20 kernel checks each (moekit.kernels.pinned).
        with kernels.pinned():
            return self._forward(input_ids, labels, cache, logits_at, return_routing_ids)

    def _forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None, cache: KVCache | None,
                 logits_at: torch.Tensor | None, return_routing_ids: bool) -> ModelOutput:
        # Plan: 1. positions (from the cache lengths when decoding) and the attention mask;
        # 2. the blocks, collecting routing values; 3. head and losses.
        B, S = input_ids.shape
        dev = input_ids.device
        ar = torch.arange(S, device=dev)
        mask = None
        seen = 0
        if cache is None:
            pos_BS = ar.unsqueeze(0).expand(B, S)
        else:
            if cache.seen + S > cache.max_len:
                raise ValueError(f"KV cache overflow: {cache.seen} cached + {S} new tokens > max_len {cache.max_len}; "
                                 "allocate a larger cache (new_cache(max_len=...)) or shorten the input")
            pos_BS = cache.lengths.unsqueeze(1) + ar
            cache.seen += S
            seen = cache.seen
            # Query at position p sees keys at positions <= p (its own row only).
            mask = (torch.arange(seen, device=dev).view(1, 1, 1, seen) <= pos_BS.view(B, 1, S, 1))
        x = self.embed(input_ids)
        if x.dtype != self.dtype:  # bf16-stored embeddings, fp32 compute
            x = x.to(self.dtype)
        cos, sin = self.rope(pos_BS, x.dtype)
        routings = []
        for i, block in enumerate(self.layers):
            x, r = block(x, cos, sin, pos_BS, None if cache is None else cache.layers[i], mask, seen, return_routing_ids)
            routings.append(r)
        x = self.norm(x)
        if logits_at is not None:
            x = x[torch.arange(B, device=dev), logits_at].unsqueeze(1)
        if self.lm_head is not None and hasattr(self.lm_head, "qweight"):  # quantized head (moekit.quant)
            logits = self.lm_head(x)
        else:
            w = self.embed.weight if self.lm_head is None else self.lm_head.weight
            logits = decode_linear(x, w)  # the compiled GEMV at decode (logits_at / one token per row)
        out = ModelOutput(logits=logits, routing=tuple(routings))
        moe_r = [r for r in routings if r is not None]
        if moe_r:
            mcfg = self.config.moe
            out.aux_losses = {
                "balance": mcfg.aux_loss_coef * torch.stack([r.aux_loss for r in moe_r]).sum(),
                "z": mcfg.z_loss_coef * torch.stack([r.z_loss for r in moe_r]).sum(),
            }
            if mcfg.cost_loss_coef:  # expected-cost penalty of cost-aware routing (moekit.moe.cost)
                out.aux_losses["cost"] = mcfg.cost_loss_coef * torch.stack([r.cost_loss for r in moe_r]).sum()
        if labels is not None:
            ce = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            out.ce_loss = ce
            out.loss = ce + sum(out.aux_losses.values()) if out.aux_losses else ce
        return out

    # ------------------------------------------------------------------- io
    def save_pretrained(self, path, **kw) -> None:
        from moekit.checkpoint.native import save_model

        save_model(self, path, **kw)


def build_model(config: ModelConfig, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                seed: int | None = None) -> Transformer:
    """Build a randomly initialised model from a config (optionally seeded, cast and moved)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = Transformer(config)
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return model
