"""HyperMoE (Zhao et al., ACL 2024, arXiv 2402.12656): knowledge from the experts a token did *not*
select, at the cost of a small adapter instead of more experts.

For each token, a hypernetwork shared by every MoE layer reads an embedding of the token's
unselected experts (the mean of their learned embeddings) together with a learned embedding of the
layer, and generates the weights of a bottleneck adapter, the HyperExpert (D -> R -> D, ReLU). Its
output on the layer's input is added to the MoE output. Selection stays sparse: the routed experts
are exactly those of the base MoE, and no gradient flows from the adapter into the discrete choice.

Shape legend: T tokens, D model dim, E experts, K experts per token, L MoE layers (slots),
H hyper embedding width = the generator's hidden code (`hyper_emb_dim`), R HyperExpert bottleneck
width (`hyper_dim`).

Per token or per expert set? The generated weights depend on a token only through its set of
selected experts (and the layer), so they are generated once per *distinct* set: U <= min(T, C(E, K))
generator rows instead of T (8 experts top-2 have 28 sets), which equals the paper's per-token
generation exactly. Tokens are then sorted by set and each set's adapter runs as one group of a
grouped GEMM (`torch.nn.functional.grouped_mm`, as grouped experts): 2*D*R multiply-adds per token.
Measured by `benchmarks/hypermoe_overhead.py` (one layer, forward + backward, 1024 tokens, D 128,
R 16, H 32, one Zen 4 core of a loaded machine, so indicative; results in docs/hypermoe.md): this
path costs a small fraction of the MoE layer itself; never materialising any weights
(x W(h) = sum_j h_j (x W_j) + x W_0, two [T, D] x [D, R*H] GEMMs, `forward_factorised`) several
times this path. A first version that gathered a [D, R] matrix per token for a batched matmul
(commit c1866e4) was an order of magnitude slower still: torch's CPU bmm loops over the
1x128 @ 128x16 products, and the gathered weights are 8 MB per projection. The factorised form
is used where `grouped_mm` is missing (older torch) or off the CPU.

The generator's output heads for the up projection start at zero (as LoRA's B): a new HyperMoE
model computes exactly its base MoE, and training grows the HyperExpert from there (the paper's
hyperfan-in init is near-zero for the same reason).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig, MoEConfig

_KEY_BITS = 62
"""Sets of up to 62 experts are coded as one int64 bitmask (exact, and a 1-D unique is fast)."""
_GROUPED_MM = getattr(F, "grouped_mm", None)


def generator_params(dim: int, n_layers: int, m: MoEConfig) -> int:
    """Parameters of the shared hypernetwork for `n_layers` MoE layers (0 when HyperMoE is off):
    expert embeddings [L, E, H] + layer embeddings [L, H] + input layer [H, 2H] + [H] + the heads
    that generate the down projection [D, R, H] + [D, R], its bias [R, H] + [R], the up projection
    [R, H, D] + [R, D] and its bias [D, H] + [D]."""
    if not m.hyper_dim or not n_layers:
        return 0
    H, R, D = m.hyper_emb_dim, m.hyper_dim, dim
    return n_layers * (m.num_experts + 1) * H + (2 * H * H + H) + (H + 1) * (2 * D * R + R + D)


def flops_per_token(dim: int, n_layers: int, m: MoEConfig) -> int:
    """Forward matmul FLOPs one token spends in HyperMoE over all MoE layers (2 per multiply-add).

    Per layer: mean of the unselected embeddings (E*H), input layer (2H*H), generator heads
    (H*(2DR + R + D)) and the adapter (2DR). The generator is counted once per token, its cost
    when every token has its own expert set (decode at small batch); a training batch shares sets
    (at most C(E, K)) and pays U/T of it. The factorised fallback costs the same, all as GEMMs."""
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


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: grouped_mm's CPU backward rejects the
    stride-0 gradients that sum() and expand() produce."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class HyperNetwork(nn.Module):
    """The hypernetwork shared by all MoE layers of a model (`Transformer.hypernet`).

    Each MoE layer holds a plain reference to it and its own slot (`MoELayer.hyper`), not a
    submodule, so its weights are stored, counted and optimised once. For a token with hidden code
    h [H] the generated HyperExpert is
        W_down[d, r] = down_w[d, r] . h + down_b[d, r]      b_down[r] = down_bias_w[r] . h + down_bias_b[r]
        W_up[r, d]   = up_w[r, :, d] . h + up_b[r, d]      b_up[d]   = up_bias_w[d] . h + up_bias_b[d]
    and its output is relu(x W_down + b_down) W_up + b_up."""

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
        # Stored in the layouts the forward's GEMMs read: [D, R*H] and [R*H, D] are plain views.
        self.down_w = nn.Parameter(torch.empty(D, R, H))
        self.down_b = nn.Parameter(torch.empty(D, R))
        self.down_bias_w = nn.Parameter(torch.empty(R, H))
        self.down_bias_b = nn.Parameter(torch.empty(R))
        self.up_w = nn.Parameter(torch.empty(R, H, D))
        self.up_b = nn.Parameter(torch.empty(R, D))
        self.up_bias_w = nn.Parameter(torch.empty(D, H))
        self.up_bias_b = nn.Parameter(torch.empty(D))
        if init:  # the model passes False and initialises it last, after its own weights (see build_hypernet)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Embeddings N(0, 1) and a fan-in scaled input layer keep the hidden code O(1); the generated
        down projection is N(0, init_std) like every other matrix of the model (static part
        `down_b`, the code-dependent part scaled to the same order); the up heads are zero, so the
        HyperExpert's output is exactly 0 until training moves them."""
        H = self.cfg.hyper_emb_dim
        nn.init.normal_(self.expert_emb, std=1.0)
        nn.init.normal_(self.layer_emb, std=1.0)
        nn.init.normal_(self.in_w, std=1.0 / math.sqrt(2 * H))
        nn.init.zeros_(self.in_b)
        nn.init.normal_(self.down_w, std=self.init_std / math.sqrt(H))
        nn.init.normal_(self.down_b, std=self.init_std)
        nn.init.normal_(self.down_bias_w, std=self.init_std / math.sqrt(H))
        nn.init.zeros_(self.down_bias_b)
        for p in (self.up_w, self.up_b, self.up_bias_w, self.up_bias_b):
            nn.init.zeros_(p)

    def code(self, unsel_UE: torch.Tensor, slot: int) -> torch.Tensor:
        """The generator's hidden code h [U, H] (float32) for rows whose unselected experts in MoE
        layer `slot` are unsel_UE (float 0/1): ReLU of a linear map of (mean embedding of the
        unselected experts, layer embedding)."""
        mean_UH = (unsel_UE @ self.expert_emb[slot].float()) / unsel_UE.sum(1, keepdim=True)
        layer_UH = self.layer_emb[slot].float().expand_as(mean_UH)
        return F.relu(F.linear(torch.cat([mean_UH, layer_UH], 1), self.in_w.float(), self.in_b.float()))

    def generate(self, h_UH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The HyperExperts of U hidden codes, float32: W_down [U, D, R], b_down [U, R], W_up [U, R, D],
        b_up [U, D]."""
        D, R, H = self.dim, self.cfg.hyper_dim, self.cfg.hyper_emb_dim
        U = h_UH.shape[0]
        f = lambda p: p.float()  # noqa: E731
        wd = F.linear(h_UH, f(self.down_w).view(D * R, H), f(self.down_b).view(D * R)).view(U, D, R)
        bd = F.linear(h_UH, f(self.down_bias_w), f(self.down_bias_b))
        # up_w is stored [R, H, D] for the factorised path's GEMM; here h contracts its middle dim.
        wu = (h_UH @ f(self.up_w).permute(1, 0, 2).reshape(H, R * D)).view(U, R, D) + f(self.up_b)
        bu = F.linear(h_UH, f(self.up_bias_w), f(self.up_bias_b))
        return wd, bd, wu, bu

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, slot: int) -> torch.Tensor:
        """The HyperExpert's output [T, D] for MoE layer `slot` on its input x_TD, given the experts
        each token selected (ids_TK, discrete: no gradient, as routing); add it to the MoE output."""
        # Plan: 1. the distinct selected sets and each token's set; 2. per set, the hidden code and the
        # generated adapter (float32, autocast off); 3. tokens sorted by set run the adapters as two
        # grouped GEMMs in the activations' dtype, and return to their order.
        # float32 for steps 1-2 whatever the model dtype or autocast: only U rows, nearly free, and their
        # outputs are weights shared by every token of a set, so a bf16 rounding error there would be
        # the same for all of those tokens instead of averaging out.
        if _GROUPED_MM is None or x_TD.device.type != "cpu":  # CUDA's grouped_mm needs bf16 on sm90+
            return self.forward_factorised(x_TD, ids_TK, slot)
        sel_UE, inv_T = expert_sets(ids_TK, self.cfg.num_experts)
        with torch.autocast(x_TD.device.type, enabled=False):
            wd_UDR, bd_UR, wu_URD, bu_UD = self.generate(self.code((~sel_UE).float(), slot))
        dt = x_TD.dtype
        order_T = torch.argsort(inv_T, stable=True)
        back_T = torch.empty_like(order_T)
        back_T[order_T] = torch.arange(order_T.numel(), device=order_T.device)
        set_T = inv_T[order_T]
        offs_U = torch.cumsum(torch.bincount(inv_T, minlength=sel_UE.shape[0]), 0).to(torch.int32)
        a_TR = _ContiguousGrad.apply(_GROUPED_MM(x_TD[order_T], wd_UDR.to(dt), offs=offs_U))
        a_TR = F.relu(a_TR + bd_UR.to(dt)[set_T])
        y_TD = _ContiguousGrad.apply(_GROUPED_MM(a_TR, wu_URD.to(dt), offs=offs_U)) + bu_UD.to(dt)[set_T]
        return y_TD[back_T]

    def forward_factorised(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, slot: int) -> torch.Tensor:
        """The same output without grouped GEMMs or per-set weights: the generated weights are linear
        in h, so x W_down(h) = sum_j h_j (x @ down_w[:, :, j]) + x @ down_b, one [T, D] x [D, R*H] GEMM
        (likewise for W_up on the outer product a (x) h). D*R*H multiply-adds per token and projection."""
        T, D = x_TD.shape
        R, H = self.cfg.hyper_dim, self.cfg.hyper_emb_dim
        with torch.autocast(x_TD.device.type, enabled=False):
            unsel_TE = torch.ones(T, self.cfg.num_experts, device=x_TD.device).scatter_(1, ids_TK, 0.0)
            h_TH = self.code(unsel_TE, slot)
        dt = x_TD.dtype
        h_TH = h_TH.to(dt)
        w = lambda p: p.to(dt)  # noqa: E731  (no-op unless the weights are stored in another dtype)
        p_TRH = (x_TD @ w(self.down_w).view(D, R * H)).view(T, R, H)
        a_TR = F.relu((p_TRH * h_TH.unsqueeze(1)).sum(-1) + x_TD @ w(self.down_b)
                      + F.linear(h_TH, w(self.down_bias_w), w(self.down_bias_b)))
        q_TRH = a_TR.unsqueeze(2) * h_TH.unsqueeze(1)
        return (q_TRH.reshape(T, R * H) @ w(self.up_w).view(R * H, D) + a_TR @ w(self.up_b)
                + F.linear(h_TH, w(self.up_bias_w), w(self.up_bias_b)))


def build_hypernet(cfg: ModelConfig) -> HyperNetwork | None:
    """The model's shared hypernetwork, or None when HyperMoE is off or the model has no MoE layer.

    Left uninitialised: `Transformer.reset_parameters` initialises it after every other weight, so
    a seeded HyperMoE model has exactly the base weights of the same MoE without it (a controlled
    comparison, and the zero up heads make its initial outputs equal too)."""
    m = cfg.moe
    if m is None or not m.hyper_dim or not cfg.moe_layers:
        return None
    return HyperNetwork(cfg.dim, len(cfg.moe_layers), m, cfg.init_std, init=False)
