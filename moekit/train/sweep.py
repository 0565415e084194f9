"""`moekit sweep`: where does the MoE overtake its dense equivalent? A token-budget sweep with seeds.

1. resolve the MoE (preset or config, `--override` edits) and its dense equivalent (`pairs.resolve_pair`);
2. for every seed, then every budget (so one complete curve exists early), train the pair with its own
   full cosine schedule to that budget (`pairs.train_pair`; finished runs are reused, interrupted ones
   resumed, so the sweep can be stopped and restarted), and evaluate val bpb (`pairs.evaluate_pair`);
3. after each pair, aggregate per budget (mean ± std per model, paired difference with its 95% t
   interval, verdict: `moekit.train.stats`), find the crossover of the paired difference in
   log-tokens, and write RUNS_DIR/NAME/sweep.json and sweep.md atomically; sweep.png at the end.

Shape of sweep.json: {"settings", "models", "pairs": [one per (budget, seed)], "budgets": [aggregates],
"crossover"}; `moekit compare` reads it to put the dense model's bpb at the MoE's training FLOPs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from moekit.checkpoint.native import atomic_write, atomic_write_text
from moekit.train import stats
from moekit.train.pairs import MODELS, evaluate_pair, machine, resolve_pair, train_pair

DEFAULT_BUDGETS = (250_000, 500_000, 1_000_000, 2_000_000)
DEFAULT_SEEDS = (0, 1, 2)


def aggregate(pairs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Per budget: seeds, tokens, mean ± std per model, training FLOPs, paired difference and verdict;
    and the crossover of the mean paired difference over the budgets (None: none within the sweep)."""
    rows = []
    for b in sorted({p["budget"] for p in pairs}):
        ps = sorted((p for p in pairs if p["budget"] == b), key=lambda p: p["seed"])
        val = {m: {p["seed"]: p["val_bpb"][m] for p in ps} for m in MODELS}
        pr = stats.paired(val["moe"], val["dense"])
        degen = {m: any(p["degenerate"][m] for p in ps) for m in MODELS}
        # The sweep ranks val bpb (what its curves and crossover are about) even where the greedy
        # samples are still degenerate, as they are at every small budget; the table flags those budgets.
        # The main job (`moekit compare`) does not rank degenerate models.
        code, text = stats.verdict(pr)
        rows.append({"budget": b, "seeds": [p["seed"] for p in ps], "tokens": ps[0]["tokens"],
                     "steps": ps[0]["steps"], **{m: stats.summarize(list(val[m].values())) for m in MODELS},
                     "flops": {m: ps[0]["flops"][m] for m in MODELS}, "paired": pr, "verdict": code,
                     "verdict_text": text, "degenerate": degen})
    cross = stats.crossover([r["tokens"] for r in rows], [r["paired"]["mean_diff"] for r in rows])
    if cross is not None and rows:
        per_tok = rows[0]["flops"]["moe"] / rows[0]["tokens"]
        cross["flops_moe"] = cross["x"] * per_tok
    return rows, cross


def plot_sweep(rows: list[dict[str, Any]], cross: dict[str, Any] | None, path: Path) -> Path:
    """Val bpb (mean, std error bars) against training tokens and against training FLOPs, crossover marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, xkey in zip(axes, ("tokens", "flops")):
        for m, style in (("moe", "o-"), ("dense", "s--")):
            xs = [r["tokens"] if xkey == "tokens" else r["flops"][m] for r in rows]
            ax.errorbar(xs, [r[m]["mean"] for r in rows], yerr=[r[m]["std"] or 0.0 for r in rows], fmt=style,
                        capsize=3, label=f"{m} (mean ± std over seeds)")
        if cross is not None:
            x = cross["x"] if xkey == "tokens" else cross["flops_moe"]
            ax.axvline(x, color="k", ls=":", lw=1)
            ax.annotate(f"crossover\n{x:.3g}", (x, 0.95), xycoords=("data", "axes fraction"), ha="left", va="top",
                        fontsize=8)
        else:
            ax.text(0.02, 0.04, "no crossover within the sweep", transform=ax.transAxes, fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log minor labels overlap
        ax.set(xlabel="training tokens" if xkey == "tokens" else "training FLOPs (3 x forward, active weights)",
               ylabel="val bits per byte")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("MoE vs dense equivalent: token-budget sweep")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def _verdict_cell(r: dict[str, Any]) -> str:
    bad = [m for m in MODELS if r["degenerate"][m]]
    return r["verdict"].replace("_", " ") + (f" (bpb; {' and '.join(bad)} samples degenerate)" if bad else "")


def render_sweep(p: dict[str, Any]) -> str:
    """sweep.md: settings, the per-budget table, the crossover and the plot."""
    s, rows, cross = p["settings"], p["budgets"], p["crossover"]
    mi = p["models"]
    lines = [f"# {p['name']}: token-budget sweep, MoE vs dense equivalent", "",
             f"Machine: {p['machine']}.", "",
             f"MoE `{s['preset']}`{' with ' + ', '.join(s['override']) if s['override'] else ''}: "
             f"{mi['moe']['active_params'] / 1e6:.2f}M active of {mi['moe']['total_params'] / 1e6:.2f}M parameters; "
             f"dense equivalent {mi['dense']['active_params'] / 1e6:.2f}M. Batch {s['batch_size']} x {s['seq_len']}, "
             f"peak lr {s['lr']}, precision {s['precision']}, each run its own warmup + cosine schedule to its "
             f"budget; seeds {s['seeds']} (a seed fixes init and data order of both models: the pairs). Val bpb on "
             f"up to {s['eval_tokens'] or 'all'} tokens. Training FLOPs = 3 x forward FLOPs per token "
             "(`moekit plan`'s active matmuls + attention at the mean position) x tokens.", "",
             "| budget | tokens | seeds | tok/active param | MoE val bpb | dense val bpb | MoE - dense [95% CI] | "
             "FLOPs MoE / dense | verdict |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tpp = r["tokens"] / mi["moe"]["active_params"]
        fr = r["flops"]["moe"] / r["flops"]["dense"]
        lines.append(f"| {r['budget']:,} | {r['tokens']:,} | {len(r['seeds'])} | {tpp:.2f} | "
                     f"{stats.fmt_mean_std(r['moe'])} | {stats.fmt_mean_std(r['dense'])} | "
                     f"{stats.fmt_diff(r['paired'])} | {r['flops']['moe']:.3g} / {r['flops']['dense']:.3g} "
                     f"({fr - 1:+.1%}) | {_verdict_cell(r)} |")
    lines.append("")
    if cross is None:
        lines.append("**No crossover within the sweep**: the mean paired difference keeps one sign over all budgets.")
    else:
        lead = {"moe_better": "the MoE leads beyond it", "dense_better": "the dense model leads beyond it"}.get(
            cross["direction"], "the difference reaches 0 at the largest budget")
        lines.append(f"**Crossover** at about {cross['x']:,.0f} tokens ({cross['flops_moe']:.3g} MoE training FLOPs), "
                     f"linear interpolation of the mean paired difference in log-tokens; {lead}. It is a point "
                     "estimate of means: read it with the intervals above.")
    lines += ["", f"Verdicts: better/worse when the 95% interval excludes 0 and |difference| > "
              f"{stats.MIN_PRACTICAL_BPB} bpb; one seed: only beyond the run-to-run spread "
              f"({stats.RUN_TO_RUN_SPREAD_BPB} bpb). The verdicts rank val bpb; \"samples degenerate\" flags budgets where "
              f"a model's greedy samples still repeat themselves (the main job does not rank those). Compute-optimal training is about {stats.TRAINED_TOKENS_PER_PARAM:.0f} tokens per "
              "parameter; budgets far below it compare far-from-trained models.", "",
              "![sweep](sweep.png)", "",
              f"Pairs done: {len(p['pairs'])} of {len(s['budgets']) * len(s['seeds'])}; training "
              f"{sum(q['train_seconds'] for q in p['pairs']) / 60:.1f} min in all ({p['seconds'] / 60:.1f} min this "
              "session, "
              "evaluation included). Rerun (reuses finished runs): "
              f"`{p['command']}`"]
    return "\n".join(lines) + "\n"


def sweep(name: str = "sweep", preset: str = "small-moe-fg", *, override: Sequence[str] | None = None,
          budgets: Sequence[int] = DEFAULT_BUDGETS, seeds: Sequence[int] = DEFAULT_SEEDS, data_dir: str = "data",
          corpus: str = "en-prose", runs_dir: str = "runs", batch_size: int = 16, seq_len: int = 256,
          lr: float = 2e-3, precision: str = "auto", eval_tokens: int | None = 65536, eval_every: int = 0,
          threads: int | None = None, progress: bool = True, command: str = "moekit sweep") -> Path:
    """Run (or resume) the sweep and return the path of sweep.md."""
    import torch
    from tqdm.auto import tqdm

    from moekit import count_params
    from moekit.data import prepare
    from moekit.errors import MoekitError

    budgets, seeds = sorted({int(b) for b in budgets}), list(dict.fromkeys(int(s) for s in seeds))
    if not budgets or not seeds or min(budgets) < batch_size * seq_len:
        raise MoekitError(f"--budgets needs at least one budget of >= one batch ({batch_size * seq_len:,} tokens) "
                          "and --seeds at least one seed")
    if threads:
        torch.set_num_threads(threads)
    root = Path(runs_dir) / name
    data = prepare(corpus, data_dir, progress=progress)
    moe_cfg, dense_cfg = resolve_pair(preset, data.vocab_size, list(override or []))
    cfgs = {"moe": moe_cfg, "dense": dense_cfg}
    base = dict(batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision, eval_every=eval_every,
                eval_tokens=eval_tokens, ckpt_every=100, threads=threads)
    settings = {"preset": preset, "override": list(override or []), "budgets": budgets, "seeds": seeds,
                "corpus": corpus, "data": str(data.root), "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
                "precision": precision, "eval_tokens": eval_tokens, "threads": threads}
    models = {m: {"total_params": count_params(c).total_params, "active_params": count_params(c).active_params,
                  "config": c.to_dict()} for m, c in cfgs.items()}
    pairs: list[dict[str, Any]] = []
    todo = [(s, b) for s in seeds for b in budgets]
    bar = tqdm(todo, desc="sweep pairs", unit="pair", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for s, b in bar:
        bar.set_postfix(seed=s, budget=f"{b:,}")
        pdir = root / f"tokens{b}" / f"seed{s}"
        job = {"preset": preset, "override": list(override or []), "corpus": corpus, "data": str(data.root),
               "budget": {"minutes": None, "max_tokens": b}}
        # Warmup: a tenth of the run, at most 30 steps (the trainer's default), so the smallest budgets
        # still spend most of their steps on the cosine and not all of them warming up.
        steps = max(1, b // (batch_size * seq_len))
        base_b = {**base, "warmup_steps": max(1, min(30, steps // 10))}
        sums = train_pair(moe_cfg, dense_cfg, data, pdir, seed=s, base=base_b, moe_budget={"max_tokens": b}, job=job,
                          progress=progress, plots=False)
        ev = evaluate_pair(pdir, data, sums, eval_tokens=eval_tokens, seq_len=seq_len, splits=["val"])
        tokens = sums["moe"]["tokens"]
        pairs.append({"budget": b, "seed": s, "tokens": tokens, "steps": sums["moe"]["steps"],
                      "val_bpb": {m: ev["results"][m]["val"]["bpb"] for m in MODELS},
                      "val_tokens": ev["results"]["moe"]["val"]["tokens"],
                      "degenerate": {m: stats.degenerate(ev["samples"][m].values()) for m in MODELS},
                      "samples": ev["samples"],
                      "flops": {m: stats.training_flops(cfgs[m], tokens, seq_len)["total"] for m in MODELS},
                      "train_seconds": sum(sums[m]["train_seconds"] for m in MODELS),
                      "tokens_per_s": {m: sums[m]["tokens_per_s"] for m in MODELS},
                      "reuse": {m: sums[m]["reuse"] for m in MODELS}})
        rows, cross = aggregate(pairs)
        payload = {"name": name, "settings": settings, "models": models, "pairs": pairs, "budgets": rows,
                   "crossover": cross, "flops_per_token": {m: stats.training_flops(c, 1, seq_len)
                                                           for m, c in cfgs.items()},
                   "seconds": time.perf_counter() - t0, "machine": machine(), "command": command}
        atomic_write_text(root / "sweep.json", json.dumps(payload, indent=1))
        atomic_write_text(root / "sweep.md", render_sweep(payload))
    plot_sweep(rows, cross, root / "sweep.png")  # once at the end (about a second; sweep.json has it all)
    return root / "sweep.md"


def sweep_cli(name: str = "sweep", preset: str = "small-moe-fg", override: list[str] | None = None,
              budgets: list[int] = list(DEFAULT_BUDGETS), seeds: list[int] = list(DEFAULT_SEEDS),
              data_dir: str = "data", corpus: str = "en-prose", runs_dir: str = "runs", batch_size: int = 16,
              seq_len: int = 256, lr: float = 2e-3, precision: Literal["auto", "fp32", "bf16"] = "auto",
              eval_tokens: int = 65536, threads: int | None = None, progress: bool = True) -> int:
    """Token-budget sweep: the MoE and its dense equivalent at several budgets x seeds, val bpb vs tokens and FLOPs.

    For every seed and budget, trains the MoE preset and its dense_equivalent (same active parameters, same
    seed, same batches) each on its own full warmup + cosine schedule to that budget, evaluates val bits per
    byte, and writes RUNS_DIR/NAME/sweep.json, sweep.md (per budget: mean ± std of each model, the paired
    difference with its t-based 95 percent interval and a verdict) and sweep.png (val bpb vs tokens and vs
    training FLOPs, crossover marked). Finished runs are reused, so an interrupted sweep resumes where it
    stopped; sweep.json and sweep.md are rewritten after every pair.

    Args:
        name: sweep name (output in RUNS_DIR/NAME).
        preset: MoE preset name or config.json path; the dense model is its dense_equivalent.
        override: model config edits, key=value (moe.FIELD for the MoE block), e.g. moe.top_k=1 moe.num_experts=16.
        budgets: training tokens per run (each run's own schedule ends there).
        seeds: seeds; one pair (MoE, dense) per seed and budget.
        data_dir: data directory of `moekit data prepare`.
        corpus: corpus to train on.
        runs_dir: where run directories go.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        lr: peak learning rate (both models).
        precision: auto (bf16 autocast where the CPU has native bf16, else fp32), bf16, or fp32.
        eval_tokens: val tokens evaluated per run (0: all).
        threads: torch threads.
        progress: show progress bars.
    """
    import sys

    cmd = "moekit " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("moekit", "__main__.py")) \
        else "moekit sweep"
    report = sweep(name, preset, override=override, budgets=budgets, seeds=seeds, data_dir=data_dir, corpus=corpus,
                   runs_dir=runs_dir, batch_size=batch_size, seq_len=seq_len, lr=lr, precision=precision,
                   eval_tokens=eval_tokens or None, threads=threads, progress=progress, command=cmd)
    print(report.read_text())
    print(f"report: {report}")
    return 0
