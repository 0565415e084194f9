"""Matplotlib PNGs of a training run: loss/bpb curves, expert-load heatmaps, final load histogram.

Shape legend: N telemetry records, E experts.
Everything is read back from the run directory (metrics.jsonl, telemetry.jsonl), so plots can be
redrawn for any run, finished or interrupted.
"""

from __future__ import annotations

from pathlib import Path

from moekit.checkpoint.native import atomic_write
from moekit.train.telemetry import read_jsonl


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    _plt().close(fig)
    return path


def plot_curves(runs: dict[str, Path], path: Path, styles: dict[str, dict] | None = None) -> Path:
    """Training loss (smoothed) and val bpb against tokens, one line per run (`styles[name]`: its
    matplotlib line keywords, e.g. one colour per model and one dash per seed)."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        m = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        if m:
            k = max(1, len(m) // 50)  # moving average: per-step losses are noisy at these batch sizes
            ys = [sum(r["ce"] for r in m[max(0, i - k + 1): i + 1]) / len(m[max(0, i - k + 1): i + 1])
                  for i in range(len(m))]
            a1.plot([r["tokens"] / 1e6 for r in m], ys, label=name, **(styles or {}).get(name, {}))
        ev = [r for r in read_jsonl(run / "telemetry.jsonl") if r.get("kind") == "eval"]
        evals = [(r["step"], r["val_bpb"]) for r in ev if "val_bpb" in r]
        tok_per_step = (m[0]["tokens"] / m[0]["step"]) if m else 1
        if evals:
            a2.plot([s * tok_per_step / 1e6 for s, _ in evals], [b for _, b in evals], marker="o", label=name,
                    **(styles or {}).get(name, {}))
    a1.set(xlabel="tokens (M)", ylabel="train cross-entropy (nats/token)", title="training loss")
    a2.set(xlabel="tokens (M)", ylabel="bits per byte", title="validation bits per byte")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    return _save(fig, path)


def plot_load_heatmap(run: Path, path: Path, kind: str = "train") -> Path | None:
    """Per MoE layer: expert share of routed tokens (rows: experts, columns: telemetry records)."""
    recs = [r for r in read_jsonl(run / "telemetry.jsonl") if r.get("kind") == kind and r.get("layers")]
    if not recs:
        return None
    plt = _plt()
    n_layers = len(recs[0]["layers"])
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.2 + 1.6 * n_layers), squeeze=False)
    for i in range(n_layers):
        share_EN = []
        for r in recs:
            c = r["layers"][i]["counts"]
            t = max(1, sum(c))
            share_EN.append([x / t for x in c])
        share_EN = list(map(list, zip(*share_EN)))
        ax = axes[i][0]
        im = ax.imshow(share_EN, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(recs[0]["step"], max(recs[-1]["step"], recs[0]["step"] + 1), len(share_EN) - 0.5, -0.5))
        ax.set(ylabel=f"layer {i}\nexpert", xlabel="step" if i == n_layers - 1 else None)
        fig.colorbar(im, ax=ax, label="share")
    fig.suptitle(f"expert load over training ({run.name})")
    return _save(fig, path)


def plot_load_histogram(run: Path, path: Path) -> Path | None:
    """Final eval's per-expert share per layer, with the uniform share marked."""
    recs = [r for r in read_jsonl(run / "telemetry.jsonl") if r.get("kind") == "eval" and r.get("layers")]
    if not recs:
        return None
    plt = _plt()
    layers = recs[-1]["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    for ax, lay in zip(axes[0], layers):
        t = max(1, sum(lay["counts"]))
        E = len(lay["counts"])
        ax.bar(range(E), [c / t for c in lay["counts"]])
        ax.axhline(1 / E, color="k", ls="--", lw=1)
        ax.set(title=f"layer {lay['layer']} (max/mean {lay['max_over_mean']:.2f})", xlabel="expert", ylabel="share")
    fig.suptitle(f"final expert load on val, step {recs[-1]['step']} ({run.name})")
    return _save(fig, path)


def plot_run(run: str | Path) -> list[Path]:
    """All plots of one run directory; returns the files written."""
    run = Path(run)
    out = [plot_curves({run.name: run}, run / "curves.png")]
    for p in (plot_load_heatmap(run, run / "load_heatmap.png"), plot_load_histogram(run, run / "load_hist.png")):
        if p is not None:
            out.append(p)
    return out
