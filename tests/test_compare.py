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
    better = res["results"]["moe"]["val"]["bpb"] < res["results"]["dense"]["val"]["bpb"]
    assert ("is **not** better" in text) != better
    for png in ("curves.png", "moe/load_heatmap.png", "moe/load_hist.png"):
        assert (report.parent / png).is_file()
    assert set(res["samples"]["moe"]) == set(res["samples"]["dense"]) and res["samples"]["moe"]
    # A second run reuses the finished trainings (no retraining, same numbers).
    again = compare("toy", "tiny-moe", runs_dir=str(tmp_path / "runs"), max_tokens=20 * 4 * 32, batch_size=4,
                    seq_len=32, precision="fp32", eval_tokens=None, progress=False)
    res2 = json.loads((again.parent / "results.json").read_text())
    assert res2["results"] == res["results"]


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
