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


def activate(h_SH: torch.Tensor, act: str) -> torch.Tensor:
    """Apply the FFN nonlinearity to the fused first projection."""
    if act == "swiglu":
        g, u = h_SH.chunk(2, dim=-1)
        return F.silu(g) * u
    if act == "geglu":
        g, u = h_SH.chunk(2, dim=-1)
        return F.gelu(g) * u
    return F.gelu(h_SH)


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
        # CPU: one GEMM pair per expert that has rows. The host copy of the counts is the only
        # sync; experts with no rows cost nothing, which is what makes small-batch decode cheap.
        outs = []
        start = 0
        for e, n in enumerate(counts_E.tolist()):
            if n:
                outs.append(self.expert_forward(e, x_SD[start:start + n]))
                start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)

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
