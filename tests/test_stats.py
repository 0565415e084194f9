"""The statistics behind `moekit compare` and `moekit sweep`: paired seed comparisons, verdicts, seed
splitting, crossover and interpolation, on synthetic seed results (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from moekit.train import stats

OK = {"moe": False, "dense": False}


def _pair(moe, dense):
    return stats.paired(dict(enumerate(moe)), dict(enumerate(dense)))


def test_paired_interval_matches_scipy_ttest_rel():
    moe, dense = [1.50, 1.53, 1.49, 1.52], [1.52, 1.56, 1.50, 1.55]
    p = _pair(moe, dense)
    ref = sps.ttest_rel(moe, dense).confidence_interval(0.95)
    assert p["n"] == 4 and p["mean_diff"] == pytest.approx(sum(moe) / 4 - sum(dense) / 4)
    assert p["ci"] == pytest.approx([ref.low, ref.high])
    assert p["se"] == pytest.approx(sps.sem([a - b for a, b in zip(moe, dense)]))
    s = stats.summarize(moe)
    assert s["mean"] == pytest.approx(sum(moe) / 4) and s["std"] == pytest.approx(float(np.std(moe, ddof=1)))


def test_verdict_resolvable_win_loss_and_tie():
    # Seeds move both models together (1.60, 1.66, 1.56): the pairing resolves a 0.02 gap that the
    # spread of each model's mean (0.05) would hide.
    base = [1.60, 1.66, 1.56]
    win = _pair([b - 0.020 for b in base], [b + d for b, d in zip(base, (0.001, -0.002, 0.0))])
    code, text = stats.verdict(win, OK)
    assert code == "better" and "**better** by" in text and "95% CI" in text and win["ci"][1] < 0
    loss = _pair([b + 0.03 for b in base], [b + d for b, d in zip(base, (0.002, -0.001, 0.0))])
    code, text = stats.verdict(loss, OK)
    assert code == "worse" and "**worse** by" in text and loss["ci"][0] > 0
    tie = _pair([1.60, 1.62, 1.58], [1.61, 1.60, 1.59])  # signs disagree across seeds
    code, text = stats.verdict(tie, OK)
    assert code == "tie" and "no difference resolvable at this budget" in text and "includes 0" in text
    # Very consistent but tiny: the interval excludes 0, the difference is under the practical margin.
    tiny = _pair([b - 0.002 for b in base], [b + d for b, d in zip(base, (0.0, 0.0001, -0.0001))])
    assert tiny["ci"][1] < 0
    code, text = stats.verdict(tiny, OK)
    assert code == "tie" and "practical margin" in text


def test_verdict_one_seed_and_degenerate():
    assert stats.verdict(_pair([1.600], [1.6043]), OK)[0] == "tie"  # the "better by 0.0043" case of issue 19
    code, text = stats.verdict(_pair([1.55], [1.60]), OK)
    assert code == "better" and "better by 0.0500" in text and "one seed" in text
    code, text = stats.verdict(_pair([1.65], [1.60]), OK)
    assert code == "worse" and "**not** better" in text
    assert stats.verdict(_pair([1.60 + 0.95 * stats.RUN_TO_RUN_SPREAD_BPB], [1.60]), OK)[0] == "tie"
    # A clear "win" of a model that writes "the the the" is not ranked, with seeds too.
    win = _pair([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    code, text = stats.verdict(win, {"moe": False, "dense": True})
    assert code == "not_ranked" and "dense model" in text and "degenerate" in text
    assert "models" in stats.verdict(win, {"moe": True, "dense": True})[1]


def test_seeds_for_budget():
    assert stats.seeds_for_budget(3, 3_000_000) == 3
    assert stats.seeds_for_budget(3, 600_000) == 2  # 300k per run with 2 seeds, 200k with 3 < 250k
    assert stats.seeds_for_budget(3, 100_000) == 1  # never fewer than one
    assert stats.seeds_for_budget(5, 1000, min_tokens=200) == 5
    with pytest.raises(ValueError):
        stats.seeds_for_budget(0, 1e6)


def test_crossover_finder():
    xs = [250_000, 500_000, 1_000_000, 2_000_000]
    c = stats.crossover(xs, [0.03, 0.01, -0.01, -0.02])  # MoE worse at small budgets, better at large
    assert c["direction"] == "moe_better" and c["between"] == [500_000, 1_000_000]
    assert c["x"] == pytest.approx(math.sqrt(500_000 * 1_000_000))  # halfway in log-tokens
    c = stats.crossover(list(reversed(xs)), [-0.02, -0.01, 0.01, 0.03])  # order of the input does not matter
    assert c["direction"] == "moe_better"
    assert stats.crossover(xs, [0.03, 0.02, 0.015, 0.01]) is None
    assert stats.crossover(xs, [-0.01, -0.02, 0.01, 0.02])["direction"] == "dense_better"
    assert stats.crossover(xs[:1], [0.01]) is None


def test_interp_log_and_training_flops():
    assert stats.interp_log([1e9, 1e11], [2.0, 1.0], 1e10) == pytest.approx(1.5)
    assert stats.interp_log([1e9, 1e11], [2.0, 1.0], 1e12) is None
    from moekit import dense_equivalent, get_preset

    moe = get_preset("small-moe")
    f_m, f_d = stats.training_flops(moe, 1000, 256), stats.training_flops(dense_equivalent(moe), 1000, 256)
    assert f_m["total"] == pytest.approx(3 * 1000 * f_m["forward_per_token"])
    eq, rel = stats.flops_equal(f_m["total"], f_d["total"])
    assert eq and abs(rel) < 0.02  # equal active parameters: nearly equal FLOPs (the router adds a little)
    assert not stats.flops_equal(1.1, 1.0)[0]


def test_run_key_gains_new_fields_defaults_and_stays_equal():
    """A run key written before a config/training field existed still matches (the field kept its
    default), while a real change still differs."""
    from dataclasses import asdict

    from moekit import get_preset
    from moekit.train.pairs import normalise_key
    from moekit.train.trainer import TrainConfig

    cfg = get_preset("tiny-moe")
    new = {"preset": "tiny-moe", "model": cfg.to_dict(), "train": asdict(TrainConfig(max_tokens=1000))}
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "sliding_window"},
           "train": {k: v for k, v in new["train"].items() if k != "finish_schedule"}}
    old["model"]["moe"] = {k: v for k, v in old["model"]["moe"].items() if k != "cost_lambda"}
    assert old != new and normalise_key(old) == normalise_key(new)
    changed = {**new, "train": {**new["train"], "lr": 1.0}}
    assert normalise_key(changed) != normalise_key(new)


def test_run_key_ignores_thread_count():
    from dataclasses import asdict

    from moekit.train.pairs import normalise_key
    from moekit.train.trainer import TrainConfig

    a = {"train": asdict(TrainConfig(max_tokens=1000, threads=1))}
    b = {"train": asdict(TrainConfig(max_tokens=1000, threads=2))}
    assert normalise_key(a) == normalise_key(b)
