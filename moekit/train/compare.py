"""The main job, `moekit compare`: an MoE against its dense equivalent on real text, same tokens.

1. prepare the corpus (cached); 2. train the MoE for a wall-clock share of the budget (its cosine
schedule is fixed from its measured speed); 3. train `dense_equivalent(moe)` (same active
parameters per token) for exactly the same steps, batches and data order; 4. evaluate both in bits
per byte on val, test and the out-of-domain sets; 5. greedy samples; 6. `runs/<name>/report.md`
with the table, samples and plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch

from moekit.checkpoint.native import atomic_write_text, load_native
from moekit.train.evaluate import evaluate_all, greedy_sample
from moekit.train.trainer import TrainConfig, latest_checkpoint, train

PROMPTS = ("The history of the city", "In the year 1850, the President")


def _run_one(model, data, out: Path, tc: TrainConfig, progress: bool) -> dict[str, Any]:
    """Train (or reuse a finished run / resume an interrupted one) and return its summary."""
    summary = out / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    res = train(model, data, out, tc, resume=latest_checkpoint(out) is not None, progress=progress)
    return {"steps": res.steps, "tokens": res.tokens, "train_seconds": res.train_seconds,
            "tokens_per_s": res.tokens_per_s, "checkpoint": str(res.checkpoint)}


def compare(name: str = "moe-vs-dense", preset: str = "small-moe", *, data_dir: str = "data",
            corpus: str = "en-prose", runs_dir: str = "runs", minutes: float = 12.0, max_tokens: int | None = None,
            batch_size: int = 16, seq_len: int = 256, lr: float = 2e-3, precision: str = "auto", seed: int = 0,
            eval_tokens: int | None = 65536, eval_every: int = 100, threads: int | None = None,
            progress: bool = True) -> Path:
    """Run the whole comparison and return the path of the report."""
    from moekit import build_model, count_params, dense_equivalent, get_preset
    from moekit.data import prepare
    from moekit.train.plots import plot_curves, plot_run

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    root = Path(runs_dir) / name
    # 1. data ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    data = prepare(corpus, data_dir, progress=progress)
    t_data = time.perf_counter() - t0
    moe_cfg = get_preset(preset)
    moe_cfg = moe_cfg.replace(vocab_size=data.vocab_size)
    if moe_cfg.moe is None:
        from moekit.train.trainer import TrainError

        raise TrainError(f"preset {preset!r} is dense; `moekit compare` needs an MoE preset (e.g. small-moe)")
    dense_cfg = dense_equivalent(moe_cfg)
    # 2. MoE: the MoE gets ~55% of the training minutes; the dense model (usually faster per token)
    # then trains on exactly as many steps, so both see the same tokens in the same order.
    base = dict(batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, precision=precision,
                eval_every=eval_every, eval_tokens=eval_tokens, ckpt_every=100, threads=threads)
    moe_tc = TrainConfig(**base, max_tokens=max_tokens, max_minutes=None if max_tokens else minutes * 0.55)
    moe_sum = _run_one(build_model(moe_cfg, seed=seed), data, root / "moe", moe_tc, progress)
    dense_tc = TrainConfig(**base, max_steps=moe_sum["steps"])
    dense_sum = _run_one(build_model(dense_cfg, seed=seed), data, root / "dense", dense_tc, progress)
    # 3. evaluation + samples ------------------------------------------------------------
    results, samples, info = {}, {}, {}
    tok = data.tokenizer()
    for label, summ, cfg in (("moe", moe_sum, moe_cfg), ("dense", dense_sum, dense_cfg)):
        model = load_native(latest_checkpoint(root / label))
        results[label] = evaluate_all(model, data, max_tokens=eval_tokens, seq_len=seq_len, progress=progress)
        samples[label] = {p: greedy_sample(model, tok, p, 40) for p in PROMPTS}
        pc = count_params(cfg)
        info[label] = {**summ, "total_params": pc.total_params, "active_params": pc.active_params}
    # 4. plots + report ------------------------------------------------------------------
    plot_curves({"moe": root / "moe", "dense": root / "dense"}, root / "curves.png")
    plot_run(root / "moe")
    plot_run(root / "dense")
    total_s = time.perf_counter() - t_start
    payload = {"name": name, "preset": preset, "data": str(data.root), "data_seconds": t_data,
               "total_seconds": total_s, "threads": torch.get_num_threads(), "models": info, "results": results,
               "samples": samples, "moe_config": moe_cfg.to_dict(), "dense_config": dense_cfg.to_dict(),
               "train_config": asdict(moe_tc)}
    atomic_write_text(root / "results.json", json.dumps(payload, indent=1))
    report = root / "report.md"
    atomic_write_text(report, render_report(payload))
    return report


def render_report(p: dict[str, Any]) -> str:
    """Markdown report: verdict, table, samples, plots."""
    res, info = p["results"], p["models"]
    splits = list(res["moe"])
    mv, dv = res["moe"]["val"]["bpb"], res["dense"]["val"]["bpb"]
    verdict = (f"The MoE reached **{mv:.4f}** val bits/byte against **{dv:.4f}** for the dense model with the same "
               f"active parameters and the same {info['moe']['tokens']:,} training tokens: ")
    if mv < dv:
        verdict += f"the MoE is better by {dv - mv:.4f} bpb ({(dv - mv) / dv:.1%})."
    else:
        verdict += (f"the MoE is **not** better at this scale (worse by {mv - dv:.4f} bpb). The seeds' claim does not "
                    "hold for this run; see docs/experiments.md for how budget and size change it.")
    lines = [f"# {p['name']}: MoE vs dense at equal active parameters", "", verdict, "",
             "| model | total params | active params | tokens | train s | tok/s | "
             + " | ".join(f"{s} bpb" for s in splits) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(splits)]
    for m in ("moe", "dense"):
        i = info[m]
        lines.append(f"| {m} | {i['total_params'] / 1e6:.2f}M | {i['active_params'] / 1e6:.2f}M | {i['tokens']:,} | "
                     f"{i['train_seconds']:.0f} | {i['tokens_per_s']:,.0f} | "
                     + " | ".join(f"{res[m][s]['bpb']:.4f}" for s in splits) + " |")
    ev_tok = {s: res["moe"][s]["tokens"] for s in splits}
    lines += ["", f"Eval tokens per split: {ev_tok}. Data prep {p['data_seconds']:.0f} s, whole job "
              f"{p['total_seconds'] / 60:.1f} min on {p['threads']} threads.", "", "## Greedy samples", ""]
    for m in ("moe", "dense"):
        for prompt, text in p["samples"][m].items():
            lines.append(f"- **{m}** — _{prompt}_ → {json.dumps(text)}")
    lines += ["", "## Plots", "", "![curves](curves.png)", "", "MoE expert load over training and on val at the end:",
              "", "![heatmap](moe/load_heatmap.png)", "", "![histogram](moe/load_hist.png)", "",
              "Rerun: `moekit compare` (finished runs are reused; delete the directory to start over)."]
    return "\n".join(lines) + "\n"


def compare_cli(name: str = "moe-vs-dense", preset: str = "small-moe", data_dir: str = "data",
                corpus: str = "en-prose", runs_dir: str = "runs", minutes: float = 12.0,
                max_tokens: int | None = None, batch_size: int = 16, seq_len: int = 256, lr: float = 2e-3,
                precision: Literal["auto", "fp32", "bf16"] = "auto", seed: int = 0, eval_tokens: int = 65536,
                threads: int | None = None, progress: bool = True) -> int:
    """The main job: train an MoE and its dense equivalent on the same tokens, evaluate, write a report.

    Prepares the corpus, trains the MoE preset for a little over half of --minutes (or --max-tokens), then the
    dense model with the same active parameters for exactly as many steps, evaluates both in bits per
    byte (val, test, Moby-Dick, Shakespeare), generates greedy samples and writes
    RUNS_DIR/NAME/report.md with the table and plots. No flags are needed.

    Args:
        name: run name (output in RUNS_DIR/NAME).
        preset: MoE preset; the dense model is its dense_equivalent.
        data_dir: data directory of `moekit data prepare`.
        corpus: corpus to train on.
        runs_dir: where run directories go.
        minutes: training budget in minutes for both models together (approximate).
        max_tokens: train on exactly this many tokens instead of a time budget.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        lr: peak learning rate (both models).
        precision: auto (bf16 autocast where the CPU has native bf16, else fp32), bf16, or fp32.
        seed: seed of init and data order (both models).
        eval_tokens: tokens evaluated per split (0: all).
        threads: torch threads.
        progress: show progress bars.
    """
    report = compare(name, preset, data_dir=data_dir, corpus=corpus, runs_dir=runs_dir, minutes=minutes,
                     max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision,
                     seed=seed, eval_tokens=eval_tokens or None, threads=threads, progress=progress)
    print(report.read_text())
    print(f"report: {report}")
    return 0
