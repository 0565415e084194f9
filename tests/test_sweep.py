"""`moekit sweep` end to end at toy size: 2 budgets x 2 seeds of tiny-moe and its dense equivalent, each
run on its own schedule to its budget, paired per seed, resumable, and driven from the CLI."""

from __future__ import annotations

import json

import pytest
from train_helpers import one_thread, tiny_data  # noqa: F401 (autouse fixture)

from moekit.train import stats
from moekit.train.pairs import lrs
from moekit.train.sweep import sweep


def test_sweep_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    data = tiny_data(tmp_path)
    import moekit.data as mdata

    monkeypatch.setattr(mdata, "prepare", lambda *a, **k: data)
    runs = tmp_path / "runs"
    args = ["sweep", "--preset", "tiny-moe", "--override", "max_seq_len=64", "--budgets", "512", "1024",
            "--seeds", "0", "1", "--batch-size", "4", "--seq-len", "32", "--precision", "fp32", "--eval-tokens", "0",
            "--runs-dir", str(runs), "--no-progress"]
    # Interrupted after one seed: the first call runs seed 0 only, the CLI then adds seed 1.
    sweep("sweep", "tiny-moe", override=["max_seq_len=64"], budgets=[512, 1024], seeds=[0], runs_dir=str(runs),
          batch_size=4, seq_len=32, precision="fp32", eval_tokens=None, progress=False)
    from moekit.cli import main

    assert main(args) == 0
    root = runs / "sweep"
    res = json.loads((root / "sweep.json").read_text())
    assert [(p["budget"], p["seed"]) for p in res["pairs"]] == [(512, 0), (1024, 0), (512, 1), (1024, 1)]
    assert all(p["reuse"]["moe"].startswith("reused") for p in res["pairs"] if p["seed"] == 0)
    assert all(p["reuse"]["moe"].startswith("trained") for p in res["pairs"] if p["seed"] == 1)
    for p in res["pairs"]:
        pdir = root / f"tokens{p['budget']}" / f"seed{p['seed']}"
        sched = {m: lrs(pdir / m) for m in ("moe", "dense")}
        assert p["tokens"] == p["budget"] and len(sched["moe"]) == p["budget"] // 128  # its own schedule's length
        assert sched["moe"] == sched["dense"]  # the pair shares every step's learning rate
    rows = res["budgets"]
    assert [r["budget"] for r in rows] == [512, 1024] and all(r["seeds"] == [0, 1] for r in rows)
    for r in rows:
        by_seed = {p["seed"]: p["val_bpb"] for p in res["pairs"] if p["budget"] == r["budget"]}
        want = stats.paired({s: v["moe"] for s, v in by_seed.items()}, {s: v["dense"] for s, v in by_seed.items()})
        assert r["paired"]["diffs"] == pytest.approx(want["diffs"]) and r["paired"]["ci"] is not None
        assert r["moe"]["mean"] == pytest.approx(sum(v["moe"] for v in by_seed.values()) / 2)
    assert rows[1]["flops"]["moe"] == pytest.approx(2 * rows[0]["flops"]["moe"])
    assert (root / "sweep.png").stat().st_size > 10_000
    md = (root / "sweep.md").read_text()
    assert "| 512 |" in md and "| 1,024 |" in md and "Pairs done: 4 of 4" in md
    assert md in capsys.readouterr().out
    # A rerun reuses every run and evaluation: same numbers.
    assert main(args) == 0
    again = json.loads((root / "sweep.json").read_text())
    assert again["budgets"] == res["budgets"] and all(p["reuse"]["dense"].startswith("reused") for p in again["pairs"])
    # Another eval length re-evaluates the finished runs without retraining them.
    i = args.index("--eval-tokens")
    assert main(args[:i + 1] + ["64"] + args[i + 2:]) == 0
    short = json.loads((root / "sweep.json").read_text())
    assert all(p["reuse"][m].startswith("reused") for p in short["pairs"] for m in ("moe", "dense"))
    assert {p["val_tokens"] for p in short["pairs"]} == {64} and short["budgets"] != res["budgets"]


def test_sweep_rejects_bad_input(tmp_path):
    from moekit.cli import main

    assert main(["sweep", "--budgets", "10", "--runs-dir", str(tmp_path), "--no-progress"]) == 2
    from moekit.errors import MoekitError
    from moekit.train.pairs import resolve_pair

    with pytest.raises(MoekitError, match="key=value"):
        resolve_pair("tiny-moe", 320, ["moe.top_k"])
    with pytest.raises(MoekitError, match="unknown field 'topk'"):
        resolve_pair("tiny-moe", 320, ["moe.topk=1"])
    with pytest.raises(MoekitError, match="dense"):
        resolve_pair("tiny-dense", 320)
    moe, dense = resolve_pair("tiny-moe", 320, ["moe.top_k=1", "moe.num_experts=4"])
    assert (moe.moe.top_k, moe.moe.num_experts, moe.vocab_size) == (1, 4, 320) and dense.moe is None
