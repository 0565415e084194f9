"""The main job end to end at toy size: both models train on the same tokens, are evaluated, and the
report's verdict agrees with its numbers."""

from __future__ import annotations

import json

import pytest
from train_helpers import one_thread, tiny_data  # noqa: F401 (autouse fixture)

from moekit.train.compare import compare




def test_compare_end_to_end(tmp_path, monkeypatch):
    data = tiny_data(tmp_path)
    # The job prepares its corpus itself; point it at the tiny one.
    import moekit.data as mdata

    monkeypatch.setattr(mdata, "prepare", lambda *a, **k: data)
    kw = dict(runs_dir=str(tmp_path / "runs"), seeds=2, min_tokens_per_run=1000, batch_size=4, seq_len=32,
              precision="fp32", eval_tokens=None, eval_every=10, progress=False)
    report = compare("toy", "tiny-moe", max_tokens=2 * 20 * 4 * 32, **kw)  # the budget is split across 2 seeds
    res = json.loads((report.parent / "results.json").read_text())
    assert res["seeds"]["used"] == [0, 1] and res["seeds"]["reason"] is None
    for s in ("0", "1"):
        moe, dense = res["runs"][s]["models"]["moe"], res["runs"][s]["models"]["dense"]
        assert moe["tokens"] == dense["tokens"] == 20 * 4 * 32 and moe["steps"] == dense["steps"] == 20
        assert (report.parent / f"seed{s}" / "moe" / "summary.json").is_file()
    moe, dense = res["models"]["moe"], res["models"]["dense"]
    assert abs(moe["active_params"] - dense["active_params"]) / dense["active_params"] < 0.02
    assert moe["total_params"] > dense["total_params"]
    # Different seeds are different runs; the statistics are those of the per-seed results.
    r0, r1 = (res["runs"][s]["results"] for s in ("0", "1"))
    assert r0["moe"]["val"]["bpb"] != r1["moe"]["val"]["bpb"]
    vals = {m: [r0[m]["val"]["bpb"], r1[m]["val"]["bpb"]] for m in ("moe", "dense")}
    assert res["results"]["moe"]["val"]["mean"] == pytest.approx(sum(vals["moe"]) / 2)
    assert res["paired"]["diffs"] == pytest.approx([a - b for a, b in zip(vals["moe"], vals["dense"])])
    text = report.read_text()
    for split in ("val", "test"):
        assert f"{res['results']['moe'][split]['mean']:.4f}" in text
    from moekit.train import stats

    degen = {m: any(stats.degenerate(res["runs"][s]["samples"][m].values()) for s in ("0", "1"))
             for m in ("moe", "dense")}
    assert stats.verdict(res["paired"], degen)[1] in text  # the verdict the report's own numbers support
    assert res["machine"] in text and "ISA tier" in res["machine"]
    assert "Tokens per active parameter" in text and "far from trained" in text and res["flops"]["equal"]
    for png in ("curves.png", "lr.png", "seed0/moe/load_heatmap.png", "seed0/moe/load_hist.png"):
        assert (report.parent / png).is_file()
    assert set(res["runs"]["0"]["samples"]["moe"]) == set(res["runs"]["0"]["samples"]["dense"])
    # A second run reuses the finished trainings and their evaluations (same numbers).
    again = compare("toy", "tiny-moe", max_tokens=2 * 20 * 4 * 32, **kw)
    res2 = json.loads((again.parent / "results.json").read_text())
    assert res2["results"] == res["results"] and res2["paired"] == res["paired"]
    assert res2["models"]["moe"]["reuse"].count("reused") == 2 and res2["models"]["dense"]["reuse"].count("reused") == 2
    # A different batch shape is a different experiment: retrained, and the report says why.
    third = compare("toy", "tiny-moe", max_tokens=2 * 20 * 4 * 32, **{**kw, "batch_size": 2})
    res3 = json.loads((third.parent / "results.json").read_text())
    assert "train.batch_size: 4 -> 2" in res3["models"]["moe"]["reuse"] and res3["models"]["moe"]["steps"] == 40
    assert "train.batch_size: 4 -> 2" in third.read_text()


def test_compare_trains_fewer_seeds_when_runs_would_be_too_short(tmp_path, monkeypatch):
    data = tiny_data(tmp_path)
    import moekit.data as mdata

    monkeypatch.setattr(mdata, "prepare", lambda *a, **k: data)
    report = compare("few", "tiny-moe", runs_dir=str(tmp_path / "runs"), max_tokens=10 * 4 * 32, seeds=3,
                     min_tokens_per_run=1000, batch_size=4, seq_len=32, precision="fp32", eval_tokens=256,
                     eval_every=0, progress=False)
    res = json.loads((report.parent / "results.json").read_text())
    assert res["seeds"]["used"] == [0] and res["models"]["moe"]["tokens"] == 10 * 4 * 32
    assert "1 of 3 requested seeds" in res["seeds"]["reason"] and res["seeds"]["reason"] in report.read_text()
    assert res["paired"]["ci"] is None and "Over 1 seed," in report.read_text()


def test_compare_minutes_budget_retrains_and_both_finish_one_schedule(tmp_path, monkeypatch):
    """`moekit compare` twice with different --minutes: the second run trains afresh (its budget differs).
    The wall clock only sizes the MoE's cosine; both models then follow the same lr at every step down
    to the schedule's end, and the report records how each run stopped and plots both lrs."""
    data = tiny_data(tmp_path)
    import moekit.data as mdata
    from moekit.train.compare import _lrs
    from moekit.train.trainer import TrainConfig, lr_at

    monkeypatch.setattr(mdata, "prepare", lambda *a, **k: data)
    kw = dict(runs_dir=str(tmp_path / "runs"), batch_size=2, seq_len=16, precision="fp32", eval_tokens=2048,
              eval_every=0, progress=False)
    first = compare("clock", "tiny-moe", minutes=0.04, **kw)
    r1 = json.loads((first.parent / "results.json").read_text())
    second = compare("clock", "tiny-moe", minutes=0.05, **kw)
    r2 = json.loads((second.parent / "results.json").read_text())
    why = r2["models"]["moe"]["reuse"]
    assert "trained afresh" in why and "budget.minutes: 0.04 -> 0.05" in why, why
    assert "trained afresh" in r2["models"]["dense"]["reuse"]
    for r in (r1, r2):
        assert r["seeds"]["used"] == [0] and r["seeds"]["probe_tokens_per_s"] > 0  # 3 seeds need 250k tokens each
        moe, dense = r["runs"]["0"]["models"]["moe"], r["runs"]["0"]["models"]["dense"]
        assert moe["stopped_by"] == "schedule_end" and dense["stopped_by"] == "budget"
        assert moe["steps"] == dense["steps"] == moe["schedule_steps"] and r["schedule"]["same_lr_per_step"]
    # The second run replaced the first one's files: check its schedules step by step.
    moe, report = r2["models"]["moe"], second
    lrs = _lrs(report.parent / "seed0" / "moe")
    assert lrs == _lrs(report.parent / "seed0" / "dense") and len(lrs) == moe["steps"]
    # Every step on the schedule sized for this many steps, the last one at its end.
    tc = TrainConfig(lr=2e-3)
    assert [lr for _, lr in lrs] == pytest.approx([lr_at(s, tc, moe["steps"]) for s in range(moe["steps"])])
    if moe["steps"] > tc.warmup_steps + 1:
        assert moe["final_lr"] == pytest.approx(tc.lr * tc.min_lr_ratio, rel=0.1)
    text = report.read_text()
    assert "schedule_end" in text and "![lr](lr.png)" in text and (report.parent / "lr.png").is_file()


def test_verdict_needs_a_difference_beyond_the_run_to_run_spread():
    from moekit.train.compare import RUN_TO_RUN_SPREAD_BPB, degenerate, verdict_text

    ok = {"moe": False, "dense": False}
    assert "within the run-to-run spread" in verdict_text(1.600, 1.6043, ok)  # the "better by 0.0043" case
    assert "better by 0.0500" in verdict_text(1.55, 1.60, ok)
    assert "**not** better" in verdict_text(1.65, 1.60, ok)
    assert "within" in verdict_text(1.60 + 0.95 * RUN_TO_RUN_SPREAD_BPB, 1.60, ok)
    assert "not ranked" in verdict_text(1.0, 3.0, {"moe": False, "dense": True})
    assert degenerate(["the the the the the the the the"])
    assert degenerate(["and the and the and the and the and the"])
    assert not degenerate(["The history of the city begins with a small harbor on the river."])
