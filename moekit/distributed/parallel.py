"""Process groups, the (dp, ep) DeviceMesh, expert sharding and full (single-file) state dicts.

Shape legend: E global experts, El = E / ep local experts, H = 2F fused gate/up width, D model dim.

Layout: world = dp * ep ranks on a 2-D DeviceMesh ("dp", "ep"). Along "ep", each rank holds a
contiguous 1/ep of every MoE layer's stacked expert weights (dim 0, `Shard(0)` in DTensor terms);
along "dp", ranks with the same ep index hold the same experts and see different data. Everything
else (attention, router, embeddings, shared experts) is replicated on all ranks and data-parallel
over the whole world. Checkpoints gather the experts back to the single-file layout, so a run
saved at any EP degree reloads at any other (or in one process).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.ep import EPDispatcher
from moekit.errors import MoekitError


class DistributedError(MoekitError, ValueError):
    """A parallel layout that cannot work (EP degree, world size, expert count)."""


EXPERT_PARAM_SUFFIXES = (".experts.w13", ".experts.w2")


def is_expert_param(name: str) -> bool:
    return name.endswith(EXPERT_PARAM_SUFFIXES)


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment): gloo on CPU, NCCL when CUDA is available. Returns (rank, world size); (0, 1)
    when not launched by torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Layout:
    """This rank's place in the (dp, ep) mesh."""

    mesh: object
    """torch DeviceMesh with dims ("dp", "ep")."""
    ep: int
    dp: int
    ep_rank: int
    dp_rank: int

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world(self) -> int:
        return self.ep * self.dp


def make_layout(ep: int, device_type: str | None = None) -> Layout:
    """A ("dp", "ep") DeviceMesh over the initialised world; ep must divide the world size."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if ep < 1 or world % ep:
        raise DistributedError(f"--ep {ep} must divide the number of processes ({world}); launch "
                               f"torchrun --nproc-per-node a multiple of {ep}")
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    return Layout(mesh, ep, world // ep, mesh.get_local_rank("ep"), mesh.get_local_rank("dp"))


def apply_expert_parallel(model: nn.Module, layout: Layout, placement=None) -> nn.Module:
    """Keep only this rank's slice of every MoE layer's experts and install the all-to-all
    dispatcher. The model (a Transformer, or any module holding MoE layers) must hold the full
    expert weights, the same on every rank.

    placement: an `eplb.Placement` over the MoE layers (in order) for redundant replicas of hot
    experts: this rank then holds the weights of its physical slots (inference and analysis; the
    training step does not yet sum replica gradients)."""
    from moekit.moe.layer import MoELayer

    P, r = layout.ep, layout.ep_rank
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for i, layer in enumerate(layers):
        ex = layer.experts
        E = layer.cfg.num_experts
        if placement is None:
            if E % P:
                raise DistributedError(f"num_experts={E} is not divisible by --ep {P}; choose an EP degree "
                                       f"that divides {E}")
            mine = torch.arange(r * (E // P), (r + 1) * (E // P))
            pl = None
        else:
            R = placement.phy2log.shape[1]
            if R % P or placement.phy2log.shape[0] != len(layers):
                raise DistributedError(f"placement has {placement.phy2log.shape[0]} layers x {R} slots; need "
                                       f"{len(layers)} layers and slots divisible by --ep {P}")
            mine = placement.phy2log[i, r * (R // P):(r + 1) * (R // P)]
            pl = {"phy2log": placement.phy2log[i], "log2phy": placement.log2phy[i], "logcnt": placement.logcnt[i]}
        with torch.no_grad():
            ex.w13 = nn.Parameter(ex.w13.detach()[mine].clone())
            ex.w2 = nn.Parameter(ex.w2.detach()[mine].clone())
        ex.num_experts = mine.numel()
        ex.unpack()
        layer.dispatcher = EPDispatcher(layer.cfg, layout.ep_group, r, P, pl)
    model.ep_layout = layout
    return model


def logical_experts(layer, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """The full [E, ...] w13 and w2 of an EP layer (collective), from the first replica of each."""
    w13, w2 = gather_experts(layer.experts.w13.detach(), layout), gather_experts(layer.experts.w2.detach(), layout)
    d = layer.dispatcher
    if getattr(d, "log2phy", None) is None:
        return w13, w2
    first = d.log2phy[:, 0]
    return w13[first], w2[first]


def rebalance_model(model: nn.Module, placement) -> nn.Module:
    """Move expert weights to a new placement at run time (collective): every rank rebuilds the
    logical experts from the current slots (all_gather over the EP group), then keeps its new
    slots. Simple rather than minimal: a production version sends only the slots that move."""
    from moekit.moe.layer import MoELayer

    layout = model.ep_layout
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        w13, w2 = logical_experts(layer, layout)
        with torch.no_grad():
            layer.experts.w13 = nn.Parameter(w13)
            layer.experts.w2 = nn.Parameter(w2)
    return apply_expert_parallel(model, layout, placement)


def gather_experts(t_local: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Concatenate the EP ranks' dim-0 shards (all ranks get the full tensor)."""
    parts = [torch.empty_like(t_local) for _ in range(layout.ep)]
    dist.all_gather(parts, t_local.contiguous(), group=layout.ep_group)
    return torch.cat(parts, 0)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-process state dict of an EP model (collective: every rank must call it)."""
    layout = getattr(model, "ep_layout", None)
    sd = model.state_dict()
    if layout is None:
        return sd
    mods, full = dict(model.named_modules()), {}
    out = {}
    for k, v in sd.items():
        if not is_expert_param("." + k):
            out[k] = v
            continue
        prefix, name = k.rsplit("experts.", 1)
        if prefix not in full:  # both stacks of a layer in one go (logical experts, replicas folded)
            full[prefix] = dict(zip(("w13", "w2"), logical_experts(mods[prefix.rstrip(".")], layout)))
        out[k] = full[prefix][name]
    return out


def shard_state_dict(sd: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """This rank's view of a full state dict (the inverse of `full_state_dict`)."""
    out = {}
    for k, v in sd.items():
        if is_expert_param("." + k):
            El = v.shape[0] // layout.ep
            v = v[layout.ep_rank * El:(layout.ep_rank + 1) * El]
        out[k] = v
    return out


class FullModelView:
    """What `save_model` needs (state_dict, config) for the gathered single-file checkpoint."""

    def __init__(self, model: nn.Module, sd: dict[str, torch.Tensor]):
        self.config, self._sd = model.config, sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._sd


def save_full(model: nn.Module, path) -> None:
    """Gather an EP model and write it (rank 0 only) as a normal moekit model directory."""
    from moekit.checkpoint.native import save_model

    sd = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_model(FullModelView(model, sd), path)
    if dist.is_initialized():
        dist.barrier()
