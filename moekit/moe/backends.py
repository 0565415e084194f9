"""Expert-execution backends: how one MoE layer runs its experts once routing has decided.

The layer owns routing, the shared expert and the statistics; everything between the router's
top-k and the combined [T, D] output is a backend's job. A backend is registered by name with a
priority; `select` takes the first registered backend whose `applies` accepts the call (device,
dtype, ISA tier of the kernels, grad mode, the experts module and dispatcher it would run). A new
way of running experts (quantized, offloaded, another ISA, expert-parallel) is a new registered
backend (or a new experts module / dispatcher that the generic `torch` backend runs), never a new
branch in `MoELayer.forward` (cf. transformers' ExpertsInterface, vLLM's modular fused_moe).

Forcing, for tests and benchmarks: `layer.backend = "name"` (one layer), `set_backend(model, name)`
(every MoE layer), or `MOEKIT_EXPERT_BACKEND=name` (process-wide; read on every call). A forced
backend that cannot run the call is an error that says why, never a silent fallback.

Built-in backends, in selection order:
- `masked`: dynamic-k / budget routing (some slots unused): drops the unused slots, then runs the
  rest like `skip` does (moekit.memory.skip, registered ahead of it, honours the mask too).
- `cpu-packed`: CPU inference on weights packed by `pack_experts` (one outer-product kernel call).
- `cpu-quant` (registered by moekit.quant.backend): quantized experts (int8 / int4 / MXFP4) at decode
  sizes, integer dot products on the packed codes in one kernel call.
- `cpu-fused-topk`: CPU inference at decode sizes: grouping, experts and combine in one kernel call.
- `cpu-grouped`: CPU inference: dispatch, small experts in the compiled kernel and big ones in
  oneDNN/MKL, fused weighted combine.
- `torch`: dispatch -> experts module -> combine with PyTorch ops; any device, autograd, capacity
  drops, any experts module (quantized too) and any dispatcher (expert-parallel too).
- `reference`: the per-expert loop every other backend is tested against (only when forced).

Shape legend: T tokens, D model dim, K experts per token, S rows grouped by expert, E experts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from moekit import kernels
from moekit.errors import MoekitError
from moekit.moe.dispatch import Dispatched, loop_reference
from moekit.moe.experts import GroupedExperts, _inference

if TYPE_CHECKING:
    from moekit.moe.layer import MoELayer

ENV = "MOEKIT_EXPERT_BACKEND"


@dataclass
class ExpertCall:
    """One layer's expert computation: what every backend receives."""

    layer: "MoELayer"
    x_TD: torch.Tensor
    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    """float32 combine weights (routing math stays in float32)."""
    packed: object = None
    """The packed expert weights `cpu-packed` found while checking the call (reused by its run)."""
    mask_TK: torch.Tensor | None = None
    """Dynamic-k / budget routing: the slots that run (unused ones carry weight 0); None: all."""

    @property
    def cfg(self):
        return self.layer.cfg

    @property
    def experts(self) -> nn.Module:
        return self.layer.experts

    @property
    def local(self) -> bool:
        """All experts live in this process (no expert-parallel dispatcher)."""
        return getattr(self.layer.dispatcher, "local", True)

    @property
    def no_grad(self) -> bool:
        """No autograd graph would be built through the experts or the combine weights."""
        if torch.is_grad_enabled() and self.topk_weights_TK.requires_grad:
            return False
        return _inference(self.x_TD, self.experts)


class ExpertBackend:
    """Runs the experts of one layer for one call. Subclasses set `name` and implement `why_not`
    (a cheap check without side effects) and `run`."""

    name: str = ""

    def why_not(self, call: ExpertCall) -> str | None:
        """None when this backend can run `call`, else a short reason (shown when forced)."""
        raise NotImplementedError

    def applies(self, call: ExpertCall) -> bool:
        return self.why_not(call) is None

    def run(self, call: ExpertCall) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (out_TD in x's dtype, dropped assignments as an int64 scalar)."""
        raise NotImplementedError

    uses_kernels = False
    """Runs moekit's compiled CPU kernels (its description then names their ISA tier)."""

    def describe(self) -> str:
        """Name plus what it runs on now (the compiled kernels' ISA tier for kernel backends)."""
        return f"{self.name}[{kernels.tier()}]" if self.uses_kernels else self.name


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=x.device)


def local_cpu_inference(call: ExpertCall, experts_type: type) -> str | None:
    """Common preconditions of the CPU inference backends: CPU tokens, experts of `experts_type`, all
    of them in this process, no autograd. None when met, else the reason."""
    if not call.x_TD.is_cpu:
        return "tokens are not on the CPU"
    if not isinstance(call.experts, experts_type):
        return f"experts are {type(call.experts).__name__}, not {experts_type.__name__}"
    if not call.local:
        return "the dispatcher is not local (expert parallel)"
    if not call.no_grad:
        return "autograd is recording (inference-only backend)"
    return None


def _local_cpu_grouped(call: ExpertCall) -> str | None:
    return local_cpu_inference(call, GroupedExperts)


def dropless_output_weights(call: ExpertCall) -> str | None:
    if call.cfg.capacity_factor is not None:
        return "capacity-factor dispatch drops rows (kernel is dropless)"
    if call.cfg.weight_on_input:
        return "weights are applied on the expert input (Llama 4 style)"
    return None


class ReferenceBackend(ExpertBackend):
    name = "reference"

    def why_not(self, call):
        if not call.local:
            return "the per-expert loop needs every expert in this process"
        return None

    def run(self, call):
        out = loop_reference(call.x_TD, call.topk_ids_TK, call.topk_weights_TK, call.experts, call.cfg.weight_on_input)
        return out, _zero(call.x_TD)


class CpuPackedBackend(ExpertBackend):
    name = "cpu-packed"
    uses_kernels = True

    def why_not(self, call):
        r = _local_cpu_grouped(call) or dropless_output_weights(call)
        if r:
            return r
        call.packed = call.experts.packed_for(call.x_TD)
        if call.packed is None:
            return ("no packed copy for these rows (call moekit.pack_experts(model); rows must be the packed "
                    "dtype, or fp32 on bf16 weights)")
        return None

    def run(self, call):
        packed = call.packed if call.packed is not None else call.experts.packed_for(call.x_TD)
        out = kernels.moe_experts_topk_packed(call.x_TD, call.topk_ids_TK, call.topk_weights_TK, packed)
        return out.to(call.x_TD.dtype), _zero(call.x_TD)


class CpuFusedTopkBackend(ExpertBackend):
    name = "cpu-fused-topk"
    uses_kernels = True

    def why_not(self, call):
        r = _local_cpu_grouped(call) or dropless_output_weights(call)
        if r:
            return r
        ex = call.experts
        if getattr(ex, "b13", None) is not None:
            return "the experts have biases (gpt-oss); the fused kernel has none"
        if not kernels.fused_ok(call.x_TD, ex.act, ex, ex.w13, ex.w2):
            return (f"not a kernel call: {call.x_TD.shape[0]} tokens > {kernels.max_rows(call.x_TD.dtype)} rows, "
                    "or dtypes/kernels unavailable")
        return None

    def run(self, call):
        ex = call.experts
        out = kernels.moe_experts_topk(call.x_TD, call.topk_ids_TK, call.topk_weights_TK, ex.w13, ex.w2, ex.act)
        return out.to(call.x_TD.dtype), _zero(call.x_TD)


def _dispatch(call: ExpertCall):
    """Prepare: rows grouped by expert. Under CPU autocast, cast the tokens once before the gather
    (autocast would cast every expert's rows on their way into its GEMM; this also halves the rows
    the gather moves)."""
    x_in_TD = call.x_TD
    if x_in_TD.dtype == torch.float32 and x_in_TD.is_cpu and torch.is_autocast_enabled("cpu"):
        x_in_TD = x_in_TD.to(torch.get_autocast_dtype("cpu"))
    return call.layer.dispatcher.dispatch(x_in_TD, call.topk_ids_TK, call.topk_weights_TK, call.cfg.weight_on_input)


class CpuGroupedBackend(ExpertBackend):
    name = "cpu-grouped"
    uses_kernels = True

    def why_not(self, call):
        return _local_cpu_grouped(call)

    def run(self, call):
        d = _dispatch(call)
        w_S = torch.ones_like(d.weights_S) if d.weights_applied else d.weights_S
        out = call.experts.forward_combine(d.x_SD, d.counts_E, d.rows_S, w_S, d.num_tokens, d.top_k)
        return out.to(call.x_TD.dtype), d.dropped



class TorchBackend(ExpertBackend):
    name = "torch"

    def why_not(self, call):
        return None

    def run(self, call):
        d = _dispatch(call)
        y_SD = call.experts(d.x_SD, d.counts_E)
        return call.layer.dispatcher.combine(y_SD, d), d.dropped


def run_kept(call: ExpertCall, keep_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    """Run only the assignments `keep_TK` marks (rows sorted by expert), combine with `w_TK`:
    -> out_TD in x's dtype. Shared by the `masked` backend and expert skipping. Autograd works
    through the generic path (dispatch by indexing, experts module, dispatcher.combine)."""
    ids_TK, x_TD = call.topk_ids_TK, call.x_TD
    T, K = ids_TK.shape
    ex = call.experts
    ids_A, w_A, keep_A = ids_TK.reshape(-1), w_TK.reshape(-1), keep_TK.reshape(-1)
    order_A = torch.argsort(ids_A, stable=True)
    rows_S = order_A[keep_A[order_A]]
    counts_E = torch.bincount(ids_A[keep_A], minlength=ex.num_experts)
    weights_S = w_A[rows_S]
    x_SD = x_TD[rows_S // K]
    zero = _zero(x_TD)
    if call.cfg.weight_on_input:
        x_SD = x_SD * weights_S.to(x_SD.dtype).unsqueeze(-1)
        d = Dispatched(x_SD, counts_E, rows_S, weights_S, T, K, zero, True)
        return call.layer.dispatcher.combine(ex(x_SD, counts_E), d)
    if isinstance(ex, GroupedExperts) and x_TD.is_cpu and call.no_grad:
        return ex.forward_combine(x_SD, counts_E, rows_S, weights_S, T, K).to(x_TD.dtype)
    d = Dispatched(x_SD, counts_E, rows_S, weights_S, T, K, zero)
    return call.layer.dispatcher.combine(ex(x_SD, counts_E), d)


class MaskedBackend(ExpertBackend):
    """Dynamic-k / budget routing (`moekit.moe.cost`): runs only the slots the router marked as
    used, so tokens that need fewer experts cost fewer FLOPs. Inference and training."""

    name = "masked"

    def why_not(self, call):
        if call.mask_TK is None or bool(call.mask_TK.all()):
            return "no variable-k routing on this call (every slot runs)"
        if not call.local:
            return "the dispatcher is not local (expert parallel)"
        if call.cfg.capacity_factor is not None:
            return "capacity-factor dispatch"
        return None

    def run(self, call):
        return run_kept(call, call.mask_TK, call.topk_weights_TK.float()), _zero(call.x_TD)


_REGISTRY: list[tuple[int, ExpertBackend]] = []


def register(backend: ExpertBackend, priority: int, auto: bool = True) -> ExpertBackend:
    """Add a backend; higher priority is tried first. `auto=False` backends run only when forced."""
    if not backend.name:
        raise ValueError("an expert backend needs a name")
    unregister(backend.name)
    _REGISTRY.append((priority if auto else -10**9, backend))
    _REGISTRY.sort(key=lambda pb: -pb[0])
    return backend


def unregister(name: str) -> None:
    _REGISTRY[:] = [(p, b) for p, b in _REGISTRY if b.name != name]


def names() -> list[str]:
    """Registered backend names, in selection order."""
    return [b.name for _, b in _REGISTRY]


def get(name: str) -> ExpertBackend:
    for _, b in _REGISTRY:
        if b.name == name:
            return b
    raise MoekitError(f"unknown expert backend {name!r}; registered: {', '.join(names())}")


def forced_name(layer: "MoELayer") -> str | None:
    """The backend forced for this layer (layer attribute, then the environment), or None."""
    if getattr(layer, "use_reference", False):
        return "reference"
    name = getattr(layer, "backend", None) or os.environ.get(ENV, "").strip() or None
    return None if name in (None, "auto") else name


def select(call: ExpertCall) -> ExpertBackend:
    """The backend that runs `call`: the forced one (which must apply), else the first that applies."""
    name = forced_name(call.layer)
    if name is not None:
        b = get(name)
        reason = b.why_not(call)
        if reason is not None:
            raise MoekitError(f"expert backend {name!r} was forced but cannot run this call: {reason}. "
                              f"Unset it (layer.backend = None / {ENV}) to choose automatically.")
        return b
    for prio, b in _REGISTRY:
        if prio > -10**9 and b.applies(call):
            return b
    raise MoekitError("no expert backend applies to this call")  # unreachable: torch always applies


def run(call: ExpertCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the backend for `call` and run it: -> (out_TD, dropped)."""
    return select(call).run(call)


def set_backend(model: nn.Module, name: str | None) -> int:
    """Force `name` (None: automatic) on every MoE layer of `model`; returns how many layers."""
    if name is not None and name != "auto":
        get(name)
    n = 0
    for m in model.modules():
        if hasattr(m, "dispatcher") and hasattr(m, "experts") and hasattr(m, "router"):
            m.backend = None if name == "auto" else name
            n += 1
    return n


def would_use(layer: "MoELayer", tokens: int, dtype: torch.dtype | None = None, grad: bool = False,
              device: str | torch.device = "cpu") -> str:
    """The backend (with its tier) a layer would pick for `tokens` tokens: for `moekit doctor`."""
    ex = layer.experts
    dt = dtype or next(iter([*ex.parameters(), layer.router.weight])).dtype  # quantized experts: no parameters
    x = torch.zeros(tokens, getattr(ex, "dim", layer.router.weight.shape[-1]), dtype=dt, device=device)
    k = layer.cfg.top_k
    ids = (torch.arange(tokens * k, device=device) % layer.cfg.num_experts).view(tokens, k)
    w = torch.full((tokens, k), 1.0 / k, device=device)
    ctx: Callable = torch.enable_grad if grad else torch.no_grad
    with ctx():
        if grad:
            x.requires_grad_(True)
        return select(ExpertCall(layer, x, ids, w)).describe()


register(MaskedBackend(), 900)
register(CpuPackedBackend(), 400)
register(CpuFusedTopkBackend(), 300)
register(CpuGroupedBackend(), 200)
register(TorchBackend(), 100)
register(ReferenceBackend(), 0, auto=False)
