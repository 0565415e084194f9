"""`torchrun --nproc-per-node 2 -m moekit train ... --ep 2 --eplb-interval 2 --eplb-redundant 2`
replays the one-process loss curve while EPLB moves experts (weights and AdamW moments) into
replicated placements at steps 2 and 4; its gathered checkpoint (replicas folded back to logical
experts) resumes in one process with the same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_data

from moekit.cli import main as cli_main
from moekit.distributed.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("dtrain"))


def _args(data, out, *more):
    # Aux loss off: the Switch loss is computed per rank, which is not the global-batch loss.
    return ["train", "--preset", "tiny-moe", "--data-dir", str(data.root), "--corpus", "x", "--max-steps", "6",
            "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--precision", "fp32", "--eval-every", "0",
            "--ckpt-every", "3", "--no-progress", "--lr", "3e-3", "--warmup-steps", "2", "--balance", "none",
            "--out", str(out), *more]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_ep2_matches_single_process_and_resumes_in_one(data, tmp_path):
    torch.set_num_threads(1)
    assert cli_main(_args(data, tmp_path / "one")) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "moekit", *_args(data, tmp_path / "ep2", "--ep", "2", "--eplb-interval", "2", "--eplb-redundant", "2")]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    one, ep2 = _losses(tmp_path / "one"), _losses(tmp_path / "ep2")
    assert len(ep2) == 6
    torch.testing.assert_close(ep2, one, rtol=2e-6, atol=0)
    recs = [json.loads(x) for x in (tmp_path / "ep2" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["ep_balancedness"]) == 2 and all(0.5 <= b <= 1 for b in r["ep_balancedness"]) for r in recs)
    # Resume the EP run's step-3 checkpoint (gathered to the one-process layout) in one process.
    ck = tmp_path / "ep2" / "checkpoints"
    shutil.rmtree(ck / "step-0000006")
    (ck / "LATEST").write_text("step-0000003")
    assert cli_main(_args(data, tmp_path / "ep2", "--resume")) == 0
    torch.testing.assert_close(_losses(tmp_path / "ep2"), one, rtol=2e-6, atol=0)


def test_ep_without_torchrun_is_a_clear_error(data, tmp_path, capsys):
    rc = cli_main(_args(data, tmp_path / "x", "--ep", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun --nproc-per-node 2" in err and "Traceback" not in err
