"""Pruning criteria over several trained seeds: the bpb each criterion loses at each number of
experts kept, mean and spread over seeds, and paired differences between criteria (REAP minus
frequency, per-layer budget minus uniform REAP) with Student-t intervals. Reads the JSON files of
`benchmarks/memory_quality.py` (several per seed are merged, e.g. a later `--criteria reap-budget
--only-prune` run); writes JSON, markdown and a plot.

    python benchmarks/memory_quality_seeds.py runs/mq/main-s*.json --out benchmarks/results/memory_quality_main
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write, atomic_write_text  # noqa: E402
from moekit.train.stats import paired, summarize  # noqa: E402

PAIRS = (("reap", "frequency"), ("reap", "random"), ("reap-budget", "reap"))


def load(files: list[str]) -> dict[str, dict]:
    """{model: merged result} (prune tables merged criterion by criterion)."""
    out: dict[str, dict] = {}
    for f in files:
        r = json.loads(Path(f).read_text())
        m = out.setdefault(r["model"], {**r, "prune": {}})
        for crit, vals in r["prune"].items():
            m["prune"].setdefault(crit, {}).update(vals)
        if r.get("naee"):
            m["naee"], m["pesf"], m["prefill_ms"] = r["naee"], r["pesf"], r["prefill_ms"]
        if r.get("kept_per_layer"):
            m["kept_per_layer"] = r["kept_per_layer"]
    return out


def aggregate(models: dict[str, dict]) -> dict:
    seeds = sorted(models)
    crits = sorted({c for m in models.values() for c in m["prune"]})
    keeps = sorted({int(k) for m in models.values() for c in m["prune"].values() for k in c}, reverse=True)
    loss = {c: {} for c in crits}  # bpb lost vs the seed's own unpruned model
    for c in crits:
        for k in keeps:
            vals = {s: models[s]["prune"][c][str(k)] - models[s]["base_bpb"] for s in seeds
                    if str(k) in models[s]["prune"].get(c, {})}
            if vals:
                loss[c][k] = {**summarize(list(vals.values())), "by_seed": vals}
    pairs = {}
    for a, b in PAIRS:
        if a in loss and b in loss:
            pairs[f"{a} - {b}"] = {k: paired(loss[a][k]["by_seed"], loss[b][k]["by_seed"])
                                   for k in keeps if k in loss[a] and k in loss[b]}
    skip = {}
    for kind, key in (("naee", "flops_saved"), ("pesf", "flops_saved_prefill")):
        params = sorted({p for m in models.values() for p in m.get(kind, {})}, key=float)
        skip[kind] = {p: {"bpb_cost": summarize([m[kind][p]["bpb"] - m["base_bpb"] for m in models.values()
                                                 if p in m.get(kind, {})]),
                          key: summarize([m[kind][p][key] for m in models.values() if p in m.get(kind, {})])}
                      for p in params}
    return {"models": seeds, "base_bpb": summarize([models[s]["base_bpb"] for s in seeds]),
            "num_experts": next(iter(models.values()))["num_experts"], "loss": loss, "pairs": pairs, "skip": skip,
            "cpu": next(iter(models.values())).get("cpu"),
            "eval_tokens": next(iter(models.values()))["eval_tokens"]}


def markdown(res: dict) -> str:
    E = res["num_experts"]
    f = lambda s: f"{s['mean']:+.4f} ± {s['std']:.4f}" if s["std"] is not None else f"{s['mean']:+.4f}"  # noqa: E731
    crits = list(res["loss"])
    keeps = sorted({k for c in res["loss"].values() for k in c}, reverse=True)
    rows = [f"# Pruning criteria over {len(res['models'])} seeds ({res['cpu']})", "",
            f"Unpruned bpb {res['base_bpb']['mean']:.4f} ± {res['base_bpb']['std'] or 0:.4f}; bpb lost by pruning, "
            "mean ± std over seeds (lower is better).", "",
            "| experts kept | " + " | ".join(crits) + " |", "|---:|" + "---:|" * len(crits)]
    for k in keeps:
        rows.append(f"| {k}/{E} | " + " | ".join(f(res["loss"][c][k]) if k in res["loss"][c] else "-"
                                                 for c in crits) + " |")
    for name, by_k in res["pairs"].items():
        rows += ["", f"Paired difference {name} (negative: the first loses less), mean [95% CI], per seed:", "",
                 "| experts kept | mean | 95% CI | per seed |", "|---:|---:|---|---|"]
        for k, p in by_k.items():
            ci = "-" if p["ci"] is None else f"[{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}]"
            rows.append(f"| {k}/{E} | {p['mean_diff']:+.4f} | {ci} | "
                        + ", ".join(f"{d:+.4f}" for d in p["diffs"]) + " |")
    for kind, label, key in (("naee", "NAEE beta", "flops_saved"), ("pesf", "PESF alpha", "flops_saved_prefill")):
        if res["skip"].get(kind):
            rows += ["", f"| {label} | expert FLOPs saved | bpb cost |", "|---:|---:|---:|"]
            rows += [f"| {p} | {v[key]['mean']:.3f} | {f(v['bpb_cost'])} |" for p, v in res["skip"][kind].items()]
    return "\n".join(rows) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for c, by_k in res["loss"].items():
        ks = sorted(by_k)
        ax.errorbar(ks, [by_k[k]["mean"] for k in ks], yerr=[by_k[k]["std"] or 0 for k in ks], marker="o",
                    capsize=3, label=c)
    ax.set_xlabel(f"experts kept of {res['num_experts']}")
    ax.set_ylabel("bpb lost (mean ± std over seeds)")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the atomic writer's temporary name has no .png suffix


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default="benchmarks/results/memory_quality_seeds")
    a = ap.parse_args()
    res = aggregate(load(a.files))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    md = markdown(res)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write(out.with_suffix(".png"), lambda tmp: plot(res, tmp))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
