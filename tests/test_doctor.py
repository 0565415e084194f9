"""`moekit doctor`: the facts it reports follow the forced tier, and it runs from the CLI."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main as cli_main
from moekit.doctor import facts, markdown, summary_line
from moekit.kernels import isa


def test_doctor_json_from_the_cli(capsys):
    assert cli_main(["doctor", "--json", "--no-build"]) == 0
    f = json.loads(capsys.readouterr().out)
    for key in ("cpu", "isa_tier", "isa_tiers_available", "torch_cpu_capability", "bf16_native",
                "auto_compute_dtype", "kernels", "threads", "expert_backends"):
        assert key in f, key
    assert f["expert_backends"]["training (autograd)"] == "torch"
    assert f["auto_compute_dtype"] == ("bfloat16" if f["bf16_native"] else "float32")


def test_doctor_follows_a_forced_tier(monkeypatch, capsys):
    if "avx2" not in isa.supported_tiers():
        pytest.skip("no AVX2 tier")
    monkeypatch.setenv(isa.ENV, "avx2")
    f = facts(build_kernels=False)
    assert f["isa_tier"] == "avx2" and f["bf16_native"] is False and f["auto_compute_dtype"] == "float32"
    assert f["isa_tier_forced"] == (isa.supported_tiers()[-1] != "avx2")
    assert "avx2" in summary_line(f) and "| compute dtype (auto) | float32 |" in markdown(f)
    assert cli_main(["doctor", "--no-build"]) == 0
    assert "float32" in capsys.readouterr().out
