"""The `moekit` command: help, info, demo, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.cli import COMMANDS, main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for name in ("info", "demo", "data"):
        assert name in r.stdout


def test_every_registered_command_imports_and_has_help(capsys):
    from moekit.cli import _resolve

    for name, target in COMMANDS.items():
        fn = _resolve(target)  # every command in the table must be importable with the dev extras
        assert (fn.__doc__ or "").strip(), f"{name} has no docstring (it is the help text)"
        with pytest.raises(SystemExit) as e:
            main([*name.split(), "--help"])
        assert e.value.code == 0, name


def test_info_json(capsys):
    assert main(["info", "tiny-deepseek", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"]["total_params"] == 350656
    assert d["moe_layers"] == [1, 2]
    assert d["weight_bytes"]["bf16"] > d["weight_bytes"]["int8"] > d["weight_bytes"]["int4"]


def test_info_table_and_model_dir(tmp_path, capsys):
    import moekit

    moekit.build_model(moekit.get_preset("tiny-moe")).save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "int4" in out


def test_bad_input_is_one_clean_line():
    r = run("info", "no-such-model")
    assert r.returncode == 2
    assert "unknown preset 'no-such-model'" in r.stderr
    assert "Traceback" not in r.stderr


def test_demo_runs(capsys):
    assert main(["demo", "--preset", "tiny-deepseek", "--tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "layer 0: dense" in out and "max/mean" in out
