"""Expert-parallel inference: `moekit generate/bench --ep N` under torchrun.

Shape legend: T tokens of the (replicated) batch, Tr = this rank's share of them, R = the largest
share (all_gather padding), D model dim,
K experts per token, B batch rows, P = ep ranks.

Layout ("replicated batch, sharded experts"): every rank holds the whole model except the experts
(1/P of each MoE layer's, as in training) and runs the *same* prompts: attention, router, shared
experts and the KV cache are replicated. Inside each MoE layer every rank would otherwise send the
same T tokens, so the owner of an expert would compute each token P times; instead rank r sends
only its contiguous share of the T tokens (`token_share`, possibly none: a decode step of one row
at EP=2 leaves a rank without tokens), the all-to-all dispatcher (`moekit.distributed.ep`) runs
them on their experts' owners, and the combined [Tr, D] outputs are all-gathered so every rank
continues with all T rows. Contiguous shares keep the global token order rank-major, so capacity
drops equal one process's too.

Tokens: sampled on every rank from the same seed (so every rank's generator advances alike), then
rank 0's are broadcast (`EPEngine.sync_tokens`): rank 0 is authoritative, so the ranks cannot drift
apart even where their logits differ in the last bit (another GPU, a nondeterministic kernel); a
divergence would otherwise desynchronise the batch (and the stop checks) between ranks. It costs
one broadcast of B int64 per step.

Production engines (DeepSeek's, SGLang's "DP attention") instead give each rank different
requests for attention; that needs a request scheduler across ranks and is not done here.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.ep import COMM, EPDispatched, EPDispatcher
from moekit.distributed.parallel import DistributedError, Layout, apply_expert_parallel, init_from_env, make_layout
from moekit.inference.engine import Engine

EXTRA = {"gather_s": 0.0, "gather_calls": 0, "bcast_s": 0.0}
"""This process's time in the inference-only collectives: the all_gather of MoE outputs and the
token broadcast (the all-to-alls are in `moekit.distributed.ep.COMM`)."""


def token_share(T: int, P: int, r: int) -> tuple[int, int]:
    """[lo, hi) of the T replicated tokens that rank r dispatches (contiguous, sizes differ by <= 1)."""
    return r * T // P, (r + 1) * T // P


def _as_wire(x: torch.Tensor) -> torch.Tensor:
    # gloo has no bf16/fp16 collectives here: move the same bytes as uint8 (as ep.all_to_all does).
    return x.view(torch.uint8) if x.dtype in (torch.bfloat16, torch.float16) else x


class ReplicatedEPDispatcher(EPDispatcher):
    """`EPDispatcher` for a batch that every rank of the EP group holds in full: dispatch sends
    only this rank's `token_share`, combine all-gathers the shares back to [T, D]."""

    def dispatch(self, x_TD, topk_ids_TK, topk_weights_TK, weight_on_input=False) -> EPDispatched:
        T = x_TD.shape[0]
        lo, hi = token_share(T, self.ep_size, self.ep_rank)
        d = super().dispatch(x_TD[lo:hi], topk_ids_TK[lo:hi], topk_weights_TK[lo:hi], weight_on_input)
        d.replicated_tokens = T
        return d

    def combine(self, y_SD: torch.Tensor, d: EPDispatched) -> torch.Tensor:
        y_TrD = super().combine(y_SD, d)
        T, P = d.replicated_tokens, self.ep_size
        # 1. pad every share to the largest (gloo's all_gather takes equal sizes); 2. gather; 3. trim.
        bounds = [token_share(T, P, r) for r in range(P)]
        rows = max(hi - lo for lo, hi in bounds)
        pad_RD = y_TrD.new_zeros(rows, y_TrD.shape[-1])
        pad_RD[:y_TrD.shape[0]] = y_TrD
        wire = _as_wire(pad_RD)
        parts = [torch.empty_like(wire) for _ in range(P)]
        t0 = time.perf_counter()
        dist.all_gather(parts, wire, group=self.group)
        EXTRA["gather_s"] += time.perf_counter() - t0
        EXTRA["gather_calls"] += 1
        parts = [p.view(y_TrD.dtype)[:hi - lo] for p, (lo, hi) in zip(parts, bounds)]
        return torch.cat(parts, 0)


def apply_inference_ep(model: nn.Module, layout: Layout, placement=None) -> nn.Module:
    """Shard the experts over the EP group (`apply_expert_parallel`) and install the replicated-batch
    dispatcher; the model must hold the full weights, the same on every rank."""
    from moekit.moe.layer import MoELayer

    if layout.dp != 1:
        raise DistributedError(f"EP inference runs with --ep equal to the number of processes ({layout.world}); "
                               "data-parallel replicas are not supported")
    model = apply_expert_parallel(model, layout, placement)
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        d = layer.dispatcher
        pl = None if d.log2phy is None else {"phy2log": d.phy2log, "log2phy": d.log2phy, "logcnt": d.logcnt}
        layer.dispatcher = ReplicatedEPDispatcher(d.cfg, d.group, d.ep_rank, d.ep_size, pl)
    return model


def _noop(row: int, tok: int) -> None:
    return None


def _comm() -> tuple[float, float, int]:
    return COMM["seconds"], EXTRA["gather_s"], COMM["bytes"]


class EPEngine(Engine):
    """`Engine` over an expert-parallel model, one per rank, all ranks calling `generate` with the
    same prompts and sampling parameters. Records each forward's time inside the collectives
    (`comm_steps`: prefill first, then one entry per decode step)."""

    def __init__(self, model, **kw):
        if getattr(model, "ep_layout", None) is None:
            raise DistributedError("EPEngine needs a model from apply_inference_ep")
        super().__init__(model, **kw)
        self.layout: Layout = model.ep_layout
        self.comm_steps: list[dict] = []

    def generate(self, prompts, params=None, on_token=None, time_steps=False):
        # Every rank must take the same branches of the decode loop (the stop check runs each step
        # when a callback is given, else every `check_every` steps): give all ranks a callback.
        self.comm_steps = []
        return super().generate(prompts, params, on_token or _noop, time_steps)

    def _timed(self, fn, *args):
        a0, g0, b0 = _comm()
        t0 = time.perf_counter()
        out = fn(*args)
        a1, g1, b1 = _comm()
        self.comm_steps.append({"forward_s": time.perf_counter() - t0, "a2a_s": a1 - a0, "gather_s": g1 - g0,
                                "a2a_bytes": b1 - b0, "bcast_s": 0.0})
        return out

    def prefill(self, cache, ids_BS, lens_B):
        return self._timed(super().prefill, cache, ids_BS, lens_B)

    def decode_step(self, cache, tok_B):
        return self._timed(super().decode_step, cache, tok_B)

    def sync_tokens(self, tok_B: torch.Tensor) -> torch.Tensor:
        """Rank 0's tokens on every rank of the EP group."""
        t0 = time.perf_counter()
        dist.broadcast(tok_B, src=dist.get_global_rank(self.layout.ep_group, 0), group=self.layout.ep_group)
        dt = time.perf_counter() - t0
        EXTRA["bcast_s"] += dt
        if self.comm_steps:
            self.comm_steps[-1]["bcast_s"] += dt
        return tok_B


def setup_inference(ep: int, command: str, device: str = "cpu") -> tuple[int, int]:
    """Join torchrun's process group for `moekit COMMAND --ep N`; (rank, world). Raises a
    DistributedError naming the fix when the launch does not match --ep. The backend follows the
    model's device: gloo for a CPU model (`generate`/`bench` run on the CPU) even where CUDA is
    present, NCCL for a CUDA one."""
    if ep < 1:
        raise DistributedError(f"--ep must be >= 1 (got {ep})")
    rank, world = init_from_env("gloo" if device == "cpu" else "nccl")
    if world == 1 and ep != 1:
        raise DistributedError(f"--ep {ep} needs {ep} processes: launch with torchrun --nproc-per-node {ep} "
                               f"-m moekit {command} ... --ep {ep}")
    if world != ep:
        raise DistributedError(f"launched with {world} processes but --ep {ep}: EP inference needs --ep equal to "
                               f"the number of processes (torchrun --nproc-per-node {world} ... --ep {world})")
    return rank, world


def shard_for_inference(model: nn.Module, ep: int, keep_full: bool = False):
    """(EP model, full copy or None): the rank's experts only, the replicated-batch dispatcher."""
    full = copy.deepcopy(model) if keep_full else None
    return apply_inference_ep(model, make_layout(ep)), full
