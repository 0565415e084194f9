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


def read_trace(path: str) -> Trace:
    """Read a trace file (telemetry or ids JSONL) or build a `synthetic:...` one."""
    if path.startswith("synthetic:"):
        return _parse_synthetic(path)
    p = Path(path)
    if p.is_dir() and (p / "telemetry.jsonl").is_file():
        p = p / "telemetry.jsonl"
    if not p.is_file():
        raise TraceError(f"no trace at {path}; give a run's telemetry.jsonl, an ids JSONL or synthetic:E=..,k=..")
    header: dict = {}
    layers: dict[int, LayerTrace] = {}
    E = K = None
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if rec.get("format") == IDS_FORMAT:
            header = rec
            E, K = rec.get("num_experts"), rec.get("top_k")
        elif "ids" in rec:
            ids = torch.tensor(rec["ids"], dtype=torch.int64)
            if ids.dim() != 2:
                raise TraceError(f"{p}:{n}: `ids` must be a [tokens, top_k] list of lists")
            layers.setdefault(int(rec.get("layer", 0)), LayerTrace()).ids.append(ids)
            K = K or ids.shape[1]
        elif "layers" in rec and rec.get("kind", "train") == "train":  # moekit telemetry record
            for lay in rec["layers"]:
                c = torch.tensor(lay["counts"], dtype=torch.float64)
                layers.setdefault(int(lay["layer"]), LayerTrace()).counts.append(c)
                E = E or c.numel()
    if not layers:
        raise TraceError(f"{p}: no routing records (expected moekit telemetry or `ids` lines)")
    if E is None:
        E = int(max(int(i.max()) for lt in layers.values() for i in lt.ids)) + 1
    return Trace(int(E), K, [layers[k] for k in sorted(layers)], header.get("hidden"), str(p))


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

