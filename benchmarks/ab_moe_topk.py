"""A/B of the fused top-k expert kernel between two checkouts, same machine, alternating processes.

    git worktree add --detach /tmp/old REV
    for i in 1 2; do python benchmarks/ab_moe_topk.py /tmp/old; python benchmarks/ab_moe_topk.py .; done

Times `moekit.kernels.moe_experts_topk` at one token (decode) on a Mixtral-style bf16 block (8 experts,
D 1024, F 2816, top-2), cycling 6 weight copies (about 1 GiB) so weights stream from DRAM; prints the
median ms and the read rate of the two experts' weights.
"""

import sys
import time

import torch

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
from moekit import kernels  # noqa: E402

torch.set_num_threads(2)
E, D, F = 8, 1024, 2816
copies = 6
w13 = [torch.randn(E, 2 * F, D).to(torch.bfloat16) for _ in range(copies)]
w2 = [torch.randn(E, D, F).to(torch.bfloat16) for _ in range(copies)]
x = torch.randn(1, D).to(torch.bfloat16)
ids, w = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]])
with torch.no_grad():
    for i in range(copies):
        kernels.moe_experts_topk(x, ids, w, w13[i], w2[i], "swiglu")
    ts = []
    for r in range(60):
        i = r % copies
        t = time.perf_counter()
        kernels.moe_experts_topk(x, ids, w, w13[i], w2[i], "swiglu")
        ts.append(time.perf_counter() - t)
ts.sort()
med = ts[len(ts) // 2]
print(sys.argv[1] if len(sys.argv) > 1 else ".", f"median {med * 1e3:.3f} ms, {2 * 3 * D * F * 2 / med / 1e9:.1f} GB/s")
