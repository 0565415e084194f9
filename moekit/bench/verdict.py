"""Yes/no verdicts on measured ratios: the one rule `moekit bench`, `benchmarks/moe_layer.py` and
`benchmarks/train_step.py` all use.

A verdict compares the per-round samples of a ratio with a target:

- no samples: "not measured";
- a bound that could not be measured (zero, NaN or infinite peak/bandwidth, so the ratio is not a
  finite positive number): "unknown", never met;
- a ratio against a roofline or lower bound that beats the bound (more than 100% of a throughput
  roofline, or less than 1x of a time lower bound) in any round: "bound invalid". A true bound
  cannot be beaten, so the bound was wrong for that run and nothing can be concluded from it;
- one round: "indicative" (which side of the target it fell on is kept in `side`, never a yes/no);
- two or more rounds: "yes" only when the median clears the target by more than the spread over
  rounds (max - min of the samples), "no" only when it misses it by more than the spread, otherwise
  "within spread" (the run cannot tell).

`kind` says what the ratio is: "ratio" (A/B speed ratio, higher is better), "fraction_of_bound"
(throughput / roofline throughput, higher is better, must be <= 1) or "over_bound" (time / lower
bound on time, lower is better, must be >= 1).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Literal

Kind = Literal["ratio", "fraction_of_bound", "over_bound"]
STATUSES = ("yes", "no", "within spread", "indicative", "bound invalid", "unknown", "not measured")
MET = {"yes"}
"""The only status that counts as a target met."""


@dataclass(frozen=True)
class Verdict:
    status: str
    """One of STATUSES."""
    ratio: float | None
    """Median over rounds (None when not measured)."""
    spread: float | None
    """max - min over rounds (0 for one round, None when not measured)."""
    rounds: int
    needed: float
    """The target ratio."""
    kind: str
    side: str | None = None
    """"meets target"/"misses target" (the median's side) for an indicative or within-spread result."""

    @property
    def met(self) -> bool | None:
        """True/False for a yes/no verdict, None for every other status."""
        return {"yes": True, "no": False}.get(self.status)

    def label(self) -> str:
        """The table cell: the status, with the side for indicative results."""
        if self.status == "no":
            return "**no**"
        if self.status in ("indicative", "within spread") and self.side:
            return f"{self.status} ({self.side})"
        return self.status

    def to_dict(self) -> dict:
        return {**asdict(self), "met": self.met}


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def judge(samples: list[float | None], target: float, kind: Kind = "ratio") -> Verdict:
    """The verdict for per-round `samples` of one ratio against `target` (see the module doc)."""
    if kind not in ("ratio", "fraction_of_bound", "over_bound"):
        raise ValueError(f"unknown verdict kind {kind!r}")
    vals = [s for s in samples if s is not None]
    if not vals:
        return Verdict("not measured", None, None, 0, target, kind)
    n = len(vals)
    if not all(_finite_positive(v) for v in vals):
        return Verdict("unknown", None, None, n, target, kind)
    med, spread = statistics.median(vals), max(vals) - min(vals)
    if (kind == "fraction_of_bound" and max(vals) > 1.0) or (kind == "over_bound" and min(vals) < 1.0):
        return Verdict("bound invalid", med, spread, n, target, kind)
    higher_better = kind != "over_bound"
    good = med - target if higher_better else target - med  # > 0: on the right side of the target
    side = "meets target" if good > 0 else "misses target"
    if n < 2:
        return Verdict("indicative", med, spread, n, target, kind, side)
    if good > spread:
        return Verdict("yes", med, spread, n, target, kind)
    if -good > spread:
        return Verdict("no", med, spread, n, target, kind)
    return Verdict("within spread", med, spread, n, target, kind, side)


def bound_ratio(achieved: float, bound: float | None) -> float | None:
    """achieved / bound, or NaN where the bound is missing or not a finite positive number (so
    `judge` reports it as unknown); None when nothing was achieved (not measured)."""
    if achieved is None:
        return None
    if bound is None or not _finite_positive(bound):
        return float("nan")
    return achieved / bound
