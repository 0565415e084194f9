"""Cost-aware routing: per-expert costs, the settings the router applies, and the inference API.

Shape legend: T tokens, E experts, K experts per token (the most a token may run, k_max).

Costs. Every expert e has a raw cost c_e >= 0 from a pluggable `ExpertCost` source:
- `FlopsCost` ("flops"): FLOPs of one token through the expert, 2 * 3 * D * F_e for gated FFNs
  (SwiGLU/GeGLU) and 2 * 2 * D * F_e for GELU, so with heterogeneous widths (`moe.expert_dims`)
  wide experts cost more and equal widths cost the same;
- `VectorCost` (a list): a vector the caller measured or planned (latency, bytes to fetch, the
  all-to-all bytes of experts on another rank from `moekit plan`), for every layer or per MoE layer;
- `OffloadMissCost` ("offload_misses"): live telemetry of the expert-offloading cache
  (`moekit.memory.offload`), 1 for an expert not resident in its layer's cache, 0 for a resident
  one, read on every forward.

Normalisation: the router uses c_e / max_e c_e (an all-zero vector stays zero), so costs lie in
[0, 1] whatever their unit. lambda is then in the units of the router's selection score: the most
expensive expert's score is lowered by lambda (log-probability units for `topk_softmax`, which
selects on logits; probability units for `softmax_topk`; sigmoid-score units for `sigmoid_topk`).
A per-token budget is in the same normalised units: budget 1.5 = 1.5x the most expensive expert.

Selection (`moekit.moe.router.route`): experts are ranked by score (+ balancing bias) - lambda * c;
the combine weights still come from the unpenalised scores (the penalty, like DeepSeek-V3's
balancing bias, steers selection only). lambda = 0 runs exactly the plain top-k ops.

Dynamic-k (`dynamic_k = p`, top-p style, cf. arXiv 2403.07652): candidates in penalised-score order,
the first always runs; the next ones run while the router probability already covered is below p
and the candidate's probability exceeds lambda * its cost (its marginal value minus its cost is
positive); at most K. Budget mode: candidates in penalised-score order are added while the summed
normalised cost stays within the budget (at most K, the dynamic-k stop applies too); a token whose
eligible experts all exceed the budget runs its cheapest one (`set_routing_cost` refuses a budget
below the cheapest expert for static costs, so the budget then always holds).
Slots a token does not use keep a distinct candidate id with weight 0 and `mask_TK` False: every
expert backend accepts that layout (they compute the slot with weight 0), and the `masked` backend
(`moekit.moe.backends`) drops those slots before dispatch, so the experts really do less work.

Training penalty: `cost_loss` = mean over tokens of sum_e p_e c_e, the expected normalised cost of
one draw from the router's distribution p (softmax; normalised sigmoid scores for `sigmoid_topk`);
`moe.cost_loss_coef` weighs it into the loss like the balance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.config import MoEConfig
from moekit.errors import MoekitError


# ----------------------------------------------------------------------------------- FLOPs
def expert_widths(cfg: MoEConfig) -> list[int]:
    """Hidden width of each routed expert (heterogeneous with `expert_dims`)."""
    return list(cfg.expert_dims) if cfg.expert_dims else [cfg.expert_dim] * cfg.num_experts


def expert_flops(cfg: MoEConfig, dim: int) -> list[int]:
    """FLOPs of one token through each expert (real widths, not the padded storage)."""
    mult = 3 if cfg.gated else 2
    return [2 * mult * dim * w for w in expert_widths(cfg)]


def spent_flops(layer, routing) -> float:
    """Expert FLOPs one forward of an MoE layer spent: its `Routing.tokens_per_expert` (the slots
    that ran: unused dynamic-k slots excluded) times each expert's FLOPs (real widths). Computed on
    demand, so decoding pays nothing for it."""
    return float((routing.tokens_per_expert.double().cpu() * torch.tensor(layer.flops_E, dtype=torch.float64)).sum())


# ---------------------------------------------------------------------------- sources
class ExpertCost:
    """A source of per-expert raw costs. `raw` returns a float32 [E] tensor >= 0; `static` says
    whether it never changes (so a budget can be checked once, at `set_routing_cost`). `bind`
    returns the instance for one MoE layer (live sources attach to that layer's state)."""

    name = "cost"
    static = True

    def raw(self, cfg: MoEConfig, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, layer) -> "ExpertCost":
        return self


class FlopsCost(ExpertCost):
    name = "flops"

    def raw(self, cfg, dim):
        return torch.tensor(expert_flops(cfg, dim), dtype=torch.float32)


class VectorCost(ExpertCost):
    name = "vector"

    def __init__(self, values):
        v = torch.as_tensor(values, dtype=torch.float32).flatten()
        if not torch.isfinite(v).all() or (v < 0).any():
            raise MoekitError(f"expert costs must be finite and >= 0, got {v.tolist()}")
        self.values = v

    def raw(self, cfg, dim):
        if self.values.numel() != cfg.num_experts:
            raise MoekitError(f"cost vector has {self.values.numel()} entries for {cfg.num_experts} experts; "
                              "give one cost per expert")
        return self.values


class OffloadMissCost(ExpertCost):
    """1 for experts not resident in the layer's offload cache, 0 for resident ones (live)."""

    name = "offload_misses"
    static = False

    def __init__(self, cache=None):
        self.cache = cache

    def bind(self, layer) -> "OffloadMissCost":
        cache = getattr(layer.experts, "cache", None)
        if cache is None:
            raise MoekitError("cost 'offload_misses' needs offloaded experts (load with --expert-memory-budget / "
                              "moekit.memory.load_offloaded)")
        return OffloadMissCost(cache)

    def raw(self, cfg, dim):
        if self.cache is None:
            raise MoekitError("an unbound offload_misses cost: set it with "
                              "set_routing_cost(model, cost='offload_misses')")
        return torch.tensor([0.0 if self.cache.contains_ready(e) else 1.0 for e in range(cfg.num_experts)])


SOURCES = {"flops": FlopsCost, "offload_misses": OffloadMissCost}


def make_cost(spec) -> ExpertCost:
    """An `ExpertCost` from "flops", "offload_misses", a vector of numbers, or an ExpertCost."""
    if isinstance(spec, ExpertCost):
        return spec
    if isinstance(spec, str):
        if spec not in SOURCES:
            raise MoekitError(f"unknown cost source {spec!r}; choose {', '.join(SOURCES)} or give a vector")
        return SOURCES[spec]()
    return VectorCost(spec)


def config_cost(cfg: MoEConfig) -> ExpertCost:
    return VectorCost(cfg.cost_vector) if cfg.cost_source == "vector" else make_cost(cfg.cost_source)


def normalise(raw_E: torch.Tensor) -> torch.Tensor:
    """c / max(c); all zeros stay zeros (see the module docstring)."""
    top = raw_E.max()
    return raw_E / top if float(top) > 0 else raw_E


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class CostSettings:
    """An inference-time override on one router (`set_routing_cost`); None keeps the config's value.
    `budget = math.inf` turns a configured budget off."""

    lam: float | None = None
    source: ExpertCost | None = None
    budget: float | None = None
    dynamic_k: float | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class CostPlan:
    """What `route` applies on one call (already resolved: normalised costs on the logits' device)."""

    lam: float
    cost_E: torch.Tensor
    budget: float | None
    dynamic_k: float
    top_k: int

    @property
    def variable(self) -> bool:
        """Tokens may run fewer than top_k experts (dynamic-k or a budget)."""
        return self.budget is not None or self.dynamic_k > 0


def resolve(router, device=None) -> CostPlan | None:
    """The plan for one forward of `router` (None: plain routing, exactly the old ops)."""
    cfg: MoEConfig = router.cfg
    o: CostSettings = getattr(router, "cost_override", None) or CostSettings()
    lam = cfg.cost_lambda if o.lam is None else o.lam
    budget = cfg.cost_budget if o.budget is None else o.budget
    budget = None if budget is None or math.isinf(budget) else budget
    dyn = cfg.dynamic_k if o.dynamic_k is None else o.dynamic_k
    k = cfg.top_k if o.top_k is None else o.top_k
    if lam == 0 and budget is None and dyn == 0 and k == cfg.top_k and not cfg.cost_loss_coef:
        return None
    src = o.source or config_cost(cfg)
    cost_E = normalise(src.raw(cfg, router.weight.shape[1]).float())
    return CostPlan(lam, cost_E.to(device or router.weight.device), budget, dyn, k)


# -------------------------------------------------------------------------- selection
def select_variable(sel_TE: torch.Tensor, probs_TE: torch.Tensor, plan: CostPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids_TK, mask_TK) for dynamic-k / budget routing; ids are distinct per token, the
    unused slots hold the next candidates (weight 0 later)."""
    # Plan: 1. rank candidates by penalised score; 2. walk them in order deciding which run
    # (dynamic-k stop, marginal value > cost, budget); 3. used slots first, unused candidates after.
    T, E = sel_TE.shape
    K = plan.top_k
    n = E if plan.budget is not None else K
    order_TN = sel_TE.topk(n, dim=-1).indices  # sorted, descending
    p_TN = probs_TE.gather(1, order_TN)
    c_TN = plan.cost_E[order_TN]
    fin_TN = torch.isfinite(sel_TE.gather(1, order_TN))  # group-limited routing masks with -inf
    ok_TN = fin_TN.clone()
    if plan.lam > 0:  # marginal value (probability) minus cost must be positive
        ok_TN &= p_TN > plan.lam * c_TN
    take_TN = torch.zeros(T, n, dtype=torch.bool, device=sel_TE.device)
    count_T = torch.zeros(T, dtype=torch.int64, device=sel_TE.device)
    cum_p_T = torch.zeros(T, device=sel_TE.device)
    spent_T = torch.zeros(T, device=sel_TE.device)
    stop_T = torch.zeros(T, dtype=torch.bool, device=sel_TE.device)
    for j in range(n):
        first_T = count_T == 0
        can_T = ~stop_T & (count_T < K)
        if plan.budget is not None:
            can_T &= spent_T + c_TN[:, j] <= plan.budget
            can_T &= ok_TN[:, j] | (first_T & fin_TN[:, j])
        else:
            can_T &= ok_TN[:, j] | first_T
            stop_T |= ~can_T  # without a budget the used slots are a prefix
        take_TN[:, j] = can_T
        count_T += can_T
        cum_p_T += p_TN[:, j] * can_T
        spent_T += c_TN[:, j] * can_T
        if plan.dynamic_k > 0:
            stop_T |= (count_T > 0) & (cum_p_T >= plan.dynamic_k)
    if plan.budget is not None:
        # A token whose eligible experts all exceed the budget runs its cheapest eligible one.
        none_T = count_T == 0
        if bool(none_T.any()):
            cheapest_T = c_TN.masked_fill(~fin_TN, float("inf")).argmin(-1)
            take_TN[none_T, cheapest_T[none_T]] = True
    # Used candidates first (in rank order), then unused ones as weight-0 padding.
    j_TN = torch.arange(n, device=sel_TE.device).expand(T, n)
    slot_TN = torch.argsort(j_TN + (~take_TN) * n, dim=-1)[:, :K]
    return order_TN.gather(1, slot_TN), take_TN.gather(1, slot_TN)


# ------------------------------------------------------------------------------- API
def _moe_layers(model) -> list:
    if hasattr(model, "moe_layers"):
        return model.moe_layers()
    return [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "experts")]


def set_routing_cost(model, lam: float | None = None, cost=None, budget: float | None = None,
                     dynamic_k: float | None = None, top_k: int | None = None) -> int:
    """Override cost-aware routing on every MoE layer of `model` at inference, without retraining.

    lam: the selection penalty lambda (>= 0). cost: "flops", "offload_misses", one vector of E
    costs, a list of vectors (one per MoE layer), or an `ExpertCost`. budget: per-token cost budget
    in normalised units (math.inf: off). dynamic_k: top-p threshold in (0, 1] (0: off). top_k: the
    most experts a token runs (an inference-time k override). None keeps the config's value.
    Returns the number of layers. `clear_routing_cost` restores the config's routing."""
    layers = _moe_layers(model)
    if not layers:
        raise MoekitError("the model has no MoE layers: nothing to route")
    if lam is not None and not (lam >= 0 and math.isfinite(lam)):
        raise MoekitError(f"cost lambda must be a finite number >= 0, got {lam}")
    if dynamic_k is not None and not 0 <= dynamic_k <= 1:
        raise MoekitError(f"dynamic_k is a probability threshold in [0, 1] (0 = off), got {dynamic_k}")
    if budget is not None and not budget > 0:
        raise MoekitError(f"cost budget must be > 0 (normalised cost units; inf = off), got {budget}")
    per_layer = isinstance(cost, (list, tuple)) and cost and isinstance(cost[0], (list, tuple, torch.Tensor))
    if per_layer and len(cost) != len(layers):
        raise MoekitError(f"{len(cost)} cost vectors for {len(layers)} MoE layers; give one per MoE layer")
    for i, layer in enumerate(layers):
        cfg = layer.cfg
        if top_k is not None and not 1 <= top_k <= cfg.num_experts:
            raise MoekitError(f"top_k must be in 1..{cfg.num_experts} (the layer's experts), got {top_k}")
        src = None if cost is None else make_cost(cost[i] if per_layer else cost).bind(layer)
        if cfg.router == "soft" and (lam or budget or dynamic_k or top_k):
            raise MoekitError("the soft router runs every expert: cost-aware routing does not apply")
        variable = (budget is not None and not math.isinf(budget)) or bool(dynamic_k)
        if variable and cfg.capacity_factor is not None:
            raise MoekitError("dynamic-k and cost budgets need dropless routing (moe.capacity_factor = null)")
        s = CostSettings(lam, src, budget, dynamic_k, top_k)
        if budget is not None and not math.isinf(budget):
            s_src = src or config_cost(cfg)
            if s_src.static:
                c = normalise(s_src.raw(cfg, layer.router.weight.shape[1]).float())
                if budget < float(c.min()):
                    raise MoekitError(f"cost budget {budget} is below the cheapest expert ({float(c.min()):.4g} in "
                                      "normalised units); raise it so every token can run one expert")
        layer.router.cost_override = s
    return len(layers)


def clear_routing_cost(model) -> None:
    """Drop the overrides of `set_routing_cost`: the config's routing again."""
    for layer in _moe_layers(model):
        layer.router.cost_override = None



def parse_cost(text: str | None):
    """A CLI cost source: "flops", "offload_misses", or comma-separated numbers (one per expert)."""
    if text is None or text in SOURCES:
        return text
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise MoekitError(f"--cost-source {text!r}: give flops, offload_misses, or one number per expert "
                          "separated by commas (e.g. 1,1,2,2)") from None


def apply_cli(model, cost_lambda: float | None = None, cost_budget: float | None = None,
              dynamic_k: float | None = None, cost_source: str | None = None, route_top_k: int | None = None) -> dict:
    """The routing options of `generate` / `eval` / `bench`: `set_routing_cost` when any is given.
    Returns the settings applied (empty when none), for reports."""
    given = {"lam": cost_lambda, "budget": cost_budget, "dynamic_k": dynamic_k, "cost": parse_cost(cost_source),
             "top_k": route_top_k}
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        set_routing_cost(model, **given)
    return given


class FlopsMeter:
    """Expert FLOPs actually spent per token, over every forward since creation / `reset`.

    Forward hooks on the MoE layers read each forward's `Routing` (`spent_flops`: the assignments that
    ran, unused dynamic-k slots excluded, real widths). Assignments dropped later by expert skipping
    (`moekit.memory.set_skipping`) are taken off at the layer's mean expert FLOPs (exact for equal
    widths). Tokens are counted at the first MoE layer, so the result is summed over layers."""

    def __init__(self, model):
        self.layers = _moe_layers(model)
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.flops = 0.0
        self.assignments = 0
        self._skipped = [getattr(getattr(la, "skip", None), "skipped", 0) for la in self.layers]

    def _hook(self, i: int):
        def hook(layer, args, out):
            r = out[1]
            if r is None:
                return
            flops = spent_flops(layer, r)
            used = int(r.tokens_per_expert.sum())
            p = getattr(layer, "skip", None)
            if p is not None:  # expert skipping dropped some assignments after routing
                n = p.skipped - self._skipped[i]
                self._skipped[i] = p.skipped
                flops -= n * sum(layer.flops_E) / len(layer.flops_E)
                used -= n
            self.flops += flops
            self.assignments += used
            if i == 0:
                self.tokens += args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return hook

    def stats(self) -> dict:
        t = max(self.tokens, 1)
        return {"tokens": self.tokens, "expert_flops_per_token": self.flops / t,
                "experts_per_token_per_layer": self.assignments / t / max(len(self.layers), 1)}

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
