"""What `moekit train` does differently under torchrun with --ep: data sharding, gradient
synchronisation, a global gradient-norm clip, rank-0-only outputs and gathered checkpoints.

Gradients (world W = dp * ep ranks, each with B/W rows of every batch, loss = mean over its rows):
- replicated parameters: all-reduce the sum over the world, divide by W (= the gradient of the
  global mean loss, what one process on the whole batch computes);
- expert shards: the all-to-all backward already summed every rank of the EP group into the owner;
  all-reduce over the "dp" dim (ranks holding the same experts) and divide by W.
One flat, coalesced all_reduce per group (torch's own bucketing idea). DDP's module wrapper is not
used: the trainer reads `model.config`, `model.moe_layers()` and friends directly, and the expert
shards need a different reduction than the rest, which DDP cannot express for one module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moekit.distributed.parallel import (FullModelView, Layout, apply_expert_parallel, full_state_dict,
                                         gather_experts, init_from_env, is_expert_param, make_layout,
                                         shard_state_dict)


class _OptView:
    def __init__(self, sd):
        self._sd = sd

    def state_dict(self):
        return self._sd


class TrainParallel:
    """The trainer's hooks for a (dp, ep) run; every method is collective unless noted."""

    def __init__(self, layout: Layout, model, eplb_schedule=None):
        self.layout, self.model, self.eplb = layout, model, eplb_schedule
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.writer = self.rank == 0
        self._index_params()
        self.balancedness: list[float] = []
        """Per MoE layer, last step: mean/max tokens per EP rank (logged in metrics.jsonl)."""

    def _index_params(self) -> None:
        names = dict(self.model.named_parameters())
        self.expert = [p for n, p in names.items() if is_expert_param("." + n)]
        self.dense = [p for n, p in names.items() if not is_expert_param("." + n)]
        self._expert_ids = {id(p) for p in self.expert}

    # ------------------------------------------------------------------ data
    def shard(self, *batch_BS: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a global batch (not collective)."""
        B = batch_BS[0].shape[0]
        if B % self.world:
            from moekit.train.trainer import TrainError

            raise TrainError(f"--batch-size {B} must be divisible by the number of processes ({self.world})")
        b = B // self.world
        return tuple(t[self.rank * b:(self.rank + 1) * b] for t in batch_BS)

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def reduce_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Global per-expert loads (aux-loss-free bias updates must see every rank's tokens)."""
        if not loads:
            return loads
        flat = torch.stack(loads)
        dist.all_reduce(flat)
        # SGLang balancedness per layer of this step at this EP degree and the current placement
        # (replicas assumed to split their expert's tokens evenly).
        from moekit.distributed.rebalance import moe_layers

        bal = []
        for load_E, layer in zip(flat.double(), moe_layers(self.model)):
            d = layer.dispatcher
            if getattr(d, "log2phy", None) is None:
                per_rank = load_E.view(self.layout.ep, -1).sum(-1)
            else:
                per_rank = (load_E / d.logcnt.double())[d.phy2log].view(self.layout.ep, -1).sum(-1)
            bal.append(round(float(per_rank.mean() / per_rank.max().clamp(min=1)), 5))
        self.balancedness = bal
        return list(flat.unbind(0))

    # ------------------------------------------------------------- gradients
    def _all_reduce(self, params, group) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        if group is not None:
            dist.all_reduce(flat, group=group)
        flat /= self.world
        for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)

    def sync_grads(self) -> None:
        from moekit.distributed.rebalance import fold_replica_grads

        fold_replica_grads(self.model, self.layout)  # replicas of one expert: the sum of their gradients
        self._all_reduce(self.dense, dist.group.WORLD)
        self._all_reduce(self.expert, self.layout.dp_group if self.layout.dp > 1 else None)

    def clip_grad_norm(self, max_norm: float) -> float:
        """torch's clip_grad_norm_ over the *global* model: replicated grads counted once, each
        expert shard once."""
        def sq(ps):
            return sum((p.grad.double().pow(2).sum() for p in ps if p.grad is not None), torch.zeros((), dtype=torch.float64))

        from moekit.distributed.rebalance import expert_sq_norm

        ex = expert_sq_norm(self.model, self.layout)  # each logical expert once, replicas or not
        dist.all_reduce(ex, group=self.layout.ep_group)
        total = float((sq(self.dense) + ex).sqrt())
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for p in self.dense + self.expert:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return total

    # ------------------------------------------------------------ checkpoints
    def _full_optimizer(self, opt) -> dict[str, Any]:
        from moekit.distributed.rebalance import moe_layers

        sd = opt.state_dict()
        params = [p for g in opt.param_groups for p in g["params"]]
        first = {}  # expert param -> first replica slot of each logical expert (EPLB placements)
        for layer in moe_layers(self.model):
            d = layer.dispatcher
            for p in (layer.experts.w13, layer.experts.w2):
                first[id(p)] = None if getattr(d, "log2phy", None) is None else d.log2phy[:, 0]
        state = {}
        for idx, st in sd["state"].items():
            pid = id(params[idx])
            state[idx] = {}
            for k, v in st.items():
                if pid in self._expert_ids and torch.is_tensor(v) and v.dim() > 0:
                    v = gather_experts(v, self.layout)
                    v = v if first[pid] is None else v[first[pid]]
                state[idx][k] = v
        return {"state": state, "param_groups": sd["param_groups"]}

    def save_checkpoint(self, out: Path, step: int, model, opt, state: dict[str, Any], tokenizer_path) -> Path:
        """Gather experts and their AdamW moments; rank 0 writes the single-process layout."""
        from moekit.train.state import save_checkpoint

        msd, osd = full_state_dict(model), self._full_optimizer(opt)
        ck = Path(out) / "checkpoints" / f"step-{step:07d}"
        if self.writer:
            ck = save_checkpoint(out, step, FullModelView(model, msd), _OptView(osd), state, tokenizer_path)
        dist.barrier()
        return ck

    def load_checkpoint(self, ck: Path, model, opt) -> dict[str, Any]:
        """Load a single-process checkpoint into this rank's shard (any EP degree wrote it)."""
        from moekit.checkpoint.native import read_safetensors
        from moekit.train.state import load_optimizer

        state = json.loads((ck / "trainer_state.json").read_text())
        P = self.layout.ep
        expected = {k: (torch.Size([v.shape[0] * P, *v.shape[1:]]) if is_expert_param(k) else v.shape)
                    for k, v in model.state_dict().items()}
        model.load_state_dict(shard_state_dict(read_safetensors(ck / "model.safetensors", expected), self.layout))
        params = [p for g in opt.param_groups for p in g["params"]]
        load_optimizer(opt, ck / "optimizer.safetensors", state["param_groups"])
        r, P = self.layout.ep_rank, self.layout.ep
        for p in params:
            if id(p) in self._expert_ids:
                for k, v in opt.state[p].items():
                    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == p.shape[0] * P:
                        opt.state[p][k] = v[r * p.shape[0]:(r + 1) * p.shape[0]].clone()
        with safe_open(str(ck / "rng.safetensors"), framework="pt") as f:
            torch.set_rng_state(f.get_tensor("torch_cpu"))
        return state

    def after_step(self, step: int, loads: list[torch.Tensor], opt) -> None:
        """EPLB at run time: record this step's global loads; every `interval` steps move the
        experts (weights and AdamW moments) to a placement computed from the window."""
        if self.eplb is None or not loads:
            return
        from moekit.distributed.rebalance import move_to_placement

        self.eplb.observe(loads)
        if self.eplb.due(step):
            E = loads[0].numel()
            move_to_placement(self.model, self.layout, self.eplb.placement(E, self.layout.ep), opt)
            self.eplb.placements += 1
            self._index_params()

    def close(self) -> None:
        dist.barrier()
        dist.destroy_process_group()


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks (files rank 0 creates are then in place); joins
    torchrun's process group if launched by it."""
    rank, world = init_from_env()
    if world > 1 and rank != 0:
        dist.barrier()
    out = fn()
    if world > 1 and rank == 0:
        dist.barrier()
    return out


def setup(model, ep: int, eplb_interval: int = 0, eplb_window: int = 0,
          eplb_redundant: int = 0) -> tuple[Any, TrainParallel | None]:
    """Join torchrun's process group and shard `model`'s experts over `ep` ranks; (model, None)
    for a plain single-process run. eplb_interval > 0: rebalance the experts every that many
    steps from the loads of the last `eplb_window` steps (0 = all since the start), with
    `eplb_redundant` extra replica slots."""
    rank, world = init_from_env()
    if world == 1:
        if ep != 1:
            from moekit.train.trainer import TrainError

            raise TrainError(f"--ep {ep} needs {ep} processes: launch with torchrun --nproc-per-node {ep} -m moekit "
                             "train ...")
        return model, None
    layout = make_layout(ep)
    model = apply_expert_parallel(model, layout)
    from moekit.distributed.rebalance import EPLBSchedule

    sched = EPLBSchedule(eplb_interval, eplb_window, eplb_redundant) if eplb_interval > 0 else None
    return model, TrainParallel(layout, model, sched)
