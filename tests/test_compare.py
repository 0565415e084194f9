"""The main job end to end at toy size: both models train on the same tokens, are evaluated, and the
report's verdict agrees with its numbers."""

from __future__ import annotations

import json

import pytest
from train_helpers import one_thread, tiny_data  # noqa: F401 (autouse fixture)

from moekit.train.compare import compare, render_report




def test_compare_end_to_end(tmp_path, monkeypatch):
    data = tiny_data(tmp_path)
    # The job prepares its corpus itself; point it at the tiny one.
    import moekit.data as mdata

    monkeypatch.setattr(mdata, "prepare", lambda *a, **k: data)
    report = compare("toy", "tiny-moe", runs_dir=str(tmp_path / "runs"), max_tokens=20 * 4 * 32, batch_size=4,
                     seq_len=32, precision="fp32", eval_tokens=None, eval_every=10, progress=False)
    res = json.loads((report.parent / "results.json").read_text())
    moe, dense = res["models"]["moe"], res["models"]["dense"]
    assert moe["tokens"] == dense["tokens"] == 20 * 4 * 32 and moe["steps"] == dense["steps"] == 20
    assert abs(moe["active_params"] - dense["active_params"]) / dense["active_params"] < 0.02
    assert moe["total_params"] > dense["total_params"]
    text = report.read_text()
    for split in ("val", "test"):
        assert f"{res['results']['moe'][split]['bpb']:.4f}" in text
    from moekit.train.compare import degenerate, verdict_text

    mv, dv = res["results"]["moe"]["val"]["bpb"], res["results"]["dense"]["val"]["bpb"]
    degen = {m: degenerate(res["samples"][m].values()) for m in ("moe", "dense")}
    assert verdict_text(mv, dv, degen) in text  # the verdict the report's own numbers support
    assert res["machine"] in text and "ISA tier" in res["machine"]
    for png in ("curves.png", "moe/load_heatmap.png", "moe/load_hist.png"):
        assert (report.parent / png).is_file()
    assert set(res["samples"]["moe"]) == set(res["samples"]["dense"]) and res["samples"]["moe"]
    # A second run reuses the finished trainings (no retraining, same numbers).
    again = compare("toy", "tiny-moe", runs_dir=str(tmp_path / "runs"), max_tokens=20 * 4 * 32, batch_size=4,
                    seq_len=32, precision="fp32", eval_tokens=None, eval_every=10, progress=False)
    res2 = json.loads((again.parent / "results.json").read_text())
    assert res2["results"] == res["results"]
    assert res2["models"]["moe"]["reuse"].startswith("reused") and res2["models"]["dense"]["reuse"].startswith("reused")
    # A different batch shape is a different experiment: retrained, and the report says why.
    third = compare("toy", "tiny-moe", runs_dir=str(tmp_path / "runs"), max_tokens=20 * 4 * 32, batch_size=2,
                    seq_len=32, precision="fp32", eval_tokens=None, eval_every=10, progress=False)
    res3 = json.loads((third.parent / "results.json").read_text())
    assert "train.batch_size: 4 -> 2" in res3["models"]["moe"]["reuse"] and res3["models"]["moe"]["steps"] == 40
    assert "train.batch_size: 4 -> 2" in third.read_text()


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
    assert why.startswith("trained afresh") and "budget.minutes: 0.04 -> 0.05" in why, why
    assert r2["models"]["dense"]["reuse"].startswith("trained afresh")
    for r in (r1, r2):
        moe, dense = r["models"]["moe"], r["models"]["dense"]
        assert moe["stopped_by"] == "schedule_end" and dense["stopped_by"] == "budget"
        assert moe["steps"] == dense["steps"] == moe["schedule_steps"] and r["schedule"]["same_lr_per_step"]
    # The second run replaced the first one's files: check its schedules step by step.
    moe, report = r2["models"]["moe"], second
    lrs = _lrs(report.parent / "moe")
    assert lrs == _lrs(report.parent / "dense") and len(lrs) == moe["steps"]
    # Every step on the schedule sized for this many steps, the last one at its end.
    tc = TrainConfig(lr=2e-3)
    assert [lr for _, lr in lrs] == pytest.approx([lr_at(s, tc, moe["steps"]) for s in range(moe["steps"])])
    if moe["steps"] > tc.warmup_steps + 1:
        assert moe["final_lr"] == pytest.approx(tc.lr * tc.min_lr_ratio, rel=0.1)
    text = report.read_text()
    assert "schedule_end" in text and "![lr](lr.png)" in text and (report.parent / "lr.png").is_file()


@pytest.mark.parametrize("moe_bpb,dense_bpb,better", [(1.9, 2.0, True), (2.1, 2.0, False)])
def test_report_verdict(moe_bpb, dense_bpb, better):
    row = {"tokens": 1000, "train_seconds": 1.0, "tokens_per_s": 1000.0, "total_params": 2e6, "active_params": 1e6}
    p = {"name": "x", "data_seconds": 1.0, "total_seconds": 60.0, "threads": 2,
         "models": {"moe": row, "dense": row},
         "results": {"moe": {"val": {"bpb": moe_bpb, "tokens": 10}}, "dense": {"val": {"bpb": dense_bpb, "tokens": 10}}},
         "samples": {"moe": {"p": "a"}, "dense": {"p": "b"}}}
    text = render_report(p)
    assert ("the MoE is better" in text) == better
    assert ("**not** better" in text) == (not better)


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
