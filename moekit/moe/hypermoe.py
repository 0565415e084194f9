"""HyperMoE (Zhao et al., ACL 2024, arXiv 2402.12656): knowledge from the experts a token did *not*
select, at the cost of a small adapter instead of more experts.

For each token, a hypernetwork shared by every MoE layer reads an embedding of the token's
unselected experts (the mean of their learned embeddings) together with a learned embedding of the
layer, and generates the weights of a bottleneck adapter, the HyperExpert (D -> R -> D, ReLU). Its
output on the layer's input is added to the MoE output. Selection stays sparse: the routed experts
are exactly those of the base MoE, and no gradient flows from the adapter into the discrete choice.

Shape legend: T tokens, D model dim, E experts, K experts per token, L MoE layers (slots),
H hyper embedding width (`hyper_emb_dim`), R HyperExpert bottleneck width (`hyper_dim`),
U distinct selected-expert sets among the T tokens.

Per token or per set? The generated weights depend on the token only through its set of selected
experts (and the layer), so they are generated once per *distinct* set: U <= min(T, C(E, K)) rows
instead of T. With 8 experts top-2 that is at most 28 generator rows per layer for any batch, where
per-token generation (the paper's formulation, which this equals exactly) would cost
T * H * (2DR + R + D) multiply-adds, as much as the routed experts themselves at these sizes. At
decode (a handful of tokens) U = T and both are the same. Each token then gathers its set's adapter
and all tokens run as one batched matmul (bmm), never a Python loop over tokens or sets.

The output projection's generator starts at zero (as LoRA's B): a new HyperMoE model computes exactly
its base MoE, and training grows the HyperExpert from there (the paper's hyperfan-in init is
near-zero for the same reason).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig, MoEConfig

_KEY_BITS = 62
"""Sets of up to 62 experts are coded as one int64 bitmask (exact, and a 1-D unique is fast)."""


def generator_params(dim: int, n_layers: int, m: MoEConfig) -> int:
    """Parameters of the shared hypernetwork for `n_layers` MoE layers (0 when HyperMoE is off).

    Expert embeddings [L, E, H] + layer embeddings [L, H] + input layer [H, 2H] (+ bias [H]) +
    heads generating the down projection and bias [DR + R, H] (+ bias) and the up projection and
    bias [RD + D, H] (+ bias)."""
    if not m.hyper_dim or not n_layers:
        return 0
    H, R, D = m.hyper_emb_dim, m.hyper_dim, dim
    return n_layers * (m.num_experts + 1) * H + (2 * H * H + H) + (H + 1) * (2 * D * R + R + D)


def flops_per_token(dim: int, n_layers: int, m: MoEConfig) -> int:
    """Forward FLOPs one token spends in HyperMoE over all MoE layers (2 per multiply-add).

    The generator is counted once per token, its cost when every token has its own expert set
    (decode at small batch); in a training batch tokens share sets and pay U/T of it. Per layer:
    mean of unselected embeddings (E*H), input layer (2H*H), heads (H*(2DR + R + D)) and the
    adapter itself (2DR)."""
    if not m.hyper_dim or not n_layers:
        return 0
    H, R, D, E = m.hyper_emb_dim, m.hyper_dim, dim, m.num_experts
    return n_layers * 2 * (E * H + 2 * H * H + H * (2 * D * R + R + D) + 2 * D * R)


def expert_sets(ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct sets of selected experts: (selected_UE bool, inverse_T) with
    selected_UE[inverse_T[t]] the set token t selected."""
    T = ids_TK.shape[0]
    sel_TE = torch.zeros(T, num_experts, dtype=torch.bool, device=ids_TK.device).scatter_(1, ids_TK, True)
    if num_experts <= _KEY_BITS:
        bits_E = torch.arange(num_experts, device=ids_TK.device)
        key_T = (sel_TE.long() << bits_E).sum(1)
        uniq_U, inv_T = torch.unique(key_T, return_inverse=True)
        return ((uniq_U.unsqueeze(1) >> bits_E) & 1).bool(), inv_T
    uniq_UE, inv_T = torch.unique(sel_TE.to(torch.uint8), dim=0, return_inverse=True)
    return uniq_UE.bool(), inv_T


class HyperNetwork(nn.Module):
    """The hypernetwork shared by all MoE layers of a model (`Transformer.hypernet`).

    Each MoE layer holds a plain reference to it and its own slot (`MoELayer.hyper`), not a
    submodule, so its weights are stored, counted and optimised once."""

    def __init__(self, dim: int, n_layers: int, cfg: MoEConfig, init_std: float = 0.02, init: bool = True):
        super().__init__()
        self.dim, self.n_layers, self.cfg, self.init_std = dim, n_layers, cfg, init_std
        E, H, R, D = cfg.num_experts, cfg.hyper_emb_dim, cfg.hyper_dim, dim
        self.expert_emb = nn.Parameter(torch.empty(n_layers, E, H))
        """[L, E, H] one learned embedding per expert of each MoE layer."""
        self.layer_emb = nn.Parameter(torch.empty(n_layers, H))
        """[L, H] one learned embedding per MoE layer: one generator serves every layer."""
        self.in_w = nn.Parameter(torch.empty(H, 2 * H))
        self.in_b = nn.Parameter(torch.empty(H))
        self.down_w = nn.Parameter(torch.empty(D * R + R, H))
        """Generates the adapter's down projection [D, R] and its bias [R]."""
        self.down_b = nn.Parameter(torch.empty(D * R + R))
        self.up_w = nn.Parameter(torch.empty(R * D + D, H))
        """Generates the adapter's up projection [R, D] and its bias [D]; zero at init."""
        self.up_b = nn.Parameter(torch.empty(R * D + D))
        if init:  # the model passes False and initialises it last, after its own weights (see build_hypernet)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embeddings N(0, 1) and a fan-in scaled input layer keep the generator's hidden units O(1);
        the generated down projection is N(0, init_std) like every other matrix of the model (its
        static part is `down_b`, the set-dependent part is scaled so it is of the same order); the
        up generator is zero, so the HyperExpert's output is exactly 0 until training moves it."""
        H = self.cfg.hyper_emb_dim
        nn.init.normal_(self.expert_emb, std=1.0)
        nn.init.normal_(self.layer_emb, std=1.0)
        nn.init.normal_(self.in_w, std=1.0 / math.sqrt(2 * H))
        nn.init.zeros_(self.in_b)
        nn.init.normal_(self.down_w, std=self.init_std / math.sqrt(H))
        nn.init.normal_(self.down_b, std=self.init_std)
        nn.init.zeros_(self.up_w)
        nn.init.zeros_(self.up_b)

    def generate(self, selected_UE: torch.Tensor, slot: int) -> tuple[torch.Tensor, ...]:
        """Adapter weights for U expert sets of MoE layer `slot`, float32: down projection
        [U, D, R], its bias [U, R], up projection [U, R, D], its bias [U, D]."""
        # Plan: 1. mean embedding of each set's unselected experts, joined with the layer's embedding;
        # 2. one ReLU hidden layer; 3. the two heads, split into matrices and biases.
        # float32 whatever the model dtype or autocast: the generator runs on only U rows, so it is
        # nearly free, and its outputs are *weights* shared by every token of a set, so a bf16
        # rounding error there is the same for all those tokens instead of averaging out.
        D, R = self.dim, self.cfg.hyper_dim
        unsel_UE = (~selected_UE).float()
        emb_EH = self.expert_emb[slot].float()
        mean_UH = (unsel_UE @ emb_EH) / unsel_UE.sum(1, keepdim=True)
        layer_UH = self.layer_emb[slot].float().expand_as(mean_UH)
        h_UH = F.relu(F.linear(torch.cat([mean_UH, layer_UH], 1), self.in_w.float(), self.in_b.float()))
        down_U = F.linear(h_UH, self.down_w.float(), self.down_b.float())
        up_U = F.linear(h_UH, self.up_w.float(), self.up_b.float())
        U = h_UH.shape[0]
        return (down_U[:, :D * R].view(U, D, R), down_U[:, D * R:], up_U[:, :R * D].view(U, R, D), up_U[:, R * D:])

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, slot: int) -> torch.Tensor:
        """The HyperExpert's output [T, D] for MoE layer `slot` on its input x_TD, given the experts
        each token selected (ids_TK); add it to the MoE output."""
        # Plan: 1. distinct selected sets and each token's set (discrete: no gradient, as routing);
        # 2. generate one adapter per set (float32, autocast off); 3. every token gathers its set's
        # adapter and all tokens run as two batched matmuls in the activations' dtype.
        selected_UE, inv_T = expert_sets(ids_TK, self.cfg.num_experts)
        with torch.autocast(x_TD.device.type, enabled=False):
            down_UDR, down_UR, up_URD, up_UD = self.generate(selected_UE, slot)
        dt = x_TD.dtype
        x_T1D = x_TD.unsqueeze(1)
        h_TR = F.relu(torch.bmm(x_T1D, down_UDR.to(dt)[inv_T]).squeeze(1) + down_UR.to(dt)[inv_T])
        return torch.bmm(h_TR.unsqueeze(1), up_URD.to(dt)[inv_T]).squeeze(1) + up_UD.to(dt)[inv_T]


def build_hypernet(cfg: ModelConfig) -> HyperNetwork | None:
    """The model's shared hypernetwork, or None when HyperMoE is off or the model has no MoE layer.

    Left uninitialised: `Transformer.reset_parameters` initialises it after every other weight, so
    a seeded HyperMoE model has exactly the base weights of the same MoE without it (a controlled
    comparison, and the zero up generator makes its initial outputs equal too)."""
    m = cfg.moe
    if m is None or not m.hyper_dim or not cfg.moe_layers:
        return None
    return HyperNetwork(cfg.dim, len(cfg.moe_layers), m, cfg.init_std, init=False)
