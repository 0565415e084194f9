"""Expert FFNs with weights stacked per expert, and the dense FFN they generalise.

Shape legend: E experts, F expert hidden dim, D model dim, S rows grouped by expert, T tokens.
Weights follow F.linear's [out, in] layout so each expert slice feeds oneDNN/MKL directly:
`w13_EHD` [E, 2F, D] (gate and up fused, gate first; H = 2F, or F for plain GELU) and
`w2_EDF` [E, D, F]. A slice `w13_EHD[e]` is a view, never a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit import kernels


def activate(h_SH: torch.Tensor, act: str) -> torch.Tensor:
    """Apply the FFN nonlinearity to the fused first projection."""
    if act == "swiglu":
        g, u = h_SH.chunk(2, dim=-1)
        return F.silu(g) * u
    if act == "geglu":
        g, u = h_SH.chunk(2, dim=-1)
        return F.gelu(g) * u
    return F.gelu(h_SH)


def _inference(x: torch.Tensor, mod: nn.Module, *more: torch.Tensor) -> bool:
    """True on CPU when no autograd graph is being built through x, `more` or mod's weights
    (the fused paths below have no backward)."""
    if x.device.type != "cpu":
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t.requires_grad for t in (x, *more, *mod.parameters()))


class GroupedExperts(nn.Module):
    """E expert FFNs stored as stacked tensors; runs rows already grouped by expert."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str = "swiglu"):
        super().__init__()
        self.num_experts, self.dim, self.hidden, self.act = num_experts, dim, hidden, act
        H = 2 * hidden if act in ("swiglu", "geglu") else hidden
        self.w13 = nn.Parameter(torch.empty(num_experts, H, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        nn.init.normal_(self.w13, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on a block of rows (views into the stacked weights: no copy)."""
        return F.linear(activate(F.linear(x_ND, self.w13[e]), self.act), self.w2[e])

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if x_SD.shape[0] == 0:
            return x_SD.new_zeros(0, self.dim)
        if x_SD.is_cuda and hasattr(torch, "_grouped_mm") and x_SD.dtype == torch.bfloat16:
            return self._forward_grouped_mm(x_SD, counts_E)
        counts = counts_E.tolist()
        if _inference(x_SD, self):
            # No autograd graph: fill one preallocated buffer (no per-expert cat) and let the
            # compiled kernel take the experts with few rows.
            return self._forward_into(x_SD, counts, None, None, x_SD.shape[0]).to(x_SD.dtype)
        # CPU training: one GEMM pair per expert that has rows. The host copy of the counts is
        # the only sync; experts with no rows cost nothing, which keeps small batches cheap.
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.expert_forward(e, x_SD[start:start + n]))
                start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward_combine(self, x_SD: torch.Tensor, counts_E: torch.Tensor, token_S: torch.Tensor,
                        weights_S: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Experts and combine in one pass, for inference on CPU: out[t] = sum over the rows s
        of token t of weights_S[s] * expert(x_SD[s]), accumulated in float32, returned [T, D] in
        x's dtype. Same result as `Dispatcher.combine(forward(x, counts))` up to rounding."""
        if x_SD.shape[0] == 0:
            return x_SD.new_zeros(num_tokens, self.dim)
        out_TD = self._forward_into(x_SD, counts_E.tolist(), token_S, weights_S, num_tokens)
        return out_TD.to(x_SD.dtype)

    def _forward_into(self, x_SD: torch.Tensor, counts: list[int], token_S: torch.Tensor | None,
                      weights_S: torch.Tensor | None, n_out: int) -> torch.Tensor:
        # Plan:
        # 1. experts with <= MAX_ROWS_PER_EXPERT rows run in one compiled-kernel call (weights
        #    streamed once, no per-expert Python ops), when the kernels are available;
        # 2. the others run as F.linear pairs (oneDNN) and are written straight into the float32
        #    output: a slice copy, or an index_add of the weighted rows when combining, done per
        #    expert while its output block is still in cache.
        small_E = [0] * len(counts)
        if self.act in kernels.ACTS and kernels.usable(x_SD, self.w13, self.w2):
            small_E = [n if n <= kernels.MAX_ROWS_PER_EXPERT else 0 for n in counts]
        if token_S is None and not any(small_E):
            # Plain grouped output, no kernel: keep x's dtype (no float32 round trip).
            out_ND = x_SD.new_empty(n_out, self.dim)
        else:
            out_ND = torch.zeros(n_out, self.dim, dtype=torch.float32, device=x_SD.device)
        big = list(counts)
        if any(small_E):
            starts_E = torch.tensor(counts).cumsum(0) - torch.tensor(counts)
            kernels.moe_experts(x_SD, self.w13, self.w2, torch.tensor(small_E), self.act,
                                starts_E=starts_E, dst_S=token_S, scale_S=weights_S, out_ND=out_ND)
            big = [n - m for n, m in zip(counts, small_E)]
        start = 0
        for e, n in enumerate(counts):
            if big[e]:
                y_ND = self.expert_forward(e, x_SD[start:start + n])
                if token_S is None:
                    out_ND[start:start + n] = y_ND
                else:
                    y_ND = y_ND.float()
                    y_ND.mul_(weights_S[start:start + n].unsqueeze(-1))
                    out_ND.index_add_(0, token_S[start:start + n], y_ND)
            start += n
        return out_ND

    def _forward_grouped_mm(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # One kernel for all experts with no host sync (CUDA, bf16).
        offs = torch.cumsum(counts_E, 0).to(torch.int32)
        h = torch._grouped_mm(x_SD, self.w13.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(activate(h, self.act), self.w2.transpose(-2, -1), offs=offs)


class DenseFFN(nn.Module):
    """A dense FFN (SwiGLU by default): the dense baseline layer and the shared expert."""

    def __init__(self, dim: int, hidden: int, act: str = "swiglu"):
        super().__init__()
        self.act = act
        H = 2 * hidden if act in ("swiglu", "geglu") else hidden
        self.w13 = nn.Linear(dim, H, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(activate(self.w13(x), self.act))
