"""One seed's MoE-vs-dense pair, shared by `moekit compare` and `moekit sweep`.

1. `resolve_pair`: the MoE config (preset or config file, `--override key=value` edits, the data's
   vocabulary) and its `dense_equivalent` (same active parameters per token);
2. `train_pair`: the MoE trains to its schedule's end (a token budget, or a wall-clock share that only
   sizes the cosine), then the dense model trains exactly as many steps with the same seed, batches and
   learning rate at every step; a finished run is reused only when its settings match (`run_one`);
3. `evaluate_pair`: bits per byte of both on the chosen splits and greedy samples, cached next to the
   runs (keyed by what was evaluated), so a resumed job does not evaluate twice.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moekit.checkpoint.native import atomic_write, atomic_write_text, load_native
from moekit.errors import MoekitError
from moekit.train.trainer import TrainConfig, TrainError, latest_checkpoint, train

PROMPTS = ("The history of the city", "In the year 1850, the President")
KEY_FILE = "compare_key.json"
"""What a run in <pair>/{moe,dense} was trained with: reused only when it matches exactly."""
EVAL_FILE = "eval.json"
MODELS = ("moe", "dense")


def machine() -> str:
    """`moekit doctor`'s facts in one line, with the load average (other jobs slow the run down)."""
    import os

    from moekit.doctor import facts, summary_line

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{summary_line(facts(backends=False))}; load average {load:.1f} at the end"


def key_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings that differ between two run keys, as 'path: old -> new'."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += key_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def normalise_key(key: dict) -> dict:
    """A stored run key with the defaults of fields added since it was written: a new config or
    training field that keeps its default does not change what a finished run was trained with, so it
    must not force a retrain; nor does the thread count, nor the eval length of a run that evaluates
    only at the end. Keys that no longer parse are returned unchanged (and then differ)."""
    from dataclasses import fields

    from moekit.config import ModelConfig

    out = dict(key)
    try:
        if isinstance(out.get("model"), dict):
            out["model"] = ModelConfig.from_dict(out["model"]).to_dict()
        if isinstance(out.get("train"), dict):
            names = {f.name for f in fields(TrainConfig)}
            out["train"] = asdict(TrainConfig(**{k: v for k, v in out["train"].items() if k in names}))
            # Threads change speed, not what was trained: a run is reusable at any thread count. Nor does
            # the eval length when no evaluation runs during training (the final one is cached apart).
            out["train"].pop("threads", None)
            if not out["train"].get("eval_every"):
                out["train"].pop("eval_tokens", None)
    except Exception:  # an old key this code cannot read: compared as stored (it differs, and retrains)
        return key
    return json.loads(json.dumps(out))


def run_one(model, data, out: Path, tc: TrainConfig, key: dict, progress: bool, plots: bool = True) -> dict[str, Any]:
    """Train, reuse a finished run, or resume an interrupted one, and return its summary with
    "reuse" saying which and why. A finished or interrupted run is reused only when its key (model
    config, preset, data, budget, batch shape and every other training setting) equals `key`;
    otherwise its directory is cleared and the model trains afresh."""
    summary, key_path = out / "summary.json", out / KEY_FILE
    stored = json.loads(json.dumps(key))  # the JSON form, as it is stored
    key = normalise_key(stored)
    why = None
    if out.exists() and any(out.iterdir()):
        old = normalise_key(json.loads(key_path.read_text())) if key_path.is_file() else None
        if old == key and summary.is_file():
            return {**json.loads(summary.read_text()), "reuse": "reused (same settings)"}
        if old == key and latest_checkpoint(out) is not None:
            why = "resumed (same settings, interrupted run)"
        else:
            diff = ["no record of its settings"] if old is None else key_diff(old, key)
            why = "trained afresh: the previous run differs in " + "; ".join(diff[:6])
            print(f"{out}: {why}")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(key_path, json.dumps(stored, indent=1))
    train(model, data, out, tc, resume=latest_checkpoint(out) is not None, progress=progress, plots=plots)
    return {**json.loads(summary.read_text()), "reuse": why or "trained (no earlier run)"}


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise MoekitError(f"--override {item!r}: write it as key=value, e.g. moe.top_k=4 or n_layers=6")
    k, v = item.split("=", 1)
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v  # a bare string such as moe.router=sigmoid_topk
    return k.strip().split("."), val


def resolve_pair(preset: str, vocab_size: int, override: list[str] | None = None):
    """(moe_cfg, dense_cfg): a preset name or config.json path, edited by `key=value` overrides (dotted
    for the MoE block: moe.top_k=4), with the data's vocabulary; the dense one is `dense_equivalent`."""
    from moekit import dense_equivalent, resolve_config
    from moekit.config import ModelConfig

    cfg = resolve_config(preset)
    if override:
        d = cfg.to_dict()
        for item in override:
            path, val = _parse_override(item)
            node = d
            for p in path[:-1]:
                if not isinstance(node.get(p), dict):
                    raise MoekitError(f"--override {item!r}: {'.'.join(path[:-1])} is not a config block "
                                      "(use moe.FIELD for the MoE block)")
                node = node[p]
            if path[-1] not in node:
                raise MoekitError(f"--override {item!r}: unknown field {path[-1]!r}; known: {sorted(node)}")
            node[path[-1]] = val
        cfg = ModelConfig.from_dict(d)
    cfg = cfg.replace(vocab_size=vocab_size)
    if cfg.moe is None:
        raise TrainError(f"model {preset!r} is dense; comparing with a dense equivalent needs an MoE preset "
                         "(e.g. small-moe)")
    return cfg, dense_equivalent(cfg)


def train_pair(moe_cfg, dense_cfg, data, root: Path, *, seed: int, base: dict[str, Any], moe_budget: dict[str, Any],
               job: dict[str, Any], progress: bool, plots: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or reuse) root/moe with `moe_budget` (max_tokens, max_steps, or max_minutes that sizes the
    cosine) and root/dense for exactly the MoE's steps; both with `seed` and the settings of `base`.
    `plots=False`: no per-run PNGs."""
    from moekit import build_model

    base = {**base, "seed": seed}
    moe_tc = TrainConfig(**base, **moe_budget, finish_schedule=moe_budget.get("max_minutes") is not None)
    moe_sum = run_one(build_model(moe_cfg, seed=seed), data, root / "moe", moe_tc,
                      {**job, "model": moe_cfg.to_dict(), "train": asdict(moe_tc)}, progress, plots)
    dense_tc = TrainConfig(**base, max_steps=moe_sum["steps"])
    dense_sum = run_one(build_model(dense_cfg, seed=seed), data, root / "dense", dense_tc,
                        {**job, "model": dense_cfg.to_dict(), "train": asdict(dense_tc)}, progress, plots)
    return {"moe": moe_sum, "dense": dense_sum}


def evaluate_pair(root: Path, data, summaries: dict[str, dict[str, Any]], *, eval_tokens: int | None, seq_len: int,
                  splits: list[str] | None = None, split_tokens: dict[str, int | None] | None = None,
                  samples: bool = True, progress: bool = False) -> dict[str, Any]:
    """{"results": {model: {split: eval}}, "samples": {model: {prompt: text}}} of root/{moe,dense} on
    `splits` (default: val, test and the OOD sets), each capped at `split_tokens[split]` if given, else at
    `eval_tokens`; reused from root/eval.json when the same runs were evaluated the same way."""
    from moekit.train.evaluate import evaluate_split, greedy_sample

    runs = {m: {k: v for k, v in summaries[m].items() if k != "reuse"} for m in MODELS}
    names = splits or ["val", "test", *data.ood_names]
    caps = {sp: (split_tokens or {}).get(sp, eval_tokens) for sp in names}
    key = json.loads(json.dumps({"runs": runs, "caps": caps, "seq_len": seq_len, "samples": samples}))
    path = root / EVAL_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old["value"]
    results, texts = {}, {}
    tok = data.tokenizer() if samples else None
    for m in MODELS:
        model = load_native(latest_checkpoint(root / m))
        it = names
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(names, desc=f"eval {root.name} {m}", leave=False)
        results[m] = {sp: evaluate_split(model, data, sp, max_tokens=caps[sp], seq_len=seq_len) for sp in it}
        texts[m] = {p: greedy_sample(model, tok, p, 40) for p in PROMPTS} if samples else {}
    value = {"results": results, "samples": texts}
    atomic_write_text(path, json.dumps({"key": key, "value": value}, indent=1))
    return value


def lrs(run: Path) -> list[tuple[int, float]]:
    """(step, learning rate) of every logged step of a run."""
    from moekit.train.telemetry import read_jsonl

    return [(r["step"], r["lr"]) for r in read_jsonl(run / "metrics.jsonl") if "lr" in r]


def plot_lr(runs: dict[str, Path], path: Path) -> Path:
    """Learning rate against step for each run (both must follow one schedule to its end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for (name, run), style in zip(runs.items(), ("-", "--", ":")):
        pts = lrs(run)
        ax.plot([s for s, _ in pts], [lr for _, lr in pts], style, label=name)
    ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path
