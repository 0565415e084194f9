"""Per-layer, per-expert routing telemetry written as JSONL while a model trains.

Shape legend: L MoE layers, E experts per layer.

A `Telemetry` accumulates `Routing` values (from `ModelOutput.routing`) over a window of
forwards, then `flush()` turns the window into one JSON record: token counts per expert, load
imbalance (max/mean and coefficient of variation), mean router entropy, dropped assignments,
dead experts (share below `dead_fraction` of the uniform share) and the aux-loss values. It also
tracks how many consecutive *eval* records each expert has been dead for and warns when one stays
starved for `patience` records in a row: the start of a routing collapse.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch


class CollapseWarning(UserWarning):
    """An expert has received (almost) no tokens for several consecutive evaluations."""


def load_stats(counts_E: list[int] | torch.Tensor, dead_fraction: float = 0.1) -> dict[str, Any]:
    """Imbalance statistics of one layer's per-expert assignment counts."""
    c = torch.as_tensor(counts_E, dtype=torch.float64)
    total = float(c.sum())
    E = c.numel()
    mean = total / E if E else 0.0
    if total <= 0:
        return {"max_over_mean": float("nan"), "cv": float("nan"), "dead": list(range(E)), "n_dead": E,
                "share": [0.0] * E}
    share = c / total
    dead = [i for i in range(E) if float(share[i]) < dead_fraction / E]
    return {
        "max_over_mean": float(c.max()) / mean,
        # Population std over experts / mean: 0 for a perfectly even load, sqrt(E-1) for one expert.
        "cv": float(c.std(unbiased=False)) / mean,
        "dead": dead,
        "n_dead": len(dead),
        "share": [round(float(s), 6) for s in share],
    }


@dataclass
class _Window:
    counts_LE: list[torch.Tensor] = field(default_factory=list)
    dropped_L: list[int] = field(default_factory=list)
    entropy_sum_L: list[float] = field(default_factory=list)
    aux_sum_L: list[float] = field(default_factory=list)
    z_sum_L: list[float] = field(default_factory=list)
    n_forwards: int = 0


class Telemetry:
    """Accumulate routing decisions and write one JSONL record per `flush`.

    Args:
        path: JSONL file to append to (None: keep records in memory only).
        dead_fraction: an expert is dead when its share is below this fraction of 1/E.
        patience: consecutive eval records an expert must be dead in before a `CollapseWarning`.
    """

    def __init__(self, path: str | Path | None = None, dead_fraction: float = 0.1, patience: int = 3):
        self.path = Path(path) if path is not None else None
        self.dead_fraction = dead_fraction
        self.patience = patience
        self.records: list[dict[str, Any]] = []
        self.starved: dict[str, int] = {}
        """'layer:expert' -> consecutive eval records it has been dead in."""
        self.warned: set[str] = set()
        self._w = _Window()

    # ------------------------------------------------------------------ accumulate
    def observe(self, routing: Iterable[Any]) -> None:
        """Add one forward's routing tuple (None entries = dense layers, skipped)."""
        rs = [r for r in routing if r is not None]
        w = self._w
        if not w.counts_LE:
            w.counts_LE = [torch.zeros(r.num_experts, dtype=torch.int64) for r in rs]
            w.dropped_L = [0] * len(rs)
            w.entropy_sum_L = [0.0] * len(rs)
            w.aux_sum_L = [0.0] * len(rs)
            w.z_sum_L = [0.0] * len(rs)
        for i, r in enumerate(rs):
            w.counts_LE[i] += r.tokens_per_expert.detach().cpu().to(torch.int64)
            w.dropped_L[i] += int(r.dropped)
            w.entropy_sum_L[i] += float(r.entropy)
            w.aux_sum_L[i] += float(r.aux_loss.detach())
            w.z_sum_L[i] += float(r.z_loss.detach())
        w.n_forwards += 1

    @property
    def pending(self) -> bool:
        return self._w.n_forwards > 0

    # ----------------------------------------------------------------------- flush
    def flush(self, step: int, kind: str = "train", **extra: Any) -> dict[str, Any] | None:
        """Turn the window into a record (appended to the JSONL file) and start a new window.

        kind "eval" records also advance the collapse detector."""
        w, self._w = self._w, _Window()
        if w.n_forwards == 0:
            return None
        n = w.n_forwards
        layers = []
        for i, c in enumerate(w.counts_LE):
            st = load_stats(c, self.dead_fraction)
            layers.append({
                "layer": i, "counts": c.tolist(), "tokens": int(c.sum()),
                "max_over_mean": st["max_over_mean"], "cv": st["cv"], "dead": st["dead"], "n_dead": st["n_dead"],
                "entropy": w.entropy_sum_L[i] / n, "dropped": w.dropped_L[i],
                "aux_loss": w.aux_sum_L[i] / n, "z_loss": w.z_sum_L[i] / n,
            })
        rec: dict[str, Any] = {"step": step, "kind": kind, "forwards": n, **extra, "layers": layers}
        if layers:
            rec["summary"] = {
                "max_over_mean": max(lay["max_over_mean"] for lay in layers),
                "cv_mean": sum(lay["cv"] for lay in layers) / len(layers),
                "n_dead": sum(lay["n_dead"] for lay in layers),
                "entropy_mean": sum(lay["entropy"] for lay in layers) / len(layers),
                "dropped": sum(lay["dropped"] for lay in layers),
            }
        if kind == "eval":
            rec["collapse"] = self._check_collapse(layers, step)
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, allow_nan=True) + "\n")
        return rec

    def _check_collapse(self, layers: list[dict[str, Any]], step: int) -> list[str]:
        dead_now = {f"{lay['layer']}:{e}" for lay in layers for e in lay["dead"]}
        self.starved = {k: self.starved.get(k, 0) + 1 for k in dead_now}
        collapsed = sorted(k for k, v in self.starved.items() if v >= self.patience)
        fresh = [k for k in collapsed if k not in self.warned]
        if fresh:
            self.warned.update(fresh)
            warnings.warn(f"routing collapse at step {step}: expert(s) {', '.join(fresh)} (layer:expert) got under "
                          f"{self.dead_fraction:.0%} of a uniform share for {self.patience} evals in a row; consider "
                          "a larger aux_loss_coef or aux-loss-free bias balancing", CollapseWarning, stacklevel=2)
        return collapsed

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"starved": dict(self.starved), "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.starved = {k: int(v) for k, v in state.get("starved", {}).items()}
        self.warned = set(state.get("warned", []))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read telemetry (or any JSONL) records, skipping a torn last line from a killed run."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
