"""Cost-aware routing whose cost is an offload-cache miss: decode tokens/s, cache hit rate, bytes
read and val bpb for several lambdas against lambda = 0, with experts offloaded under a memory budget.

    python benchmarks/routing_offload_cost.py runs/s0 [runs/s1 runs/s2] --data-dir data \
        --expert-memory-budget 0.4 --lambdas 0 0.05 0.2 1 --rounds 3

With several checkpoints (seeds of one recipe), each lambda's bpb change and speed ratio against
lambda = 0 are paired per checkpoint and reported as mean ± std over them.

One process, one offloaded model; the lambdas are interleaved within each round (rotating which
goes first) so a machine whose speed drifts slows every setting alike; tokens/s is the median over
rounds. The cost of expert e in layer l is 1 when e is not resident in l's cache, 0 when it is
(`moekit.moe.cost.OffloadMissCost`, read on every forward), normalised as in docs/routing.md.
Indicative numbers on a shared machine; writes offload_cost.json and offload_cost.md (atomically).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write_text  # noqa: E402
from moekit.inference.engine import Engine  # noqa: E402
from moekit.inference.sampling import SamplingParams  # noqa: E402
from moekit.memory.offload import close_offload, load_offloaded, offload_telemetry, reset_telemetry  # noqa: E402
from moekit.moe.cost import FlopsMeter, clear_routing_cost, set_routing_cost  # noqa: E402
from moekit.train.evaluate import data_for_checkpoint, evaluate_split, resolve_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_pareto import cpu_name  # noqa: E402


def _apply(model, lam: float) -> None:
    clear_routing_cost(model)
    if lam:
        set_routing_cost(model, lam=lam, cost="offload_misses")


def run_checkpoint(ckpt: str, args) -> tuple[list[dict], dict]:
    """Rows (one per lambda: val bpb and medians over rounds) and metadata for one checkpoint."""
    # Plan: 1. load the model offloaded; 2. per round, per lambda (rotated): greedy decode of the
    # same prompts, timing it and reading the cache telemetry; 3. val bpb per lambda.
    path = resolve_checkpoint(ckpt)
    data = data_for_checkpoint(path, args.data_dir)
    model = load_offloaded(path, args.expert_memory_budget)
    toks = data.dataset("val").tokens
    prompts = [[int(t) for t in toks[i * args.prompt_len:(i + 1) * args.prompt_len]] for i in range(args.prompts)]
    engine = Engine(model, max_batch_size=args.prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    runs: dict[float, list[dict]] = {lam: [] for lam in args.lambdas}
    try:
        for rnd in range(args.rounds):
            k = rnd % len(args.lambdas)
            for lam in args.lambdas[k:] + args.lambdas[:k]:
                _apply(model, lam)
                reset_telemetry(model)
                meter = FlopsMeter(model)
                t0 = time.perf_counter()
                engine.generate(prompts, params)
                wall = time.perf_counter() - t0
                meter.close()
                tel = offload_telemetry(model)
                s = engine.stats
                runs[lam].append({"tok_s": s.generated_tokens / max(s.prefill_s + s.decode_s, 1e-9),
                                  "decode_tok_s": s.generated_tokens / max(s.decode_s, 1e-9), "wall_s": wall,
                                  "hit_rate": tel["hit_rate"], "bytes_read": tel["bytes_read"],
                                  "stall_s": tel["stall_s"], **meter.stats()})
                print(f"{path.name} round {rnd} lambda {lam:g}: {runs[lam][-1]['tok_s']:.1f} tok/s, hit rate "
                      f"{tel['hit_rate']:.3f}", file=sys.stderr)
        rows = []
        for lam in args.lambdas:
            _apply(model, lam)
            bpb = evaluate_split(model, data, "val", max_tokens=args.eval_tokens)["bpb"]
            rs = runs[lam]
            rows.append({"lambda": lam, "bpb": bpb, **{m: statistics.median(r[m] for r in rs) for m in rs[0]},
                         "tok_s_rounds": [r["tok_s"] for r in rs]})
    finally:
        close_offload(model)
    return rows, {"checkpoint": str(path), "plan": getattr(model, "offload_plan", None)}


def _ms(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="one or more checkpoints (e.g. the seeds of one recipe)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--expert-memory-budget", default="0.4")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.2, 1.0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per decode batch (taken from val)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/routing_offload_cost"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.lambdas[0] != 0.0:
        args.lambdas = [0.0] + [lam for lam in args.lambdas if lam != 0.0]  # the baseline comes first
    # Plan: 1. each checkpoint's rows; 2. per lambda, pair with the same checkpoint's lambda = 0;
    # 3. report (markdown + JSON, atomically).
    per = [run_checkpoint(c, args) for c in args.checkpoints]
    agg = []
    for i, lam in enumerate(args.lambdas):
        rs = [rows[i] for rows, _ in per]
        b0 = [rows[0] for rows, _ in per]
        agg.append({"lambda": lam, "bpb": _ms([r["bpb"] for r in rs]),
                    "d_bpb": _ms([r["bpb"] - b["bpb"] for r, b in zip(rs, b0)]),
                    "tok_s": _ms([r["tok_s"] for r in rs]),
                    "speed_ratio": _ms([r["tok_s"] / b["tok_s"] for r, b in zip(rs, b0)]),
                    "hit_rate": _ms([r["hit_rate"] for r in rs]),
                    "mb_read": _ms([r["bytes_read"] / 1e6 for r in rs]),
                    "experts_per_token_per_layer": _ms([r["experts_per_token_per_layer"] for r in rs])})
    meta = {"command": "python benchmarks/routing_offload_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": cpu_name(), "budget": args.expert_memory_budget, "checkpoints": [m for _, m in per]}
    n = len(per)
    pm = " (mean ± std over checkpoints)" if n > 1 else ""
    lines = ["# Offload-miss cost routing", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['cpu']}. {n} checkpoint(s); per checkpoint, medians over {args.rounds} interleaved "
             f"rounds of greedy decode ({args.prompts} prompts x {args.new_tokens} new tokens); val bpb on up to "
             f"{args.eval_tokens} tokens; Δ and the speed ratio are paired with the same checkpoint's lambda = 0{pm}.",
             "", "| lambda | val bpb | Δ bpb | tokens/s | vs lambda 0 | hit rate | MB read | experts / token / layer |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in agg:
        lines.append(f"| {r['lambda']:g} | {r['bpb'][0]:.4f} | {r['d_bpb'][0]:+.4f} ± {r['d_bpb'][1]:.4f} | "
                     f"{r['tok_s'][0]:.1f} ± {r['tok_s'][1]:.1f} | {r['speed_ratio'][0]:.2f}x ± {r['speed_ratio'][1]:.2f} | "
                     f"{r['hit_rate'][0]:.3f} | {r['mb_read'][0]:.1f} | {r['experts_per_token_per_layer'][0]:.2f} |")
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "offload_cost.json",
                      json.dumps({**meta, "rows": agg, "per_checkpoint": [r for r, _ in per]}, indent=1, default=str))
    atomic_write_text(args.out / "offload_cost.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
