"""The main job, `moekit compare`: an MoE against its dense equivalent on real text, over seeds.

1. prepare the corpus (cached) and resolve the pair (`pairs.resolve_pair`);
2. choose the seeds: `--seeds` (3) split one budget, fewer where a seed's run would get under
   `--min-tokens-per-run` tokens (`stats.seeds_for_budget`; a wall-clock budget is turned into
   tokens by a short speed probe of the MoE, remembered in seed_plan.json);
3. per seed, train the pair (`pairs.train_pair`): the first seed's MoE gets its share of the clock
   (or tokens) and trains to its schedule's end; every other run trains exactly its steps, so all runs
   see the same number of tokens and each dense model the same batches as its MoE;
4. evaluate every pair in bits per byte on val, test and the out-of-domain sets, greedy samples;
5. statistics (`moekit.train.stats`): mean ± std per model, the paired difference with its 95% t
   interval, the verdict, training FLOPs of both, the sweep's dense bpb at the MoE's FLOPs;
6. runs/<name>/results.json, report.md (`compare_report.render_report`) and plots. A finished run is
   reused only when its settings match (runs/<name>/seed<N>/{moe,dense}).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import torch

from moekit.checkpoint.native import atomic_write_text
from moekit.train import stats
from moekit.train.compare_report import render_report, sweep_context, verdict_text
from moekit.train.pairs import MODELS, PROMPTS, evaluate_pair, lrs, machine, plot_lr, resolve_pair, train_pair
from moekit.train.stats import RUN_TO_RUN_SPREAD_BPB, degenerate
from moekit.train.trainer import TrainConfig, train

__all__ = ["compare", "compare_cli", "render_report", "verdict_text", "degenerate", "RUN_TO_RUN_SPREAD_BPB", "PROMPTS"]
_lrs = lrs  # the name tests and older code use
MOE_SHARE = 0.55
"""Share of --minutes for the MoE runs: the dense model (usually faster per token) then trains the same steps."""
PROBE_STEPS = 8


def probe_tokens_per_s(cfg, data, base: dict[str, Any], seed: int, where: Path) -> float:
    """Training tokens/s of `cfg` over PROBE_STEPS real steps (the first two, which set up kernels, not
    timed), in a scratch run directory that is deleted afterwards."""
    from moekit import build_model

    where.mkdir(parents=True, exist_ok=True)
    tc = TrainConfig(**{**base, "eval_every": 0, "eval_tokens": base["seq_len"], "ckpt_every": 0}, seed=seed,
                     max_steps=PROBE_STEPS)
    with tempfile.TemporaryDirectory(dir=where, prefix="probe-") as tmp:
        res = train(build_model(cfg, seed=seed), data, Path(tmp), tc, progress=False, plots=False)
    el = [r["elapsed"] for r in res.history]
    per_step = (el[-1] - el[1]) / max(1, len(el) - 2)
    return tc.tokens_per_step / max(per_step, 1e-9)


def plan_seeds(root: Path, *, requested: int, minutes: float, max_tokens: int | None, min_tokens: int,
               probe, key: dict[str, Any]) -> dict[str, Any]:
    """How many seeds the budget affords, and why: a token budget decides it directly; a wall-clock one
    through the MoE's probed speed (reused from seed_plan.json while the settings are the same)."""
    if max_tokens is not None:
        total, speed = float(max_tokens), None
    else:
        path = root / "seed_plan.json"
        key = json.loads(json.dumps(key))
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None and old.get("key") == key:
            return old["plan"]
        speed = probe()
        total = speed * minutes * MOE_SHARE * 60
    n = stats.seeds_for_budget(requested, total, min_tokens)
    reason = None
    if n < requested:
        reason = (f"{n} of {requested} requested seeds: the budget gives about {total:,.0f} tokens per model"
                  f"{f' ({speed:,.0f} MoE tok/s measured)' if speed else ''}, and each seed's run needs at least "
                  f"{min_tokens:,} (--min-tokens-per-run)")
    plan = {"requested": requested, "n": n, "total_tokens_estimate": total, "probe_tokens_per_s": speed,
            "min_tokens_per_run": min_tokens, "reason": reason}
    if max_tokens is None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / "seed_plan.json", json.dumps({"key": key, "plan": plan}, indent=1))
    return plan


def compare(name: str = "moe-vs-dense", preset: str = "small-moe-fg", *, override: list[str] | None = None,
            data_dir: str = "data", corpus: str = "en-prose", runs_dir: str = "runs", minutes: float = 12.0,
            max_tokens: int | None = None, seeds: int = 3, min_tokens_per_run: int = stats.MIN_TOKENS_PER_RUN,
            batch_size: int = 16, seq_len: int = 256, lr: float = 2e-3, precision: str = "auto", seed: int = 0,
            eval_tokens: int | None = 65536, eval_every: int = 100, threads: int | None = None,
            sweep: str | None = None, progress: bool = True) -> Path:
    """Run the whole comparison and return the path of the report."""
    from moekit import count_params
    from moekit.data import prepare
    from moekit.train.plots import plot_curves

    from moekit.train.trainer import TrainError

    if seeds < 1 or min_tokens_per_run < 1 or (max_tokens is not None and max_tokens < 1) or minutes <= 0:
        raise TrainError(f"--seeds ({seeds}), --min-tokens-per-run ({min_tokens_per_run}), --max-tokens "
                         f"({max_tokens}) and --minutes ({minutes}) must be positive")
    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    root = Path(runs_dir) / name
    # 1. data + models ---------------------------------------------------------------------
    t0 = time.perf_counter()
    data = prepare(corpus, data_dir, progress=progress)
    t_data = time.perf_counter() - t0
    moe_cfg, dense_cfg = resolve_pair(preset, data.vocab_size, override)
    cfgs = {"moe": moe_cfg, "dense": dense_cfg}
    base = dict(batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision, eval_every=eval_every,
                eval_tokens=eval_tokens, ckpt_every=100, threads=threads)
    job = {"preset": preset, "override": list(override or []), "corpus": corpus, "data": str(data.root),
           "budget": {"minutes": None if max_tokens else minutes, "max_tokens": max_tokens}}
    # 2. seeds -----------------------------------------------------------------------------
    plan = plan_seeds(root, requested=seeds, minutes=minutes, max_tokens=max_tokens, min_tokens=min_tokens_per_run,
                      probe=lambda: probe_tokens_per_s(moe_cfg, data, base, seed, root),
                      key={**job, "model": moe_cfg.to_dict(), "train": base, "seeds": seeds,
                           "min_tokens_per_run": min_tokens_per_run, "threads": torch.get_num_threads()})
    seed_list = [seed + i for i in range(plan["n"])]
    # 3. train: the first MoE's budget fixes the steps of every other run ------------------
    first = ({"max_tokens": max_tokens // plan["n"]} if max_tokens else
             {"max_minutes": minutes * MOE_SHARE / plan["n"]})
    runs: dict[str, dict[str, Any]] = {}
    steps = None
    for s in seed_list:
        budget = first if steps is None else {"max_steps": steps}
        sums = train_pair(moe_cfg, dense_cfg, data, root / f"seed{s}", seed=s, base=base, moe_budget=budget,
                          job={**job, "seed_budget": budget}, progress=progress, plots=s == seed_list[0])
        steps = sums["moe"]["steps"] if steps is None else steps
        runs[str(s)] = {"models": sums}
    # 4. evaluation + samples: val (the verdict's split) up to --eval-tokens for every seed; the other
    # splits share --eval-tokens across the seeds, so the job evaluates about as much as with one seed.
    other_cap = None if eval_tokens is None else max(seq_len, eval_tokens // len(seed_list))
    split_caps = {sp: (eval_tokens if sp == "val" else other_cap) for sp in ["val", "test", *data.ood_names]}
    t_eval = time.perf_counter()
    for s in seed_list:
        ev = evaluate_pair(root / f"seed{s}", data, runs[str(s)]["models"], eval_tokens=eval_tokens, seq_len=seq_len,
                           split_tokens=split_caps, progress=progress)
        runs[str(s)].update(ev)
        pair = {m: root / f"seed{s}" / m for m in MODELS}
        runs[str(s)]["same_lr_per_step"] = lrs(pair["moe"]) == lrs(pair["dense"])
    t_eval = time.perf_counter() - t_eval
    # 5. statistics ------------------------------------------------------------------------
    first_run = runs[str(seed_list[0])]
    splits = list(first_run["results"]["moe"])
    results = {m: {sp: {**stats.summarize([runs[str(s)]["results"][m][sp]["bpb"] for s in seed_list]),
                        "tokens": first_run["results"][m][sp]["tokens"]} for sp in splits} for m in MODELS}
    val = {m: {s: runs[str(s)]["results"][m]["val"]["bpb"] for s in seed_list} for m in MODELS}
    paired = stats.paired(val["moe"], val["dense"])
    degen = {m: any(degenerate(runs[str(s)]["samples"][m].values()) for s in seed_list) for m in MODELS}
    code, text = stats.verdict(paired, degen)
    info = {}
    for m in MODELS:
        pc, sm = count_params(cfgs[m]), [runs[str(s)]["models"][m] for s in seed_list]
        sched = lrs(root / f"seed{seed_list[0]}" / m)
        info[m] = {"total_params": pc.total_params, "active_params": pc.active_params, "tokens": sm[0]["tokens"],
                   "steps": sm[0]["steps"], "train_seconds": sum(x["train_seconds"] for x in sm),
                   "tokens_per_s": sum(x["tokens_per_s"] for x in sm) / len(sm), "stopped_by": sm[0]["stopped_by"],
                   "final_lr": sched[-1][1] if sched else None,
                   "reuse": "; ".join(f"seed {s} {runs[str(s)]['models'][m]['reuse']}" for s in seed_list)}
    flops = {m: stats.training_flops(cfgs[m], info[m]["tokens"], seq_len) for m in MODELS}
    eq, rel = stats.flops_equal(flops["moe"]["total"], flops["dense"]["total"])
    sweep_path = Path(sweep) if sweep else Path(runs_dir) / "sweep" / "sweep.json"
    # 6. plots + report --------------------------------------------------------------------
    dashes = ("-", "--", ":", "-.")
    plot_curves({f"{m} seed {s}": root / f"seed{s}" / m for s in seed_list for m in MODELS}, root / "curves.png",
                {f"{m} seed {s}": {"color": "C0" if m == "moe" else "C1", "ls": dashes[i % 4], "lw": 1.2}
                 for i, s in enumerate(seed_list) for m in MODELS})
    plot_lr({m: root / f"seed{seed_list[0]}" / m for m in MODELS}, root / "lr.png")
    payload = {"name": name, "preset": preset, "override": list(override or []), "data": str(data.root),
               "data_seconds": t_data, "eval_seconds": t_eval, "threads": torch.get_num_threads(),
               "seeds": {**plan, "used": seed_list},
               "runs": runs, "models": info, "results": results, "paired": paired, "degenerate": degen,
               "verdict": code, "verdict_text": text,
               "flops": {**flops, "equal": eq, "rel_diff": rel, "tolerance": stats.FLOPS_EQUAL_TOL},
               "sweep": sweep_context(sweep_path, moe_cfg, flops["moe"]["total"], batch_size, seq_len, lr,
                                      val_tokens=results["moe"]["val"].get("tokens")),
               "moe_config": moe_cfg.to_dict(), "dense_config": dense_cfg.to_dict(),
               "train_config": {**base, **first}, "eval_tokens": eval_tokens, "first_seed": seed_list[0],
               "schedule": {"same_lr_per_step": all(r["same_lr_per_step"] for r in runs.values()),
                            "lr_floor": lr * TrainConfig().min_lr_ratio, "peak_lr": lr},
               "machine": machine()}
    payload["total_seconds"] = time.perf_counter() - t_start
    atomic_write_text(root / "results.json", json.dumps(payload, indent=1))
    report = root / "report.md"
    atomic_write_text(report, render_report(payload))
    return report


def compare_cli(name: str = "moe-vs-dense", preset: str = "small-moe-fg", override: list[str] | None = None,
                data_dir: str = "data", corpus: str = "en-prose", runs_dir: str = "runs", minutes: float = 12.0,
                max_tokens: int | None = None, seeds: int = 3, min_tokens_per_run: int = stats.MIN_TOKENS_PER_RUN,
                batch_size: int = 16, seq_len: int = 256, lr: float = 2e-3,
                precision: Literal["auto", "fp32", "bf16"] = "auto", seed: int = 0, eval_tokens: int = 65536,
                threads: int | None = None, sweep: str | None = None, progress: bool = True) -> int:
    """The main job: train an MoE and its dense equivalent on the same tokens over seeds, evaluate, write a report.

    Prepares the corpus, then for each of --seeds seeds (the budget is split across them; fewer seeds when a
    run would get under --min-tokens-per-run tokens) trains the MoE preset to the end of its schedule and the
    dense model with the same active parameters for exactly as many steps on the same batches. Evaluates all
    in bits per byte (val, test, Moby-Dick, Shakespeare), compares the pairs (mean and std per model, paired
    difference with a t-based 95 percent interval, verdict better / worse / no difference resolvable), reports
    tokens per active parameter and training FLOPs, and writes RUNS_DIR/NAME/report.md. No flags are needed.

    Args:
        name: run name (output in RUNS_DIR/NAME).
        preset: MoE preset name or config.json path; the dense model is its dense_equivalent.
        override: model config edits, key=value (moe.FIELD for the MoE block), e.g. moe.top_k=1.
        data_dir: data directory of `moekit data prepare`.
        corpus: corpus to train on.
        runs_dir: where run directories go.
        minutes: training budget in minutes for both models and all seeds together (approximate).
        max_tokens: train each model on this many tokens in all (split across the seeds) instead of a time budget.
        seeds: seeds to split the budget across (each seed trains one MoE and one dense model).
        min_tokens_per_run: fewest tokens per seed's run; fewer seeds are trained below it.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        lr: peak learning rate (both models).
        precision: auto (bf16 autocast where the CPU has native bf16, else fp32), bf16, or fp32.
        seed: first seed (the others follow it: seed, seed+1, ...).
        eval_tokens: tokens evaluated per split and run (0: all).
        threads: torch threads.
        sweep: sweep.json of `moekit sweep` for the equal-FLOPs comparison (default RUNS_DIR/sweep/sweep.json).
        progress: show progress bars.
    """
    report = compare(name, preset, override=override, data_dir=data_dir, corpus=corpus, runs_dir=runs_dir,
                     minutes=minutes, max_tokens=max_tokens, seeds=seeds, min_tokens_per_run=min_tokens_per_run,
                     batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision, seed=seed,
                     eval_tokens=eval_tokens or None, threads=threads, sweep=sweep, progress=progress)
    print(report.read_text())
    print(f"report: {report}")
    return 0
