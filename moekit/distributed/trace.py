"""Routing traces for the EP simulator: read moekit telemetry JSONL (per-expert counts), moekit's
ids JSONL (per-token top-k ids), or generate a synthetic (Zipf) trace; record an ids trace from a
model.

Shape legend: T tokens of one step, K experts per token, E experts, L MoE layers.

ids JSONL: an optional header `{"format": "moekit-routing-ids/1", "num_experts": E, "top_k": K,
"hidden": D}` then one line per (step, layer): `{"step": s, "layer": l, "ids": [[e, ...], ...]}`
with tokens in global order (the simulator puts token t of T on rank t * G // T).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.errors import MoekitError

IDS_FORMAT = "moekit-routing-ids/1"


class TraceError(MoekitError, ValueError):
    """A routing trace that cannot be read."""


@dataclass
class LayerTrace:
    """One MoE layer over the trace's steps: per-token ids ([T, K] per step) or only counts [E]."""

    ids: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)

    @property
    def has_ids(self) -> bool:
        return bool(self.ids)

    def total_counts(self, E: int) -> torch.Tensor:
        if self.ids:
            return sum(torch.bincount(i.reshape(-1), minlength=E) for i in self.ids)
        return sum(self.counts)

    @property
    def steps(self) -> int:
        return len(self.ids) or len(self.counts)


@dataclass
class Trace:
    num_experts: int
    top_k: int | None
    layers: list[LayerTrace]
    hidden: int | None = None
    source: str = ""


def _parse_synthetic(spec: str) -> Trace:
    """synthetic:E=256,k=8,tokens=4096,zipf=1.0,layers=2,steps=1,seed=0"""
    kv = dict(p.split("=", 1) for p in spec.split(":", 1)[1].split(",") if p)
    try:
        E, K = int(kv.get("E", 256)), int(kv.get("k", 8))
        T, a = int(kv.get("tokens", 4096)), float(kv.get("zipf", 1.0))
        L, S, seed = int(kv.get("layers", 1)), int(kv.get("steps", 1)), int(kv.get("seed", 0))
    except ValueError as e:
        raise TraceError(f"bad synthetic trace spec {spec!r} ({e}); e.g. synthetic:E=256,k=8,tokens=4096,zipf=1.0")
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(L):
        # Zipf popularity over a random expert order per layer; K distinct experts per token.
        p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64).pow(a)
        p = p[torch.randperm(E, generator=g)]
        layers.append(LayerTrace(ids=[torch.multinomial(p.expand(T, E), K, replacement=False, generator=g)
                                      for _ in range(S)]))
    return Trace(E, K, layers, source=spec)


def read_trace(path: str, num_experts: int | None = None) -> Trace:
    """Read a trace (moekit telemetry, moekit ids JSONL, Megatron router-trace JSONL: one file or a
    directory of `router_trace_rank*.jsonl`) or build a `synthetic:...` one. Megatron records hold
    no expert count: pass `num_experts` (else the largest id seen + 1)."""
    if path.startswith("synthetic:"):
        return _parse_synthetic(path)
    p = Path(path)
    files = [p]
    if p.is_dir():
        megatron = sorted(p.glob("router_trace_rank*.jsonl"), key=lambda f: int(re.findall(r"\d+", f.name)[-1]))
        files = megatron or [p / "telemetry.jsonl"]
    if not all(f.is_file() for f in files):
        raise TraceError(f"no trace at {path}; give a run's telemetry.jsonl, an ids JSONL, Megatron "
                         "router_trace_rank*.jsonl, or synthetic:E=..,k=..")
    header: dict = {}
    counts: dict[int, list[torch.Tensor]] = {}
    ids_by: dict[tuple, dict[int, list[tuple[int, torch.Tensor]]]] = {}
    E, K = num_experts, None
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
            key = "ids" if "ids" in rec else "top_indices" if "top_indices" in rec else None
            if rec.get("format") == IDS_FORMAT:
                header = rec
                E, K = E or rec.get("num_experts"), rec.get("top_k")
            elif key is not None:
                ids = torch.tensor(rec[key], dtype=torch.int64)
                if ids.dim() != 2:
                    raise TraceError(f"{f}:{n}: `{key}` must be a [tokens, top_k] list of lists")
                # Megatron: one file per rank; a layer is (block, mtp_idx, layer); ranks concatenate in order.
                lkey = (rec.get("block", "decoder") != "decoder", rec.get("mtp_idx", -1), int(rec.get("layer", 0)))
                ids_by.setdefault(lkey, {}).setdefault(int(rec.get("step", 0)), []).append((int(rec.get("rank", 0)), ids))
                K = K or ids.shape[1]
            elif "layers" in rec and rec.get("kind", "train") == "train":  # moekit telemetry record
                for lay in rec["layers"]:
                    c = torch.tensor(lay["counts"], dtype=torch.float64)
                    counts.setdefault(int(lay["layer"]), []).append(c)
                    E = E or c.numel()
    layers = [LayerTrace(counts=counts[k]) for k in sorted(counts)]
    for lkey in sorted(ids_by):
        steps = ids_by[lkey]
        layers.append(LayerTrace(ids=[torch.cat([t for _, t in sorted(steps[s], key=lambda rt: rt[0])])
                                      for s in sorted(steps)]))
    if not layers:
        raise TraceError(f"{p}: no routing records (expected moekit telemetry, `ids` or Megatron `top_indices` lines)")
    if E is None:
        E = int(max(int(i.max()) for lt in layers for i in lt.ids)) + 1
    return Trace(int(E), K, layers, header.get("hidden"), str(p))


def write_ids_trace(path: str | Path, records: list[tuple[int, int, torch.Tensor]], num_experts: int,
                    hidden: int | None = None) -> Path:
    """records: (step, layer, ids [T, K]) with tokens in global order."""
    from moekit.checkpoint.native import atomic_write_text

    K = records[0][2].shape[1] if records else None
    lines = [json.dumps({"format": IDS_FORMAT, "num_experts": num_experts, "top_k": K, "hidden": hidden})]
    lines += [json.dumps({"step": s, "layer": lay, "ids": ids.tolist()}) for s, lay, ids in records]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return Path(path)


@torch.no_grad()
def record_ids(model, batches, path: str | Path) -> Path:
    """Run `model` on `batches` ([B, S] token ids) and write its routing as an ids trace."""
    recs = []
    for step, x in enumerate(batches):
        out = model(x, return_routing_ids=True)
        for lay, r in enumerate(r for r in out.routing if r is not None):
            recs.append((step, lay, r.expert_ids.reshape(-1, r.expert_ids.shape[-1]).cpu()))
    return write_ids_trace(path, recs, model.config.moe.num_experts, model.config.dim)

