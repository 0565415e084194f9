"""Expert offloading for CPU inference: expert weights stay in the safetensors file; each MoE layer
keeps a small cache of experts under a byte budget and reads the others on demand, while a
background thread prefetches the next layer's likely experts.

Shape legend: S rows grouped by expert, D model dim, T tokens, E experts, K experts per token.

Design (documented in docs/memory.md):
- `OffloadedExperts` is an experts module with GroupedExperts' interface (forward(x_SD, counts_E),
  expert_forward(e, x_ND), num_experts, dim, hidden, act), so the generic `torch` expert backend
  (and the `skip` backend) run it; the CPU kernel backends decline it (not GroupedExperts).
- Backing store: explicit `os.preadv` reads into owned slot buffers (`store.py`), never a memory
  map, so the file's page cache is not part of this process's RSS.
- Budget: --expert-memory-budget BYTES (1.5G, 300M, 123456) or a fraction of all expert bytes
  (0.4), split evenly across MoE layers; each layer holds floor(share / expert bytes) experts (>= 1).
- Lookahead prefetch: a forward pre-hook on MoE layer i applies layer i+1's router to layer i's
  input rows (the hidden state changes little between adjacent layers) and submits the predicted
  experts (most picked first, at most the cache's capacity) to a one-thread executor.
- Results never depend on the cache: weights are bit-identical copies of the file's, whichever
  path loaded them, so offloaded generation is token-identical to resident generation.
- Quantized experts (`moekit quantize` checkpoints: int8, int4, MXFP4, Q4_K) stream their codes
  and scales, not float weights: a slot holds one expert's quantized buffers and a one-expert
  `QuantizedExperts` computes on them, so the budget buys about 3.5x more int4 experts than bf16.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moekit.errors import MoekitError
from moekit.memory.cache import CacheStats, ExpertCache
from moekit.memory.store import FLOAT_PARTS, ExpertStore, read_header
from moekit.moe.experts import activate, as_compute

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_budget(text: str | float | int, total_expert_bytes: int) -> int:
    """Bytes from '0.4' (fraction of all expert bytes, <= 1), '1.5G' / '300M' / '64K' (binary
    units, optional 'iB'/'B') or a plain byte count."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(?:i?b)?", s)
    if not m:
        raise MoekitError(f"--expert-memory-budget {text!r}: give bytes (e.g. 512M, 2G, 1000000) or a fraction "
                          "of the expert weights (e.g. 0.4)")
    v, unit = float(m.group(1)), m.group(2)
    if not unit and v <= 1.0:
        return int(v * total_expert_bytes)
    return int(v * _UNITS[unit])


def quant_parts(experts) -> tuple[str, ...]:
    """The per-expert buffers of a `QuantizedExperts` in the order a slot holds them
    (qw13.q, qw13.scale, [qw13.zero | qw13.sub], then the same for qw2)."""
    return tuple(f"{m}.{b}" for m in ("qw13", "qw2") for b, t in getattr(experts, m)._buffers.items() if t is not None)


class _QuantRunner:
    """Computes one quantized expert from a cache slot: a one-expert `QuantizedExperts` (same scheme,
    group size and activation as the layer's) whose buffers are pointed at the slot's."""

    def __init__(self, like):
        from moekit.quant.backend import kernel_applies, run_one
        from moekit.quant.modules import QuantizedExperts

        self._applies, self._run_one = kernel_applies, run_one
        q = like.qw13
        self.names = quant_parts(like)
        self.one = QuantizedExperts(1, like.dim, like.hidden, like.act, q.scheme, q.group_size, q.zero_point,
                                    device="meta", alpha=like.alpha, limit=like.limit)

    def __call__(self, slot, x_ND: torch.Tensor) -> torch.Tensor:
        for name, buf in zip(self.names, slot):
            mod, attr = name.split(".")
            getattr(self.one, mod)._buffers[attr] = buf.unsqueeze(0)  # [1, ...]: a view, no copy
        if self._applies(self.one, x_ND) is None:  # decode rows: the resident layer's kernel (same numerics)
            return self._run_one(self.one, 0, x_ND)
        return self.one.expert_forward(0, x_ND)


class OffloadedExperts(nn.Module):
    """GroupedExperts' interface over an `ExpertCache`: weights are fetched per expert per call.
    `runner(slot, x_ND)` computes on a slot of quantized buffers (None: float w13, w2)."""

    def __init__(self, cache: ExpertCache, dim: int, hidden: int, act: str, runner=None):
        super().__init__()
        self.cache = cache
        self.runner = runner
        self.num_experts, self.dim, self.hidden, self.act = cache.store.num_experts, dim, hidden, act

    def _run(self, w, x_ND: torch.Tensor) -> torch.Tensor:
        if self.runner is not None:
            return self.runner(w, x_ND)
        w13, w2 = w
        h = activate(F.linear(x_ND, as_compute(w13, x_ND)), self.act)
        return F.linear(h, as_compute(w2, h))

    def expert_forward(self, e: int, x_ND: torch.Tensor) -> torch.Tensor:
        w = self.cache.acquire(e)
        try:
            return self._run(w, x_ND)
        finally:
            self.cache.release(e)

    def forward(self, x_SD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        # Run the experts already resident first (no eviction can touch them before they are
        # used), then the rest.
        counts = counts_E.tolist()
        needed = [e for e, n in enumerate(counts) if n]
        starts, acc = [], 0
        for n in counts:
            starts.append(acc)
            acc += n
        out_SD = x_SD.new_empty(x_SD.shape[0], self.dim)
        order = sorted(needed, key=lambda e: not self.cache.contains_ready(e))
        for e in order:
            a, b = starts[e], starts[e] + counts[e]
            out_SD[a:b] = self.expert_forward(e, x_SD[a:b])
        return out_SD

    def extra_repr(self) -> str:
        c = self.cache
        return f"experts={self.num_experts}, capacity={c.capacity}, policy={c.policy}, file={c.store.path}"


class _Prefetcher:
    """Pre-hook on MoE layer i: predict layer i+1's experts with its router, load them in the background."""

    def __init__(self, layers: list, caches: list[ExpertCache]):
        self.layers, self.caches = layers, caches
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers[:-1])]
        # Score each prediction against the layer's real routing, whichever backend runs the experts.
        self.handles += [layer.router.register_forward_hook(self._score(c)) for layer, c in zip(layers[1:], caches[1:])]

    @staticmethod
    def _score(cache: ExpertCache):
        def hook(module, args, out):
            cache.observe_needed(set(out.topk_ids_TK.unique().tolist()))
        return hook

    def _hook(self, i: int):
        def hook(module, args):
            x = args[0]
            nxt = self.layers[i + 1]
            with torch.no_grad():
                r = nxt.router.forward(x.reshape(-1, x.shape[-1]))  # .forward: not seen by the scoring hook
            ids = r.topk_ids_TK.reshape(-1)
            cnt = torch.bincount(ids, minlength=self.caches[i + 1].store.num_experts)
            cache = self.caches[i + 1]
            order = [e for e in torch.argsort(cnt, descending=True, stable=True).tolist() if cnt[e] > 0]
            cache.prediction = set(order[: cache.capacity])
            self.pool.submit(cache.prefetch, order)
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.pool.shutdown(wait=True)


def _moe_blocks(model) -> list[int]:
    return [i for i, b in enumerate(model.layers) if b.is_moe]


def offload_model(model, weights: str | Path, budget: str | float | int, policy: str = "lru",
                  prefetch: bool = True) -> dict:
    """Replace every MoE layer's experts of `model` by `OffloadedExperts` reading `weights` (the
    model's safetensors file); frees the resident expert weights. Returns the plan (bytes, capacity)."""
    # Plan: 1. one ExpertStore per layer and the per-expert size; 2. split the budget; 3. swap modules
    # and hook the prefetcher.
    if policy not in ("lru", "lfu"):
        raise MoekitError(f"unknown cache policy {policy!r}; choose lru or lfu")
    blocks = _moe_blocks(model)
    if not blocks:
        raise MoekitError("the model has no MoE layers: nothing to offload")
    biased = [b for b in blocks if getattr(model.layers[b].ffn.experts, "b13", None) is not None
              or getattr(model.layers[b].ffn.experts, "act", "") == "clamped_swiglu"]
    if biased:
        raise MoekitError("expert offloading streams w13/w2 only; this model's experts carry biases and the clamped "
                          "SwiGLU (gpt-oss), which it does not stream: run without --expert-memory-budget")
    from moekit.quant.modules import QuantizedExperts

    olds = [model.layers[b].ffn.experts for b in blocks]
    quant = [isinstance(o, QuantizedExperts) for o in olds]
    stores = [ExpertStore(weights, f"layers.{b}.ffn.experts", quant_parts(o) if q else FLOAT_PARTS)
              for b, o, q in zip(blocks, olds, quant)]
    total = sum(s.expert_bytes * s.num_experts for s in stores)
    budget_bytes = parse_budget(budget, total)
    per_layer = budget_bytes // len(blocks)
    need = max(s.expert_bytes for s in stores)
    if per_layer < need:
        raise MoekitError(f"expert memory budget {budget_bytes} bytes is below one expert per MoE layer "
                          f"({len(blocks)} x {need} bytes); raise --expert-memory-budget")
    caches = []
    for b, s, old, q in zip(blocks, stores, olds, quant):
        layer = model.layers[b].ffn
        cap = min(s.num_experts, per_layer // s.expert_bytes)
        cache = ExpertCache(s, cap, policy)
        layer.experts = OffloadedExperts(cache, old.dim, old.hidden, old.act, _QuantRunner(old) if q else None)
        caches.append(cache)
    model._offload_prefetcher = _Prefetcher([model.layers[b].ffn for b in blocks], caches) if prefetch else None
    model._offload_caches = caches
    return {"expert_bytes_total": total, "budget_bytes": budget_bytes,
            "capacity_per_layer": [c.capacity for c in caches], "expert_bytes": stores[0].expert_bytes,
            "resident_limit_bytes": sum(c.capacity * c.store.expert_bytes for c in caches)}


def load_offloaded(path: str | Path, budget: str | float | int, policy: str = "lru", prefetch: bool = True):
    """Load a moekit model directory (float, or quantized by `moekit quantize`) with its experts
    offloaded: only the non-expert weights and the experts' cache are ever resident (the expert
    stacks are never read whole)."""
    from moekit.checkpoint.native import CONFIG_NAME, WEIGHTS_NAME, materialize_buffers
    from moekit.config import ModelConfig
    from moekit.model.transformer import Transformer
    from moekit.quant.apply import empty_structure, set_compute_dtype
    from moekit.quant.checkpoint import is_quantized, read_config
    from safetensors import safe_open

    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        from moekit.train.evaluate import resolve_checkpoint

        path = resolve_checkpoint(path)
    qcfg = None
    if is_quantized(path):
        cfg, qcfg = read_config(path)
    else:
        cfg = ModelConfig.from_json(path / CONFIG_NAME)
    with torch.device("meta"):
        model = Transformer(cfg)
    if qcfg is not None:
        empty_structure(model, qcfg)  # quantized modules on meta, their buffers named as in the file
    header, _ = read_header(path / WEIGHTS_NAME)
    sd = {}
    expert_keys = (".experts.w13", ".experts.w2", ".experts.qw13.", ".experts.qw2.")
    for k in model.state_dict():
        if any(p in k for p in expert_keys):
            continue
        if k not in header:
            raise MoekitError(f"{path / WEIGHTS_NAME}: missing tensor {k!r}")
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as g:  # one short-lived map per tensor
            sd[k] = g.get_tensor(k).clone()
    plan = offload_model(model, path / WEIGHTS_NAME, budget, policy, prefetch)
    missing = model.load_state_dict(sd, strict=False, assign=True)
    if missing.unexpected_keys or [k for k in missing.missing_keys if ".experts." not in k]:
        raise MoekitError(f"{path}: weights do not match the config ({missing})")
    materialize_buffers(model)
    if qcfg is not None:
        set_compute_dtype(model, model.embed.weight.dtype)
        model.quant_config = qcfg
    model.offload_plan = plan
    return model.eval()


def offload_telemetry(model) -> dict:
    """Totals over layers: hit rate, bytes read, stall seconds, prefetch accuracy (share of
    predicted experts that were needed) and recall (share of needed experts predicted)."""
    caches = getattr(model, "_offload_caches", None)
    if not caches:
        return {}
    tot = CacheStats()
    for c in caches:
        for k, v in asdict(c.stats).items():
            setattr(tot, k, getattr(tot, k) + v if k != "max_resident_bytes" else getattr(tot, k) + v)
    d = asdict(tot)
    d["max_resident_bytes"] = sum(c.stats.max_resident_bytes for c in caches)
    d["resident_bytes"] = sum(c.resident_bytes for c in caches)
    d["hit_rate"] = tot.hits / max(tot.hits + tot.misses, 1)
    d["prefetch_accuracy"] = tot.predicted_right / tot.predicted if tot.predicted else None
    d["prefetch_recall"] = tot.predicted_right / tot.needed if tot.needed and tot.predicted else None
    d["per_layer_capacity"] = [c.capacity for c in caches]
    return d


def reset_telemetry(model) -> None:
    for c in getattr(model, "_offload_caches", []) or []:
        with c.lock:
            keep = c.stats.max_resident_bytes
            c.stats = CacheStats(max_resident_bytes=keep)


def close_offload(model) -> None:
    p = getattr(model, "_offload_prefetcher", None)
    if p is not None:
        p.close()
        model._offload_prefetcher = None
