"""Statistics of the main job and the token-budget sweep: seeds, paired differences, verdicts, crossover.

Each seed is one pair: the MoE and its dense equivalent trained with the same seed (same init seed, same
batches in the same order, same steps and learning rates). The seed moves both models' bpb together,
so the comparison uses the per-seed differences d_s = bpb_moe(s) - bpb_dense(s) (negative: the MoE is
better) and a paired t interval on their mean, which is much tighter than comparing two means.

Verdict rules (`verdict`):
- a model whose greedy samples are degenerate is far from trained: **not ranked**;
- one seed: no interval exists, so a difference within RUN_TO_RUN_SPREAD_BPB is not ranked;
- two or more seeds: **better** / **worse** only when the 95% t interval of the mean paired
  difference excludes 0 *and* the mean difference exceeds MIN_PRACTICAL_BPB; otherwise "no
  difference resolvable at this budget".
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

RUN_TO_RUN_SPREAD_BPB = 0.02
"""Val bpb spread between repeated main-job runs of one setting: "a few hundredths" measured across
sessions and seeds (docs/experiments.md, MoE vs dense table). One run per model cannot resolve a
smaller difference, so the one-seed verdict does not rank it."""

MIN_PRACTICAL_BPB = 0.005
"""Smallest mean paired difference called a win or a loss even when its interval excludes 0: 0.005
bpb is about 0.3% of the main job's ~1.5 bpb, below what changes a model's samples; a smaller
"significant" gap from very consistent seeds is reported as a tie."""

MIN_TOKENS_PER_RUN = 250_000
"""Fewest training tokens one seed's run may get when a budget is split across seeds: 61 steps of
the default B16 x S256 batch, twice the 30 warmup steps, so the cosine still has room to decay.
Below it the job trains fewer seeds (down to one) and says so."""

TRAINED_TOKENS_PER_PARAM = 20.0
"""Tokens per active parameter of compute-optimal training (Chinchilla, Hoffmann et al. 2022)."""

FAR_FROM_TRAINED = 0.25
"""Below this fraction of TRAINED_TOKENS_PER_PARAM (5 tokens per parameter) the report warns that the
models are far from trained: a ranking holds for this budget only."""

FLOPS_EQUAL_TOL = 0.02
"""Two runs' training FLOPs count as equal when they differ by at most this fraction."""


def degenerate(texts) -> bool:
    """Whether greedy samples are degenerate ("the the the ..."): any sample of 6+ words whose most
    common word is over half of it, or with under a third of its words distinct."""
    for t in texts:
        words = str(t).split()
        if len(words) >= 6:
            top = max(words.count(w) for w in set(words))
            if top > len(words) / 2 or len(set(words)) < len(words) / 3:
                return True
    return False


def seeds_for_budget(requested: int, total_tokens: float, min_tokens: int = MIN_TOKENS_PER_RUN) -> int:
    """How many seeds a budget of `total_tokens` per model affords: `requested`, or fewer so that each
    seed's run gets at least `min_tokens` (never fewer than one)."""
    if requested < 1:
        raise ValueError(f"seeds must be >= 1, got {requested}")
    return max(1, min(requested, int(total_tokens // max(1, min_tokens))))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean and sample standard deviation (None for one value) of a model's bpb over seeds."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values to summarize")
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return {"n": len(xs), "mean": mean, "std": std, "values": xs}


def paired(moe: Mapping[Any, float], dense: Mapping[Any, float], level: float = 0.95) -> dict[str, Any]:
    """Paired comparison over the seeds both models have: d_s = moe_s - dense_s (negative: MoE
    better), its mean, standard error and a Student-t interval (None with one seed)."""
    from scipy import stats

    seeds = sorted(set(moe) & set(dense), key=str)
    if not seeds:
        raise ValueError("no seed was run for both models")
    d = [float(moe[s]) - float(dense[s]) for s in seeds]
    n = len(d)
    mean = sum(d) / n
    out: dict[str, Any] = {"n": n, "seeds": list(seeds), "diffs": d, "mean_diff": mean, "se": None, "ci": None,
                           "level": level, "t_crit": None}
    if n > 1:
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
        se = sd / math.sqrt(n)
        t = float(stats.t.ppf(0.5 + level / 2, df=n - 1))
        out.update(se=se, t_crit=t, ci=[mean - t * se, mean + t * se])
    return out


def verdict(p: Mapping[str, Any], degen: Mapping[str, bool] | None = None) -> tuple[str, str]:
    """(code, sentence) for a paired comparison `p` (from `paired`): code is one of "not_ranked",
    "better", "worse", "tie" (MoE relative to dense)."""
    bad = [m for m, d in (degen or {}).items() if d]
    if bad:
        return "not_ranked", (
            f"**not ranked**: the {' and '.join(bad)} model{'s' if len(bad) > 1 else ''} still write"
            f"{'' if len(bad) > 1 else 's'} degenerate text (greedy samples below), so "
            f"{'they are' if len(bad) > 1 else 'it is'} far from trained at this budget; give more --minutes "
            "(or a faster CPU tier: `moekit doctor`).")
    m = p["mean_diff"]
    if p["n"] < 2 or p["ci"] is None:
        if abs(m) <= RUN_TO_RUN_SPREAD_BPB:
            return "tie", (f"a difference of {abs(m):.4f} bpb is **within the run-to-run spread** (about "
                           f"{RUN_TO_RUN_SPREAD_BPB} bpb between repeated runs, docs/experiments.md): no difference "
                           "is resolvable from one run of each at this budget.")
        if m < 0:
            return "better", f"the MoE is better by {-m:.4f} bpb (one seed), more than the run-to-run spread."
        return "worse", (f"the MoE is **not** better at this scale (worse by {m:.4f} bpb, one seed, more than the "
                         "run-to-run spread).")
    lo, hi = p["ci"]
    ci = f"95% CI [{lo:+.4f}, {hi:+.4f}] bpb over {p['n']} paired seeds"
    if hi < 0 and -m > MIN_PRACTICAL_BPB:
        return "better", f"the MoE is **better** by {-m:.4f} bpb (MoE - dense {m:+.4f}, {ci})."
    if lo > 0 and m > MIN_PRACTICAL_BPB:
        return "worse", f"the MoE is **worse** by {m:.4f} bpb (MoE - dense {m:+.4f}, {ci})."
    why = ("the interval includes 0" if lo <= 0 <= hi
           else f"the interval excludes 0 but |{m:.4f}| is under the {MIN_PRACTICAL_BPB} bpb practical margin")
    return "tie", f"**no difference resolvable at this budget** (MoE - dense {m:+.4f}, {ci}; {why})."


def crossover(xs: Sequence[float], diffs: Sequence[float]) -> dict[str, Any] | None:
    """Where the paired difference (MoE - dense, by budget `xs`) first changes sign, by linear
    interpolation in log(x); None when it keeps one sign over the sweep. `direction` says which model
    leads beyond the crossover."""
    pts = sorted(zip(xs, diffs))
    for (x0, d0), (x1, d1) in zip(pts, pts[1:]):
        if d0 == 0:
            return {"x": float(x0), "direction": "moe_better" if d1 < 0 else "dense_better"}
        if (d0 > 0) != (d1 > 0) and d1 != 0:
            lx = math.log(x0) + (0 - d0) * (math.log(x1) - math.log(x0)) / (d1 - d0)
            return {"x": math.exp(lx), "direction": "moe_better" if d1 < 0 else "dense_better",
                    "between": [float(x0), float(x1)]}
        if d1 == 0 and (x1, d1) == pts[-1]:
            return {"x": float(x1), "direction": "tie_at_end"}
    return None


def interp_log(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """y at `x` by linear interpolation in log(x) between the nearest sweep points; None outside them."""
    pts = sorted(zip(xs, ys))
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return float(y0)
            f = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return float(y0 + f * (y1 - y0))
    return float(pts[0][1])


def training_flops(cfg, tokens: int, seq_len: int) -> dict[str, float]:
    """Training FLOPs of `tokens` tokens: 3x the forward FLOPs per token (backward = 2x forward) of the
    active weights plus attention at the mean position of a `seq_len` window (moekit.plan)."""
    from moekit.plan import flops_per_token

    fwd = flops_per_token(cfg, max(1, (seq_len + 1) // 2))["total"]
    return {"forward_per_token": fwd, "train_per_token": 3 * fwd, "total": 3.0 * fwd * tokens}


def flops_equal(a: float, b: float, tol: float = FLOPS_EQUAL_TOL) -> tuple[bool, float]:
    """Whether two FLOP counts are equal within `tol`, and their relative difference (a/b - 1)."""
    rel = a / b - 1.0
    return abs(rel) <= tol, rel


def fmt_mean_std(s: Mapping[str, Any]) -> str:
    return f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s.get("std") is not None else "")


def fmt_diff(p: Mapping[str, Any]) -> str:
    if p.get("ci") is None:
        return f"{p['mean_diff']:+.4f} (one seed)"
    return f"{p['mean_diff']:+.4f} [{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
