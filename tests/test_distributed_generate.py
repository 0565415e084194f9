"""Expert-parallel inference (`moekit generate/bench --ep N`), gloo, ranks forked in-process (and
one real torchrun launch): EP=2 generation equals one process token for token with logits within
fp32 tolerance, through the KV cache, ragged batches, one-row decode steps (a rank with no tokens)
and routing that leaves a rank's experts without rows; the CLI prints on rank 0 only; `--ep`
without torchrun is a one-line error; `bench --ep 2` writes its JSON."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moekit import build_model, get_preset
from moekit.cli import main as cli_main
from moekit.distributed.spawn import free_port, run_local

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[5, 17, 3, 99, 42, 7, 64], [11, 2, 80]]  # ragged: right-padded prefill


def _model(name: str):
    cfg = get_preset("tiny-moe" if name == "collapsed" else name).replace(vocab_size=128, max_seq_len=48)
    if name == "collapsed":  # every token to experts 0-1 (rank 0's): rank 1's experts get no rows
        m = build_model(cfg.replace(moe=dataclasses.replace(cfg.moe, router_bias=True)), seed=0)
        with torch.no_grad():
            for layer in m.moe_layers():
                layer.router.bias.zero_()
                layer.router.bias[:2] += 100.0
        return m.eval()
    return build_model(cfg, seed=0).eval()


def _logits_trace(engine, prompts, steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Greedy prefill + decode by hand through the engine's cache: every step's logits and tokens."""
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    cache = engine.model.new_cache(len(prompts), int(lens.max()) + steps)
    with torch.inference_mode():
        logits = [engine.prefill(cache, ids, lens)]
        toks = [engine.sync_tokens(logits[-1].argmax(-1))]
        for _ in range(steps - 1):
            logits.append(engine.decode_step(cache, toks[-1]))
            toks.append(engine.sync_tokens(logits[-1].argmax(-1)))
    return logits, [t.tolist() for t in toks]


def _equivalence_worker(rank, world):
    from moekit.distributed.infer import EPEngine, apply_inference_ep
    from moekit.distributed.parallel import make_layout
    from moekit.inference import Engine, SamplingParams

    layout = make_layout(world)
    probe = EPEngine(apply_inference_ep(_model("tiny-moe"), layout))
    assert probe.sync_tokens(torch.tensor([rank, 7 * rank])).tolist() == [0, 0]  # rank 0's tokens win
    for name in ("tiny-moe", "tiny-deepseek", "collapsed"):
        m = _model(name)
        ref = Engine(copy.deepcopy(m), precision="fp32")
        ep = EPEngine(apply_inference_ep(m, layout), precision="fp32")
        assert ep.model.moe_layers()[0].experts.w13.shape[0] == m.config.moe.num_experts // world
        for prompts in (PROMPTS, PROMPTS[1:]):  # batch 2, then one row (T=1 per decode step: a rank idles)
            want_l, want_t = _logits_trace(ref, prompts, 6)
            got_l, got_t = _logits_trace(ep, prompts, 6)
            msg = f"{name}, {len(prompts)} prompts, rank {rank}"
            assert got_t == want_t, msg
            for i, (g, w) in enumerate(zip(got_l, want_l)):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda s: f"{msg}, step {i}: {s}")
            for params in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)):
                want = [g.tokens for g in ref.generate(prompts, params)]
                got = [g.tokens for g in ep.generate(prompts, params)]
                assert got == want, f"{msg}, {params}"
                assert len(ep.comm_steps) == 8 and all(c["a2a_s"] > 0 for c in ep.comm_steps)
                everyone = [None] * world
                dist.all_gather_object(everyone, got)
                assert all(e == got for e in everyone), msg


def test_ep2_generation_equals_one_process():
    run_local(_equivalence_worker, 2)


def _cli_worker(rank, world, tmp: Path):
    out = tmp / f"rank{rank}.txt"
    with open(out, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        rc_stream = cli_main(["generate", "tiny-moe", "--prompt", "1 2 3", "--max-new-tokens", "6", "--ep", "2",
                              "--threads", "1"])
        rc_file = cli_main(["generate", "tiny-moe", "--prompts-file", str(tmp / "p.jsonl"), "--output",
                            str(tmp / "ep.jsonl"), "--max-new-tokens", "6", "--ep", "2", "--threads", "1"])
        rc_bad = cli_main(["generate", "tiny-moe", "--prompt", "1 2 3", "--threads", "1"])  # --ep 1 on 2 ranks
    assert (rc_stream, rc_file, rc_bad) == (0, 0, 2)


def test_generate_cli_ep2_prints_on_rank0_only(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS))
    assert cli_main(["generate", "tiny-moe", "--prompt", "1 2 3", "--max-new-tokens", "6", "--threads", "1"]) == 0
    one = capsys.readouterr().out.split()
    assert cli_main(["generate", "tiny-moe", "--prompts-file", str(tmp_path / "p.jsonl"), "--output",
                     str(tmp_path / "one.jsonl"), "--max-new-tokens", "6", "--threads", "1"]) == 0
    run_local(_cli_worker, 2, tmp_path)
    r0, r1 = (tmp_path / "rank0.txt").read_text(), (tmp_path / "rank1.txt").read_text()
    assert r0.splitlines()[0].split() == one
    assert "EP=2, all-to-all" in r0
    assert "launched with 2 processes but --ep 1" in r0 and "Traceback" not in r0
    assert r1.strip() == "moekit generate: error: launched with 2 processes but --ep 1: EP inference needs --ep " \
        "equal to the number of processes (torchrun --nproc-per-node 2 ... --ep 2)"  # otherwise quiet
    assert (tmp_path / "ep.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


@pytest.mark.parametrize("cmd", [["generate", "tiny-moe", "--prompt", "1 2"], ["bench", "tiny-moe", "--quick"]])
def test_ep_without_torchrun_is_a_clear_error(cmd, capsys):
    assert cli_main([*cmd, "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert f"torchrun --nproc-per-node 2 -m moekit {cmd[0]}" in err and "Traceback" not in err


def _bench_worker(rank, world, out: Path):
    with open(out.parent / f"bench{rank}.txt", "w") as f, contextlib.redirect_stdout(f):
        assert cli_main(["bench", "tiny-moe", "--ep", "2", "--quick", "--batch-sizes", "1", "2", "--prompt-lens",
                         "8", "--new-tokens", "4", "--threads", "1", "--dtype", "float32", "--out", str(out)]) == 0


def test_bench_ep2_writes_results(tmp_path):
    run_local(_bench_worker, 2, tmp_path / "b")
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["ep"]["degree"] == 2 and data["ep"]["backend"] == "gloo"
    assert {(r["engine"], r["batch"]) for r in data["results"]} == {(e, b) for e in ("moekit-ep2", "moekit")
                                                                    for b in (1, 2)}
    for r in data["results"]:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        if r["engine"] == "moekit-ep2":
            assert 0 < r["a2a_share_decode"] < 1 and 0 < r["a2a_share_prefill"] < 1 and r["a2a_bytes_per_step"] > 0
            assert len(r["a2a_share_decode_per_rank"]) == 2
    md = (tmp_path / "b" / "results.md").read_text()
    assert "## Expert parallel (EP=2" in md and "all-to-all share of decode" in md
    assert (tmp_path / "bench1.txt").read_text() == ""  # rank 1 stays quiet


def test_torchrun_generate_ep2(tmp_path):
    """The real launcher: `torchrun --nproc-per-node 2 -m moekit generate ... --ep 2`."""
    args = ["generate", "tiny-moe", "--prompt", "4 5 6 7", "--max-new-tokens", "6", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "moekit", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "moekit", *args, "--ep", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0 and p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == one.stdout.split() and len(one.stdout.split()) == 6  # printed once, same tokens
