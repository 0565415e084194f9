"""The training experiments of docs/experiments.md, runnable and summarised in one command.

    python -m moekit.train.experiments all --max-tokens 300000 --threads 1

Experiments (every run: same data order, seed, schedule and token budget):
  a  MoE vs its dense_equivalent (same active parameters);
  b  balancing: none vs Switch aux loss (0.01) vs aux-loss-free score bias (rate 1e-3 and 1e-2);
  c  aux-loss coefficient sweep 0.001 / 0.01 / 0.1 / 1.0;
  d  top-1 vs top-2 vs top-4 with the same experts (equal total parameters, different active cost);
  r  recipe screen for the main job: dense vs the preset vs DeepSeekMoE-style fine-grained experts +
     a shared expert (16 of width F/2, top-3) at equal active width (the `small-moe-fg` preset);
  r2 more recipes: aux-loss-free bias balancing, 32 experts of width F/4 top-6 + shared, fine16 + bias.
  h  HyperMoE (a generated HyperExpert adapter, bottleneck 16) vs the same MoE without it (equal active experts),
     and vs a static always-on expert of the same width (is it the unselected experts, or just a bit more compute?).
`--seeds 0 1 2` runs every experiment once per seed in RUNS_DIR/seed<N>/ and reports mean +- std per run.
Runs that already finished in RUNS_DIR are reused, so an interrupted sweep continues where it stopped.
Writes RUNS_DIR/<exp>.md and RUNS_DIR/<exp>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from moekit.checkpoint.native import atomic_write_text
from moekit.train.telemetry import read_jsonl
from moekit.train.trainer import TrainConfig, train

# name -> (dense?, MoEConfig changes)
RUNS: dict[str, tuple[bool, dict[str, Any]]] = {
    "dense": (True, {}),
    "aux-0.01": (False, {"aux_loss_coef": 0.01}),
    "none": (False, {"aux_loss_coef": 0.0}),
    "bias": (False, {"aux_loss_coef": 0.0, "score_correction_bias": True, "bias_update_rate": 1e-3}),
    "bias-0.01": (False, {"aux_loss_coef": 0.0, "score_correction_bias": True, "bias_update_rate": 1e-2}),
    "aux-0.001": (False, {"aux_loss_coef": 0.001}),
    "aux-0.1": (False, {"aux_loss_coef": 0.1}),
    "aux-1.0": (False, {"aux_loss_coef": 1.0}),
    "top1": (False, {"aux_loss_coef": 0.01, "top_k": 1}),
    "top4": (False, {"aux_loss_coef": 0.01, "top_k": 4}),
    # DeepSeekMoE-style fine-grained experts + one shared expert, at the baseline's active FFN width
    # (small-moe: top-2 of 512 = 1024): k * F + shared = 1024, so one dense_equivalent serves all.
    "fine16": (False, {"aux_loss_coef": 0.01, "num_experts": 16, "expert_dim": 256, "top_k": 3,
                       "num_shared_experts": 1, "shared_expert_dim": 256}),
    "fine32": (False, {"aux_loss_coef": 0.01, "num_experts": 32, "expert_dim": 128, "top_k": 6,
                       "num_shared_experts": 1, "shared_expert_dim": 256}),
    "fine16-bias": (False, {"aux_loss_coef": 0.0, "score_correction_bias": True, "bias_update_rate": 1e-3,
                            "num_experts": 16, "expert_dim": 256, "top_k": 3, "num_shared_experts": 1,
                            "shared_expert_dim": 256}),
    "hyper": (False, {"aux_loss_coef": 0.01, "hyper_dim": 16}),
    # Control for "hyper": an always-on adapter of the same width that ignores the unselected experts.
    "shared-16": (False, {"aux_loss_coef": 0.01, "num_shared_experts": 1, "shared_expert_dim": 16}),
}
EXPERIMENTS = {"a": ["aux-0.01", "dense"], "b": ["none", "aux-0.01", "bias", "bias-0.01"],
               "c": ["aux-0.001", "aux-0.01", "aux-0.1", "aux-1.0"], "d": ["top1", "aux-0.01", "top4"],
               "h": ["aux-0.01", "hyper", "shared-16"],
               "r": ["dense", "aux-0.01", "fine16"],
               "r2": ["bias", "fine32", "fine16-bias"],
               "lr": ["dense", "fine16"]}  # the main job's pair, run at another --lr


def run_one(name: str, preset: str, data, root: Path, tc: TrainConfig) -> dict[str, Any]:
    from moekit import build_model, count_params, dense_equivalent, get_preset

    out = root / name
    cfg = get_preset(preset).replace(vocab_size=data.vocab_size)
    dense, changes = RUNS[name]
    cfg = dense_equivalent(cfg) if dense else cfg.replace(moe=dataclasses.replace(cfg.moe, **changes))
    if not (out / "summary.json").is_file():
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an interrupted run restarts: its schedule and budget must match the others
        train(build_model(cfg, seed=tc.seed), data, out, tc, progress=True)
    summ = json.loads((out / "summary.json").read_text())
    evals = [r for r in read_jsonl(out / "telemetry.jsonl") if r.get("kind") == "eval"]
    last = evals[-1] if evals else {}
    pc = count_params(cfg)
    row = {"run": name, "val_bpb": summ["final_val_bpb"], "tokens": summ["tokens"], "tok_s": summ["tokens_per_s"],
           "train_s": summ["train_seconds"], "total_params": pc.total_params, "active_params": pc.active_params}
    if last.get("summary"):
        s = last["summary"]
        row.update(max_over_mean=s["max_over_mean"], cv=s["cv_mean"], dead=s["n_dead"], entropy=s["entropy_mean"],
                   collapse=len(last.get("collapse", [])))
        # Worst imbalance seen at any eval (collapse can be transient).
        row["peak_max_over_mean"] = max(r["summary"]["max_over_mean"] for r in evals if r.get("summary"))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | total params | active params | tokens | tok/s | val bpb | max/mean load | CV | dead experts "
            "| router entropy | peak max/mean |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        moe = "max_over_mean" in r
        lines.append(f"| {r['run']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['tokens']:,} | {r['tok_s']:,.0f} | {r['val_bpb']:.4f} | "
                     + (f"{r['max_over_mean']:.2f} | {r['cv']:.2f} | {r['dead']} | {r['entropy']:.3f} | "
                        f"{r['peak_max_over_mean']:.2f} |" if moe else "- | - | - | - | - |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiments", nargs="+", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--preset", default="mini-moe")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--runs-dir", default="runs/experiments")
    ap.add_argument("--max-tokens", type=int, default=300_000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run each experiment once per seed (RUNS_DIR/seed<N>/) and report mean +- std")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from moekit.data import prepare

    data = prepare("en-prose", a.data_dir)
    tc = TrainConfig(batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, max_tokens=a.max_tokens,
                     eval_every=a.eval_every, eval_tokens=a.eval_tokens, ckpt_every=10**9,
                     warmup_steps=a.warmup_steps, precision=a.precision, threads=a.threads, log_every=10, seed=a.seed)
    root = Path(a.runs_dir)
    exps = list(EXPERIMENTS) if "all" in a.experiments else a.experiments
    if a.seeds:
        return run_seeds(exps, a, data, tc, root)
    cache: dict[str, dict[str, Any]] = {}
    for e in exps:
        rows = []
        for name in EXPERIMENTS[e]:
            if name not in cache:
                cache[name] = run_one(name, a.preset, data, root, tc)
            rows.append(cache[name])
        md = (f"## Experiment {e}\n\n`python -m moekit.train.experiments {e} --preset {a.preset} --max-tokens "
              f"{a.max_tokens} --batch-size {a.batch_size} --seq-len {a.seq_len} --lr {a.lr} --precision {a.precision} "
              f"--warmup-steps {a.warmup_steps} --seed {a.seed}"
              f"{f' --threads {a.threads}' if a.threads else ''}` (load statistics from the final val eval, "
              f"{a.eval_tokens} tokens)\n\n{table(rows)}\n")
        atomic_write_text(root / f"{e}.md", md)
        atomic_write_text(root / f"{e}.json", json.dumps(rows, indent=1))
        print(md, flush=True)
    return 0


def run_seeds(exps: list[str], a, data, tc: TrainConfig, root: Path) -> int:
    """Each experiment once per seed (init, data order and router noise all follow the seed), then
    mean +- sample std per run name over the seeds: RUNS_DIR/<exp>-seeds.md and .json."""
    import statistics

    cmd = (f"python -m moekit.train.experiments {' '.join(exps)} --seeds {' '.join(map(str, a.seeds))} --preset "
           f"{a.preset} --max-tokens {a.max_tokens} --batch-size {a.batch_size} --seq-len {a.seq_len} --lr {a.lr}"
           f"{f' --threads {a.threads}' if a.threads else ''} --data-dir {a.data_dir}")
    for e in exps:
        per: dict[str, list[dict[str, Any]]] = {n: [] for n in EXPERIMENTS[e]}
        for seed in a.seeds:
            for name in EXPERIMENTS[e]:
                tc_seed = dataclasses.replace(tc, seed=seed)
                per[name].append(run_one(name, a.preset, data, root / f"seed{seed}", tc_seed))
        ms = lambda xs: (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)  # noqa: E731
        summary = []
        lines = ["| run | total params | active params | seeds | val bpb (mean ± std) "
                 "| Δ bpb vs first run, paired by seed (mean ± std) | tok/s (mean ± std) |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        first = per[EXPERIMENTS[e][0]]
        for name, rows in per.items():
            bpb, tok = ms([r["val_bpb"] for r in rows]), ms([r["tok_s"] for r in rows])
            diff = ms([r["val_bpb"] - f["val_bpb"] for r, f in zip(rows, first)])
            summary.append({"run": name, "seeds": a.seeds, "val_bpb": [r["val_bpb"] for r in rows],
                            "val_bpb_mean": bpb[0], "val_bpb_std": bpb[1], "paired_diff_mean": diff[0],
                            "paired_diff_std": diff[1], "tok_s_mean": tok[0], "tok_s_std": tok[1],
                            "total_params": rows[0]["total_params"], "active_params": rows[0]["active_params"]})
            lines.append(f"| {name} | {rows[0]['total_params'] / 1e6:.3f}M | {rows[0]['active_params'] / 1e6:.3f}M | "
                         f"{len(rows)} | {bpb[0]:.4f} ± {bpb[1]:.4f} | {diff[0]:+.4f} ± {diff[1]:.4f} | "
                         f"{tok[0]:,.0f} ± {tok[1]:,.0f} |")
        md = f"## Experiment {e}, {len(a.seeds)} seeds\n\n`{cmd}`\n\n" + "\n".join(lines) + "\n"
        atomic_write_text(root / f"{e}-seeds.md", md)
        atomic_write_text(root / f"{e}-seeds.json", json.dumps(summary, indent=1))
        print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
