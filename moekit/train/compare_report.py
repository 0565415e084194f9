"""The main job's report (runs/<name>/report.md) from its results payload, and the sweep it points to.

Sections: verdict (the paired statistic of `moekit.train.stats`), seeds, the per-model table (mean ±
std over seeds), the per-seed pairs, tokens per active parameter, equal training FLOPs (with the
sweep's dense bpb at the MoE's FLOPs when a matching sweep exists), schedule, reuse, samples, plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moekit.train import stats
from moekit.train.pairs import MODELS, key_diff


def verdict_text(mv: float, dv: float, degen: dict[str, bool]) -> str:
    """The one-seed verdict of val bpb `mv` (MoE) against `dv` (dense): no ranking of far-from-trained
    models, and none inside the run-to-run spread."""
    return stats.verdict(stats.paired({0: mv}, {0: dv}), degen)[1]


def sweep_context(path: Path, moe_cfg, moe_flops: float, batch_size: int, seq_len: int,
                  lr: float | None = None, val_tokens: int | None = None) -> dict[str, Any] | None:
    """What a `moekit sweep` result says at this job's MoE training FLOPs: the dense model's val bpb
    interpolated there (log-FLOPs, inside the sweep only) and the sweep's crossover. None without a
    sweep; "matches": False when it swept another model, batch shape or peak lr, or evaluated another
    length of val (bpb depend on the text: the first 32k val tokens score ~0.13 bpb worse than all
    50k), and then it is not used."""
    if not path.is_file():
        return None
    try:
        sw = json.loads(path.read_text())
        mine = json.loads(json.dumps(moe_cfg.to_dict()))
        diff = key_diff(sw["models"]["moe"]["config"], mine, "model.")
        diff += [f"{k}: {sw['settings'][k]!r} -> {v!r}" for k, v in
                 (("batch_size", batch_size), ("seq_len", seq_len), ("lr", lr)) if v is not None and sw["settings"][k] != v]
        rows = sw["budgets"]
        if val_tokens is not None:
            theirs = sorted({q["val_tokens"] for q in sw["pairs"] if "val_tokens" in q})
            cap = sw["settings"].get("eval_tokens")
            if not theirs:  # older sweeps record only the cap: it covered all of val when at least as large
                theirs = [val_tokens] if cap is None or cap >= val_tokens else [cap]
            if theirs != [val_tokens]:
                diff.append(f"val tokens evaluated: {', '.join(map(str, theirs))} -> {val_tokens} (rerun `moekit sweep "
                            f"--eval-tokens {val_tokens}`: finished runs are re-evaluated, not retrained)")
    except (KeyError, ValueError, TypeError) as e:
        return {"path": str(path), "matches": False, "why": [f"unreadable sweep result ({e})"]}
    if diff or not rows:
        return {"path": str(path), "matches": False, "why": diff or ["no finished budget"]}
    fl = [r["flops"]["dense"] for r in rows]
    return {"path": str(path), "matches": True, "flops_range": [min(fl), max(fl)],
            "tokens_range": [min(r["tokens"] for r in rows), max(r["tokens"] for r in rows)],
            "dense_bpb_at_moe_flops": stats.interp_log(fl, [r["dense"]["mean"] for r in rows], moe_flops),
            "diff_at_moe_flops": stats.interp_log(fl, [r["paired"]["mean_diff"] for r in rows], moe_flops),
            "crossover": sw.get("crossover"), "seeds": sw["settings"].get("seeds")}


def _sweep_lines(p: dict[str, Any]) -> list[str]:
    sw, f = p.get("sweep"), p["flops"]
    if sw is None:
        return ["No token-budget sweep found (`moekit sweep` writes runs/sweep/sweep.json; `--sweep PATH` points "
                "to another): the MoE is compared at equal FLOPs only through the pairing above."]
    if not sw["matches"]:
        return [f"The sweep at {sw['path']} swept another setting ({'; '.join(sw['why'][:4])}), so it is not used."]
    out = []
    at = sw["dense_bpb_at_moe_flops"]
    mv = p["results"]["moe"]["val"]["mean"]
    if at is None:
        out.append(f"The sweep ({sw['path']}) covers {sw['flops_range'][0]:.3g}-{sw['flops_range'][1]:.3g} dense "
                   f"training FLOPs; this MoE's {f['moe']['total']:.3g} lie outside it (no extrapolation).")
    else:
        out.append(f"From the sweep ({sw['path']}, seeds {sw['seeds']}), the dense model at this MoE's training "
                   f"FLOPs ({f['moe']['total']:.3g}) reaches **{at:.4f}** val bpb (interpolated in log-FLOPs between "
                   f"sweep budgets), against {mv:.4f} for the MoE here. That cross-run difference ({mv - at:+.4f}) "
                   "carries the interpolation's error and the runs' different schedules (warmup, length); the "
                   "like-for-like number is the sweep's own paired difference interpolated at these FLOPs"
                   + (f", **{sw['diff_at_moe_flops']:+.4f}** bpb, against this job's {p['paired']['mean_diff']:+.4f}."
                      if sw.get("diff_at_moe_flops") is not None else "."))
    c = sw.get("crossover")
    if c is None:
        out.append(f"The sweep finds **no crossover** between {sw['tokens_range'][0]:,} and {sw['tokens_range'][1]:,} "
                   "training tokens.")
    else:
        lead = {"moe_better": "the MoE leads beyond it", "dense_better": "the dense model leads beyond it"}.get(
            c["direction"], "the difference reaches 0 at the largest budget")
        out.append(f"The sweep's measured crossover: about **{c['x']:,.0f} tokens** per run ({lead}).")
    return out


def render_report(p: dict[str, Any]) -> str:
    """Markdown report: verdict, seeds, tables, tokens per parameter, FLOPs, samples, plots."""
    res, info, pr, sd = p["results"], p["models"], p["paired"], p["seeds"]
    splits = list(res["moe"])
    n = pr["n"]
    head = (f"Over {n} seed{'s' if n > 1 else ''}, the MoE reached **{stats.fmt_mean_std(res['moe']['val'])}** val "
            f"bits/byte against **{stats.fmt_mean_std(res['dense']['val'])}** for the dense model with the same "
            f"active parameters and the same {info['moe']['tokens']:,} training tokens per seed"
            f"{' (mean ± std over seeds)' if n > 1 else ''}: {p['verdict_text']}")
    if p["verdict"] == "not_ranked" and pr.get("ci") is not None:
        lo, hi = pr["ci"]
        head += (f" The paired statistic, for the record and not as a ranking: MoE - dense {pr['mean_diff']:+.4f}, 95% CI "
                 f"[{lo:+.4f}, {hi:+.4f}] over {n} seeds ({'includes 0' if lo <= 0 <= hi else 'excludes 0'}).")
    if p["verdict"] in ("worse", "tie", "not_ranked") and (p.get("sweep") or {}).get("matches"):
        c = p["sweep"]["crossover"]
        head += (f" The token-budget sweep measured a crossover at about {c['x']:,.0f} tokens per run." if c else
                 f" The token-budget sweep found no crossover up to {p['sweep']['tokens_range'][1]:,} tokens per run.")
    machine = p.get("machine")
    lines = [f"# {p['name']}: MoE vs dense at equal active parameters", "",
             *([f"Machine: {machine}.", ""] if machine else []), head, ""]
    seeds_line = (f"Seeds {sd['used']}: each seed is one pair (same init seed, same batches in the same order, same "
                  f"steps and learning rates). The budget was split across them; every run trained "
                  f"{info['moe']['steps']} steps.")
    if sd.get("reason"):
        seeds_line += f" **{sd['reason']}.**"
    lines += [seeds_line, "",
              "| model | total params | active params | tokens/seed | train s (all seeds) | tok/s | stopped by | "
              "final lr | " + " | ".join(f"{s} bpb" for s in splits) + " |",
              "|---|---:|---:|---:|---:|---:|---|---:|" + "---:|" * len(splits)]
    for m in MODELS:
        i = info[m]
        lr_end = f"{i['final_lr']:.2e}" if i.get("final_lr") is not None else "-"
        lines.append(f"| {m} | {i['total_params'] / 1e6:.2f}M | {i['active_params'] / 1e6:.2f}M | {i['tokens']:,} | "
                     f"{i['train_seconds']:.0f} | {i['tokens_per_s']:,.0f} | {i.get('stopped_by', '-')} | {lr_end} | "
                     + " | ".join(stats.fmt_mean_std(res[m][s]) for s in splits) + " |")
    lines += ["", "Paired val bpb by seed (MoE - dense < 0: the MoE is better):", "",
              "| seed | MoE | dense | MoE - dense |", "|---:|---:|---:|---:|"]
    for s, d in zip(pr["seeds"], pr["diffs"]):
        r = p["runs"][str(s)]["results"]
        lines.append(f"| {s} | {r['moe']['val']['bpb']:.4f} | {r['dense']['val']['bpb']:.4f} | {d:+.4f} |")
    if pr["ci"] is not None:
        lines.append(f"| mean | | | {pr['mean_diff']:+.4f} ± {pr['se']:.4f} (s.e.); 95% CI [{pr['ci'][0]:+.4f}, "
                     f"{pr['ci'][1]:+.4f}], t({n - 1}) = {pr['t_crit']:.2f} |")
    lines += ["", f"Verdict rule: better/worse when the 95% interval excludes 0 and the mean difference exceeds "
              f"{stats.MIN_PRACTICAL_BPB} bpb; with one seed, only beyond the run-to-run spread "
              f"({stats.RUN_TO_RUN_SPREAD_BPB} bpb); a model whose greedy samples are degenerate is not ranked."]
    # tokens per active parameter + equal FLOPs
    tpp = info["moe"]["tokens"] / info["moe"]["active_params"]
    lines += ["", "## How trained, and at equal training FLOPs", "",
              f"Tokens per active parameter: **{tpp:.2f}** (compute-optimal training is about "
              f"{stats.TRAINED_TOKENS_PER_PARAM:.0f})."]
    if tpp < stats.TRAINED_TOKENS_PER_PARAM * stats.FAR_FROM_TRAINED:
        lines[-1] += (f" **Warning: {stats.TRAINED_TOKENS_PER_PARAM / tpp:,.0f}x below it, the models are far from "
                      "trained**; the verdict holds for this budget only (the sweep shows how it changes).")
    f = p["flops"]
    same = (f"equal within {f['tolerance']:.0%}, so the comparison at equal active parameters above is also one at "
            "equal training FLOPs" if f["equal"] else f"**not** equal within {f['tolerance']:.0%}")
    lines += ["", f"Training FLOPs per run (3 x forward FLOPs per token of the active weights and attention, "
              f"`moekit plan`, x tokens): MoE {f['moe']['total']:.3g} ({f['moe']['train_per_token'] / 1e6:.1f} "
              f"MFLOP/token), dense {f['dense']['total']:.3g} ({f['dense']['train_per_token'] / 1e6:.1f} MFLOP/token): "
              f"MoE/dense - 1 = {f['rel_diff']:+.1%}, {same}. The dense model's wall time is lower per step on a CPU, "
              "but FLOPs, not seconds, are the equal-compute axis.", "", *_sweep_lines(p)]
    ev_tok = {s: res["moe"][s]["tokens"] for s in splits}
    lines += ["", f"Eval tokens per split and run: {ev_tok} (val, the verdict's split, up to --eval-tokens for every "
              f"seed; the other splits share --eval-tokens across the seeds). Data prep {p['data_seconds']:.0f} s, "
              "final "
              f"evaluation and samples {p.get('eval_seconds', 0):.0f} s (0: reused), whole job "
              f"{p['total_seconds'] / 60:.1f} min on {p['threads']} threads."]
    sch = p.get("schedule")
    if sch:
        same_lr = "the same learning rate at every step" if sch["same_lr_per_step"] else \
            "**different** learning rates at some steps"
        lines += ["", f"Schedule: warmup then cosine from {sch['peak_lr']:.1e} to {sch['lr_floor']:.1e}; each pair had "
                  f"{same_lr} (plot below). `stopped by`: schedule_end = the wall clock sized the schedule and the "
                  "run finished it; budget = its step/token budget; max_minutes = cut by the clock."]
    reuse = {m: info[m].get("reuse") for m in MODELS if info[m].get("reuse")}
    if reuse:
        lines += ["", "Runs: " + "; ".join(f"{m}: {why}" for m, why in reuse.items()) + "."]
    lines += ["", "## Greedy samples", ""]
    for s in sd["used"]:
        for m in MODELS:
            for prompt, text in p["runs"][str(s)]["samples"][m].items():
                lines.append(f"- **{m}**, seed {s} — _{prompt}_ → {json.dumps(text)}")
    s0 = f"seed{sd['used'][0]}"
    lines += ["", "## Plots", "", "![curves](curves.png)", "", f"Learning rate of both models (seed {sd['used'][0]}):",
              "", "![lr](lr.png)", "", f"MoE expert load over training and on val at the end (seed {sd['used'][0]}):",
              "", f"![heatmap]({s0}/moe/load_heatmap.png)", "", f"![histogram]({s0}/moe/load_hist.png)", "",
              "Rerun: `moekit compare` (a finished run is reused only when its model, preset, data, budget, seed and "
              "batch shape match; otherwise it trains afresh and says why)."]
    return "\n".join(lines) + "\n"
