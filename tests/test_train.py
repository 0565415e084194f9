"""Trainer: a tiny run learns, kill-and-resume replays the same losses bit for bit, an interrupted
checkpoint write leaves the previous one loadable, bpb byte counts, bad data paths give clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import one_thread, tiny_data, tiny_model  # noqa: F401 (autouse fixture)

from moekit.cli import main as cli_main
from moekit.errors import MoekitError
from moekit.train import TrainConfig, latest_checkpoint, train
from moekit.train.evaluate import _target_bytes, evaluate_split
from moekit.train.state import load_checkpoint
from moekit.train.trainer import lr_at, param_groups


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("train"))




def _tc(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=0, ckpt_every=4, log_every=2,
                eval_tokens=None)
    return TrainConfig(**{**base, **kw})


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_lowers_loss_and_writes_outputs(data, tmp_path):
    model = tiny_model(data)
    before = evaluate_split(model, data, "val", seq_len=32)["bpb"]
    res = train(model, data, tmp_path / "run", _tc(max_steps=40, eval_every=20), progress=False)
    losses = [h["ce"] for h in res.history]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    assert res.evals[-1]["val_bpb"] < before - 0.3
    for f in ("metrics.jsonl", "telemetry.jsonl", "summary.json", "curves.png", "load_heatmap.png", "load_hist.png"):
        assert (tmp_path / "run" / f).is_file(), f
    assert (res.checkpoint / "tokenizer.json").is_file()
    assert res.tokens == 40 * 4 * 32
    # The run directory itself loads as a model: its newest checkpoint, with the tokenizer attached.
    import moekit

    loaded = moekit.load_model(tmp_path / "run")
    assert loaded.tokenizer.encode("hello").ids
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


@pytest.mark.parametrize("preset,changes", [("tiny-moe", {}),
                                            ("tiny-moe", {"aux_loss_coef": 0.0, "score_correction_bias": True,
                                                          "bias_update_rate": 1e-2, "jitter_eps": 0.1})])
def test_kill_and_resume_is_bit_exact(data, tmp_path, preset, changes):
    tc = _tc(max_steps=12)
    full = train(tiny_model(data, preset, **changes), data, tmp_path / "a", tc, progress=False)

    class Killed(Exception):
        pass

    def kill_at_6(step, rec):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_model(data, preset, **changes), data, tmp_path / "b", tc, progress=False, on_step=kill_at_6)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000004"
    # A different init seed proves the weights come from the checkpoint, not from the rebuild.
    resumed = train(tiny_model(data, preset, seed=123, **changes), data, tmp_path / "b", tc, resume=True,
                    progress=False)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # exact float equality, every step
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    from moekit.checkpoint.native import load_native

    wa = load_native(full.checkpoint).state_dict()
    wb = load_native(resumed.checkpoint).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_interrupted_checkpoint_write_keeps_previous(data, tmp_path, monkeypatch):
    import moekit.train.state as state

    out = tmp_path / "run"
    model = tiny_model(data)
    train(model, data, out, _tc(max_steps=4), progress=False)
    good = latest_checkpoint(out)
    real = state.save_file

    def torn(tensors, path, *a, **k):  # write half a file, then die as a killed process would
        real(tensors, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("simulated crash during checkpoint write")

    monkeypatch.setattr(state, "save_file", torn)
    with pytest.raises(OSError, match="simulated"):
        train(model, data, out, _tc(max_steps=8), resume=True, progress=False)
    monkeypatch.setattr(state, "save_file", real)
    assert latest_checkpoint(out) == good
    fresh = tiny_model(data, seed=5)
    opt = torch.optim.AdamW(param_groups(fresh, 0.1))
    st = load_checkpoint(good, fresh, opt)
    assert st["step"] == 4
    assert not list(good.glob(".*.tmp"))
    res = train(tiny_model(data), data, out, _tc(max_steps=8), resume=True, progress=False)
    assert res.steps == 8


def test_bpb_byte_count_matches_split(data):
    # Decoding the targets must reproduce the split's recorded UTF-8 size (the capped-eval denominator).
    ds = data.dataset("val")
    assert _target_bytes(data.tokenizer(), np.asarray(ds.tokens[1:]), data.eos_id) == ds.n_bytes
    model = tiny_model(data)
    r = evaluate_split(model, data, "val", seq_len=32)
    assert r["tokens"] == len(ds) - 1
    assert math.isclose(r["bpb"], r["nll"] / math.log(2) / ds.n_bytes)
    capped = evaluate_split(model, data, "val", seq_len=32, max_tokens=100)
    assert capped["tokens"] == 100 and 0 < capped["bytes"] < ds.n_bytes


def test_lr_schedule_and_decay_groups(data):
    tc = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, tc, 100) == pytest.approx(0.1)
    assert lr_at(9, tc, 100) == pytest.approx(1.0)
    assert lr_at(100, tc, 100) == pytest.approx(0.1)
    assert lr_at(55, tc, 100) == pytest.approx(0.55)
    model = tiny_model(data)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("router" in names[id(p)] for p in decay["params"])
    assert any(names[id(p)].startswith("embed") for p in no_decay["params"])
    assert all("norm" not in names[id(p)] for p in decay["params"])


def test_existing_run_needs_resume_flag(data, tmp_path):
    train(tiny_model(data), data, tmp_path / "r", _tc(max_steps=2), progress=False)
    with pytest.raises(MoekitError, match="--resume"):
        train(tiny_model(data), data, tmp_path / "r", _tc(max_steps=2), progress=False)
    with pytest.raises(MoekitError, match="no checkpoint"):
        train(tiny_model(data), data, tmp_path / "empty", _tc(max_steps=2), resume=True, progress=False)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_bad_data_path_is_a_clear_cli_error(tmp_path, capsys, kind):
    corpus = tmp_path / "corpus.txt"
    if kind == "empty":
        corpus.write_text("")
    rc = cli_main(["train", "--preset", "tiny-moe", "--corpus", str(corpus), "--data-dir", str(tmp_path / "d"),
                   "--out", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and str(corpus.name) in err
    assert len(err.strip().splitlines()) == 1


def test_cli_train_init_from_and_eval(data, tmp_path, capsys):
    from moekit import save_model

    init = tmp_path / "init"
    save_model(tiny_model(data), init)
    out = tmp_path / "run"
    rc = cli_main(["train", "--init-from", str(init), "--data-dir", str(data.root), "--corpus", "x",
                   "--out", str(out), "--max-steps", "3", "--batch-size", "2", "--seq-len", "32", "--no-progress",
                   "--threads", "1"])
    assert rc == 0, capsys.readouterr().err
    rc = cli_main(["eval", str(out), "--json-out", str(tmp_path / "e.json"), "--seq-len", "32"])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())["results"]
    assert set(res) == {"val", "test"} and all(math.isfinite(r["bpb"]) for r in res.values())
