"""The main job's report and the sweep's outputs rendered from synthetic seed results (no training):
verdicts, seed reduction, the far-from-trained warning, equal FLOPs and the sweep's crossover."""

from __future__ import annotations

import json

import pytest

from moekit import dense_equivalent, get_preset
from moekit.train import stats
from moekit.train.compare_report import render_report, sweep_context
from moekit.train.sweep import aggregate, plot_sweep, render_sweep

GOOD = "The history of the city begins with a small harbor on the river and a market."
BAD = "the the the the the the the the"


def payload(moe_vals, dense_vals, *, tokens=1_000_000, samples=None, reason=None, sweep=None):
    seeds = list(range(len(moe_vals)))
    samples = samples or {"moe": GOOD, "dense": GOOD}
    runs = {str(s): {"results": {"moe": {"val": {"bpb": mv, "tokens": 100}},
                                 "dense": {"val": {"bpb": dv, "tokens": 100}}},
                     "samples": {m: {"p": samples[m]} for m in ("moe", "dense")}}
            for s, mv, dv in zip(seeds, moe_vals, dense_vals)}
    pr = stats.paired(dict(zip(seeds, moe_vals)), dict(zip(seeds, dense_vals)))
    degen = {m: stats.degenerate([samples[m]]) for m in ("moe", "dense")}
    code, text = stats.verdict(pr, degen)
    row = {"tokens": tokens, "steps": 100, "train_seconds": 10.0, "tokens_per_s": 1000.0, "total_params": 15e6,
           "active_params": 6e6, "stopped_by": "budget", "reuse": "trained"}
    f = {"total": 3e7 * tokens, "train_per_token": 3e7, "forward_per_token": 1e7}
    return {"name": "x", "data_seconds": 1.0, "total_seconds": 60.0, "threads": 2, "models": {"moe": row, "dense": row},
            "results": {m: {"val": {**stats.summarize(v), "tokens": 100}} for m, v in (("moe", moe_vals),
                                                                                   ("dense", dense_vals))},
            "runs": runs, "paired": pr, "degenerate": degen, "verdict": code, "verdict_text": text,
            "seeds": {"used": seeds, "requested": 3, "reason": reason},
            "flops": {"moe": f, "dense": f, "equal": True, "rel_diff": 0.0, "tolerance": 0.02}, "sweep": sweep}


@pytest.mark.parametrize("moe,dense,word", [
    ([1.50, 1.56, 1.46], [1.53, 1.58, 1.49], "**better** by"),
    ([1.55, 1.61, 1.52], [1.53, 1.58, 1.49], "**worse** by"),
    ([1.53, 1.57, 1.50], [1.53, 1.58, 1.49], "no difference resolvable at this budget"),
])
def test_report_verdicts_from_seeds(moe, dense, word):
    text = render_report(payload(moe, dense))
    assert word in text and "95% CI" in text and "Over 3 seeds" in text
    assert f"{stats.summarize(moe)['mean']:.4f} ± {stats.summarize(moe)['std']:.4f}" in text
    assert "| mean |" in text and "t(2) = 4.30" in text
    assert "No token-budget sweep found" in text and "equal within 2%" in text


def test_report_not_ranked_reduced_seeds_and_warning():
    p = payload([1.2], [2.0], samples={"moe": GOOD, "dense": BAD}, reason="1 of 3 requested seeds: too few tokens")
    text = render_report(p)
    assert "**not ranked**" in text and "better" not in text.split("\n")[2]
    assert "**1 of 3 requested seeds: too few tokens.**" in text and "Over 1 seed," in text
    assert "Warning:" in text and "far from trained" in text  # 1M tokens / 6M active params
    # With seeds, the unranked headline still states the paired interval (not as a ranking).
    three = render_report(payload([1.50, 1.52, 1.51], [1.53, 1.52, 1.55], samples={"moe": BAD, "dense": BAD}))
    head = three.split("\n")[2]
    assert "**not ranked**" in head and "for the record and not as a ranking" in head and "95% CI [" in head
    assert "better" not in head and "worse" not in head
    trained = render_report(payload([1.2], [1.21], tokens=200_000_000))
    assert "Warning:" not in trained and "within the run-to-run spread" in trained


def _sweep_payload(tmp_path, diffs):
    cfg = get_preset("small-moe")
    cfgs = {"moe": cfg, "dense": dense_equivalent(cfg)}
    pairs = []
    for b, d in zip((250_000, 500_000, 1_000_000, 2_000_000), diffs):
        for s, noise in enumerate((0.0, 0.01, -0.01)):
            dense = 2.0 - 0.1 * b / 1e6 + noise
            pairs.append({"budget": b, "seed": s, "tokens": b, "steps": b // 4096, "train_seconds": 1.0,
                          "val_bpb": {"moe": dense + d + 0.001 * s, "dense": dense},
                          "degenerate": {"moe": False, "dense": False},
                          "flops": {m: stats.training_flops(c, b, 256)["total"] for m, c in cfgs.items()}})
    rows, cross = aggregate(pairs)
    p = {"name": "sweep", "settings": {"preset": "small-moe", "override": [], "budgets": [250_000, 500_000, 1_000_000,
                                                                                         2_000_000],
                                       "seeds": [0, 1, 2], "batch_size": 16, "seq_len": 256, "lr": 2e-3,
                                       "precision": "auto", "eval_tokens": 65536},
         "models": {m: {"total_params": 1e7, "active_params": 6e6, "config": c.to_dict()} for m, c in cfgs.items()},
         "pairs": pairs, "budgets": rows, "crossover": cross, "machine": "test", "seconds": 1.0,
         "command": "moekit sweep"}
    (tmp_path / "sweep.json").write_text(json.dumps(p))
    return p, cfg


def test_sweep_outputs_and_the_report_at_equal_flops(tmp_path):
    p, cfg = _sweep_payload(tmp_path, [0.03, 0.01, -0.01, -0.03])
    assert [r["verdict"] for r in p["budgets"]] == ["worse", "worse", "better", "better"]
    assert p["crossover"]["direction"] == "moe_better" and 500_000 < p["crossover"]["x"] < 1_000_000
    # Mean differences +0.011 at 500k and -0.009 at 1M (seed noise 0, 0.001, 0.002): linear in log-tokens.
    assert p["crossover"]["x"] == pytest.approx(500_000 * 2 ** (0.011 / 0.020))
    md = render_sweep(p)
    assert f"**Crossover** at about {p['crossover']['x']:,.0f} tokens" in md
    assert "| 250,000 |" in md and "+0.0310 [" in md
    assert plot_sweep(p["budgets"], p["crossover"], tmp_path / "sweep.png").stat().st_size > 10_000
    # The main job finds the dense model's bpb at its MoE's FLOPs in the sweep (log-FLOPs interpolation).
    moe_flops = stats.training_flops(cfg, 700_000, 256)["total"]
    ctx = sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256)
    dense_at = [r["dense"]["mean"] for r in p["budgets"]]
    assert ctx["matches"] and dense_at[2] < ctx["dense_bpb_at_moe_flops"] < dense_at[1]
    text = render_report(payload([1.53, 1.57, 1.50], [1.53, 1.58, 1.49], sweep=ctx))
    assert f"**{ctx['dense_bpb_at_moe_flops']:.4f}** val bpb" in text
    # The sweep's own paired difference at these FLOPs: +0.011 at 500k and -0.009 at 1M (log interpolation).
    assert 0.011 > ctx["diff_at_moe_flops"] > -0.009 and f"**{ctx['diff_at_moe_flops']:+.4f}** bpb" in text
    assert f"crossover at about {p['crossover']['x']:,.0f}" in text
    # Another model (or batch shape) was swept: not used, and the report says why.
    other = sweep_context(tmp_path / "sweep.json", cfg.replace(n_layers=2), moe_flops, 16, 256)
    assert not other["matches"] and "model.n_layers: 4 -> 2" in other["why"]
    assert "swept another setting" in render_report(payload([1.5], [1.5], sweep=other))
    assert sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, lr=2e-3)["matches"]
    assert "lr: 0.002 -> 0.001" in sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, lr=1e-3)["why"]
    assert sweep_context(tmp_path / "none.json", cfg, moe_flops, 16, 256) is None
    # A sweep that scored a shorter piece of val is not comparable (bpb depend on the text scored).
    assert sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, val_tokens=50_000)["matches"]
    short = sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, val_tokens=80_000)
    assert not short["matches"] and "val tokens evaluated: 65536 -> 80000" in short["why"][0]
    p["pairs"] = [{**q, "val_tokens": 32_768} for q in p["pairs"]]
    (tmp_path / "sweep.json").write_text(json.dumps(p))
    assert not sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, val_tokens=50_000)["matches"]
    assert sweep_context(tmp_path / "sweep.json", cfg, moe_flops, 16, 256, val_tokens=32_768)["matches"]
    p2, _ = _sweep_payload(tmp_path, [0.03, 0.02, 0.02, 0.01])
    assert p2["crossover"] is None and "No crossover within the sweep" in render_sweep(p2)
