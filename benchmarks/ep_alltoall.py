"""All-to-all share of an EP training step on this machine (gloo, loopback), measured against the
simulator's link model fitted to this machine.

    python benchmarks/ep_alltoall.py --world 2 4 --steps 6 --out benchmarks/results/ep_alltoall.json

Plan per world size W (EP = W, one thread per rank):
1. fit the link model: all_to_all_single of growing row blocks, time = alpha + bytes/BW (least
   squares on the max over ranks);
2. train `--preset` for --steps steps (batch sharded over the ranks, bf16 autocast) and read
   moekit.distributed.ep.COMM: seconds inside all-to-alls and bytes sent to other ranks;
3. the estimate: calls * alpha + bytes / BW (the simulator's model, bytes exactly the dispatcher's,
   see tests/test_distributed.py::test_simulator_bytes_equal_dispatcher_bytes).
Measured all-to-all time includes waiting for the slowest rank; the model does not. Numbers from a
shared, loaded 2-core host are indicative only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's moekit, not an installed one


def _fit(rank, world, sizes, reps=5):
    xs, ts = [], []
    for rows in sizes:
        x = torch.randn(rows * world, 256)
        splits = [rows] * world
        for _ in range(2):
            dist.all_to_all_single(torch.empty_like(x), x, splits, splits)
        best = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(torch.empty_like(x), x, splits, splits)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            best.append(float(t))
        xs.append(rows * (world - 1) * 256 * 4)
        ts.append(sorted(best)[len(best) // 2])
    A = torch.tensor([[1.0, b] for b in xs], dtype=torch.float64)
    sol = torch.linalg.lstsq(A, torch.tensor(ts, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1)
    alpha, inv_bw = float(sol[0]), float(sol[1])
    return max(alpha, 0.0), 1.0 / inv_bw if inv_bw > 0 else float("inf"), list(zip(xs, ts))


def _worker(rank, world, preset, steps, batch, seq, out):
    from moekit import build_model, get_preset
    from moekit.distributed import apply_expert_parallel, make_layout
    from moekit.distributed.ep import COMM
    from moekit.distributed.train import TrainParallel

    alpha, bw, pts = _fit(rank, world, [64, 256, 1024, 4096])
    layout = make_layout(world)
    model = apply_expert_parallel(build_model(get_preset(preset), seed=0), layout).train()
    par = TrainParallel(layout, model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    times, comm = [], []
    for step in range(steps):
        x = torch.randint(0, model.config.vocab_size, (batch, seq + 1), generator=g)
        xb, yb = par.shard(x[:, :-1], x[:, 1:])
        dist.barrier()
        c0, b0, n0 = COMM["seconds"], COMM["bytes"], COMM["calls"]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = model(xb, labels=yb)
        o.loss.backward()
        par.sync_grads()
        par.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step > 0:  # the first step builds oneDNN primitives
            times.append(dt)
            comm.append((COMM["seconds"] - c0, COMM["bytes"] - b0, COMM["calls"] - n0))
    t = torch.tensor([sum(times) / len(times), sum(c[0] for c in comm) / len(comm),
                      sum(c[1] for c in comm) / len(comm), comm[0][2]], dtype=torch.float64)
    allt = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(allt, t)
    if rank == 0:
        per = torch.stack(allt)
        step_s = float(per[:, 0].max())
        a2a_s = float(per[:, 1].max())
        max_bytes = float(per[:, 2].max())
        calls = int(per[0, 3])
        est = calls * alpha + max_bytes / bw
        Path(out).write_text(json.dumps({
            "world": world, "preset": preset, "batch": batch, "seq": seq, "step_s": step_s,
            "a2a_s_measured": a2a_s, "a2a_share_measured": a2a_s / step_s, "a2a_calls_per_step": calls,
            "a2a_bytes_per_step_max_rank": max_bytes, "fit_alpha_us": alpha * 1e6, "fit_bw_gbs": bw / 1e9,
            "fit_points": pts, "a2a_s_model": est, "a2a_share_model": est / step_s,
            "cpu": platform.processor() or platform.machine()}, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/ep_alltoall.json")
    a = ap.parse_args()
    from moekit.distributed.spawn import run_local
    from moekit.plan.hardware import _cpu_model

    res = []
    for w in a.world:
        tmp = Path(a.out).with_suffix(f".w{w}.tmp.json")
        run_local(_worker, w, a.preset, a.steps, a.batch, a.seq, str(tmp))
        r = json.loads(tmp.read_text())
        tmp.unlink()
        r["cpu"] = _cpu_model()
        res.append(r)
        print(f"EP={w}: step {r['step_s'] * 1e3:.0f} ms, all-to-all measured {r['a2a_s_measured'] * 1e3:.1f} ms "
              f"({r['a2a_share_measured']:.1%}), model {r['a2a_s_model'] * 1e3:.1f} ms ({r['a2a_share_model']:.1%}); "
              f"{r['a2a_calls_per_step']} calls, {r['a2a_bytes_per_step_max_rank'] / 1e6:.2f} MB/rank/step; "
              f"fit alpha {r['fit_alpha_us']:.0f} us, BW {r['fit_bw_gbs']:.2f} GB/s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
