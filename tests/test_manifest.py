"""Checkpoint manifests: a damaged newest checkpoint (truncated, missing or bit-flipped file) makes
--resume fall back to the previous one with a warning naming it, and the resumed run replays the
uninterrupted run's losses bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
from train_helpers import one_thread, tiny_data, tiny_model  # noqa: F401 (autouse fixture)

from moekit.checkpoint.manifest import MANIFEST, CheckpointWarning, resolve_resume, verify, write_manifest
from moekit.cli import main as cli_main
from moekit.errors import MoekitError
from moekit.train import TrainConfig, latest_checkpoint, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("manifest"))


@pytest.fixture(scope="module")
def full_losses(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "a"
    train(tiny_model(data), data, out, _tc(), progress=False)
    return _losses(out)


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory):
    """A run killed at step 7: checkpoints step-4 and step-6 on disk, LATEST -> step-6."""
    out = tmp_path_factory.mktemp("killed") / "b"

    def kill_at_7(step, rec):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_model(data), data, out, _tc(), progress=False, on_step=kill_at_7)
    assert latest_checkpoint(out).name == "step-0000006"
    return out


def _tc(**kw) -> TrainConfig:
    base = dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=0, ckpt_every=2, log_every=2,
                eval_tokens=None, max_steps=8)
    return TrainConfig(**{**base, **kw})


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def _damage(path, how: str) -> None:
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(f.seek(0, 2) // 2)
    elif how == "missing":
        path.unlink()
    else:  # one flipped bit in the middle of the file: same size, different content
        b = bytearray(path.read_bytes())
        b[len(b) // 2] ^= 0x10
        path.write_bytes(bytes(b))


@pytest.mark.parametrize("fname,how", [("rng.safetensors", "truncated"), ("model.safetensors", "missing"),
                                       ("optimizer.safetensors", "bitflip"), ("trainer_state.json", "bitflip")])
def test_damaged_newest_checkpoint_falls_back_bit_exact(data, tmp_path, full_losses, killed, fname, how):
    out = tmp_path / "b"
    shutil.copytree(killed, out)
    newest = out / "checkpoints" / "step-0000006"
    assert verify(newest) is None
    _damage(newest / fname, how)
    assert fname in verify(newest)
    with pytest.warns(CheckpointWarning, match=r"step-0000006 is damaged: " + fname):
        res = train(tiny_model(data, seed=123), data, out, _tc(), resume=True, progress=False)
    assert res.steps == 8
    assert _losses(out) == full_losses  # exact float equality, every step (replayed from step 4)
    assert verify(out / "checkpoints" / "step-0000008") is None


def test_manifest_written_last_and_lists_every_file(data, tmp_path):
    out = tmp_path / "r"
    train(tiny_model(data), data, out, _tc(max_steps=4, ckpt_every=4), progress=False)
    ck = latest_checkpoint(out)
    doc = json.loads((ck / MANIFEST).read_text())
    assert set(doc["files"]) == {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                 "tokenizer.json", "trainer_state.json"}
    # The manifest is the newest file: written after everything it describes.
    assert (ck / MANIFEST).stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in ck.iterdir())
    # A save that dies before the manifest leaves an incomplete checkpoint (and LATEST not yet
    # pointing at it) that resume skips.
    (ck / MANIFEST).unlink()
    (out / "checkpoints" / "LATEST").unlink()
    assert "did not finish" in verify(ck)
    with pytest.warns(CheckpointWarning, match="did not finish"):
        assert resolve_resume(out) is None
    with pytest.raises(MoekitError, match="no checkpoint.*did not finish"):
        train(tiny_model(data), data, out, _tc(max_steps=4, ckpt_every=4), resume=True, progress=False)
    write_manifest(ck)
    assert resolve_resume(out) == ck
    _damage(ck / "config.json", "bitflip")
    with pytest.raises(MoekitError, match="config.json fails its sha256"), pytest.warns(CheckpointWarning):
        train(tiny_model(data), data, out, _tc(max_steps=4, ckpt_every=4), resume=True, progress=False)


def test_legacy_checkpoint_without_any_manifest_loads_unverified(data, tmp_path):
    out = tmp_path / "old"
    train(tiny_model(data), data, out, _tc(max_steps=4, ckpt_every=4), progress=False)
    (latest_checkpoint(out) / MANIFEST).unlink()
    # A run where *no* checkpoint has a manifest predates them: LATEST is trusted, with a warning.
    with pytest.warns(CheckpointWarning, match="unverified"):
        assert resolve_resume(out) == latest_checkpoint(out)


def test_cli_resume_with_truncated_rng_warns_instead_of_crashing(data, tmp_path, capsys):
    from moekit import save_model

    init = tmp_path / "init"
    save_model(tiny_model(data), init)
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(data.root), "--corpus", "x", "--out", str(out), "--batch-size", "2",
            "--seq-len", "32", "--no-progress", "--threads", "1", "--ckpt-every", "2", "--eval-every", "0"]
    assert cli_main([*args, "--init-from", str(init), "--max-steps", "4"]) == 0, capsys.readouterr().err
    newest = latest_checkpoint(out)
    _damage(newest / "rng.safetensors", "truncated")
    with pytest.warns(CheckpointWarning, match=f"{newest.name} is damaged: rng.safetensors has"):
        rc = cli_main([*args, "--resume", "--max-steps", "6"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Traceback" not in err and "SafetensorError" not in err
    assert latest_checkpoint(out).name == "step-0000006"


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    # mkstemp makes 0600 files; outputs must get 0666 minus the umask like any file the user writes.
    import os

    from moekit.checkpoint.native import atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a.json").read_text() == "{}"
