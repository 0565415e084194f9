"""Expert offloading: decode tokens/s at batch 1, hit rate, prefetch accuracy, stall per token and
peak RSS vs the expert memory budget, with and without prefetch, cold (first prompt after load)
and warm (second prompt), beside the fully resident model. Each configuration runs in its own
subprocess (clean RSS); all of them in one invocation. Writes JSON, markdown and a plot.

    python benchmarks/memory_offload.py --model tiny-mixtral --budgets 0.4 \
        --data /work/wt-quant/data/en-prose-bpe8192
    python benchmarks/memory_offload.py --model /work/wt-quant/runs/small-moe-long --budgets 0.4 0.6

`--model tiny-mixtral` saves a random-init bf16 tiny-Mixtral (1.1 GB of experts) once to
--cache-dir. Prompts are en-prose val text tokens (ids taken modulo the model's vocabulary).
Indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def child(a) -> dict:
    import torch

    import moekit
    from moekit.inference import Engine, SamplingParams

    torch.set_num_threads(a.threads)
    with torch.device("meta"):
        moekit.Transformer(moekit.get_preset("tiny-moe"))  # one-off meta-device state, outside the delta
    base = _status("VmRSS")
    mode, ref = a.mode.removesuffix("-reference"), a.mode.endswith("-reference")
    if mode.startswith("resident"):
        from moekit.quant.checkpoint import is_quantized, load_quantized

        m = load_quantized(a.model_dir) if is_quantized(a.model_dir) else moekit.load_model(a.model_dir)
    else:
        from moekit.memory import load_offloaded

        m = load_offloaded(a.model_dir, mode, prefetch=a.prefetch)
    if ref:  # the same per-expert loop on both sides: the token-identity check, not a timed row
        from moekit.moe.backends import set_backend

        set_backend(m, "reference")
    prompts = json.loads(Path(a.prompts).read_text())
    eng = Engine(m)
    sp = SamplingParams(max_new_tokens=a.new_tokens)
    out = {"mode": a.mode, "prefetch": a.prefetch}
    for phase, p in (("cold", prompts[0]), ("warm", prompts[1])):
        if not mode.startswith("resident"):
            from moekit.memory.offload import offload_telemetry, reset_telemetry

            reset_telemetry(m)
        t = time.perf_counter()
        g = eng.generate([p], sp)[0]
        wall = time.perf_counter() - t
        s = eng.stats
        r = {"decode_tok_s": (s.generated_tokens - 1) / max(s.decode_s, 1e-9), "prefill_s": s.prefill_s,
             "wall_s": wall, "tokens": g.tokens}
        if not mode.startswith("resident"):
            tel = offload_telemetry(m)
            r.update({k: tel[k] for k in ("hit_rate", "prefetch_accuracy", "prefetch_recall", "bytes_read",
                                          "stall_s", "max_resident_bytes")})
            r["stall_ms_per_token"] = 1e3 * tel["stall_s"] / max(s.generated_tokens, 1)
        out[phase] = r
    out["peak_rss_delta"] = _status("VmHWM") - base
    out["model_bytes"] = os.path.getsize(Path(a.model_dir) / "model.safetensors")
    if not mode.startswith("resident"):
        from moekit.memory.offload import close_offload

        out["plan"] = m.offload_plan
        close_offload(m)
    return out


def prepare(a) -> tuple[str, str]:
    import numpy as np
    import torch

    import moekit

    model_dir = a.model
    if a.model == "tiny-mixtral":
        model_dir = str(Path(a.cache_dir) / "tiny-mixtral-bf16")
        if not (Path(model_dir) / "model.safetensors").is_file():
            m = moekit.build_model(moekit.get_preset("tiny-mixtral"), seed=0)
            moekit.save_model(m, model_dir, dtype=torch.bfloat16)
            del m
    else:
        from moekit.train.evaluate import resolve_checkpoint

        model_dir = str(resolve_checkpoint(a.model))
    if a.quantize:  # the same weights, experts (and dense FFNs) quantized round-to-nearest, group 32
        from moekit.quant.calibrate import quantize_model
        from moekit.quant.checkpoint import save_quantized

        qdir = str(Path(a.cache_dir) / f"{Path(model_dir).name}-{a.quantize}")
        if not (Path(qdir) / "model.safetensors").is_file():
            q, _ = quantize_model(moekit.load_model(model_dir), a.quantize, 32)
            save_quantized(q, q.quant_config, qdir)
            del q
        model_dir = qdir
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    if a.data:
        from moekit.data import load_prepared

        toks = np.asarray(load_prepared(a.data).dataset("val").tokens[: 4 * a.prompt_len]).astype("int64") % vocab
    else:
        toks = torch.randint(0, vocab, (4 * a.prompt_len,), generator=torch.Generator().manual_seed(0)).numpy()
    prompts = [toks[i * a.prompt_len:(i + 1) * a.prompt_len].tolist() for i in (0, 2)]
    pf = Path(a.cache_dir) / "offload_prompts.json"
    pf.write_text(json.dumps(prompts))
    return model_dir, str(pf)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-mixtral")
    ap.add_argument("--data", default=None)
    ap.add_argument("--budgets", nargs="+", default=["0.4"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-dir", default="/tmp/moekit-bench")
    ap.add_argument("--quantize", default=None, choices=["int8", "int4", "mxfp4"],
                    help="offload a round-to-nearest quantized copy (experts stream their codes and scales)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of every configuration, round-robin; tables give the median tok/s (min-max)")
    ap.add_argument("--out", default="benchmarks/results/memory_offload")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="resident", help=argparse.SUPPRESS)
    ap.add_argument("--prefetch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0
    Path(a.cache_dir).mkdir(parents=True, exist_ok=True)
    model_dir, prompts = prepare(a)
    runs = [("resident", 1)] + [(b, pf) for b in a.budgets for pf in (1, 0)]
    per_cfg: dict = {}
    for rnd in range(a.rounds):
        for mode, pf in (runs if rnd % 2 == 0 else runs[::-1]):  # alternate the order: drift hits all alike
            res = _run_child(a, mode, pf, model_dir, prompts)
            if res is None:
                return 1
            per_cfg.setdefault((mode, pf), []).append(res)
    results = [_merge(per_cfg[k]) for k in runs]
    # Token identity: resident and offloaded on the same per-expert loop (the reference backend),
    # once per budget. The timed rows use each model's default backend, whose bf16 rounding differs
    # between the fused resident kernels and the per-expert offloaded path.
    ref = _run_child(a, "resident-reference", 1, model_dir, prompts)
    for r in results[1:]:
        chk = _run_child(a, f"{r['mode']}-reference", r["prefetch"], model_dir, prompts)
        if ref is None or chk is None:
            return 1
        r["tokens_match_resident"] = all(chk[p]["tokens"] == ref[p]["tokens"] for p in ("cold", "warm"))
    write({"model": model_dir, "cpu": cpu_name(), "threads": a.threads, "new_tokens": a.new_tokens,
           "prompt_len": a.prompt_len, "data": a.data, "rounds": a.rounds, "runs": results}, Path(a.out))
    return 0


def _merge(rounds: list[dict]) -> dict:
    """One configuration over its rounds: the first round's telemetry, tokens/s as the median, with
    every round's value and the spread kept."""
    import statistics

    out = rounds[0]
    for ph in ("cold", "warm"):
        vals = [r[ph]["decode_tok_s"] for r in rounds]
        out[ph]["decode_tok_s_rounds"] = vals
        out[ph]["decode_tok_s"] = statistics.median(vals)
        if "hit_rate" in out[ph]:
            out[ph]["hit_rate_rounds"] = [r[ph]["hit_rate"] for r in rounds]
    out["peak_rss_delta"] = max(r["peak_rss_delta"] for r in rounds)
    return out


def _run_child(a, mode: str, pf: int, model_dir: str, prompts: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--prefetch", str(pf), "--model-dir", model_dir,
           "--prompts", prompts, "--new-tokens", str(a.new_tokens), "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    w = res["warm"]
    print(f"{mode:>8} prefetch={pf}: warm {w['decode_tok_s']:.2f} tok/s hit {w.get('hit_rate')} "
          f"peak RSS +{res['peak_rss_delta'] / 2**20:.0f} MiB", flush=True)
    return res


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def write(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    runs = res["runs"]
    full = runs[0]["model_bytes"]
    lines = [f"# Expert offloading ({res['model']}, {res['cpu']}, {res['threads']} threads, batch 1, "
             f"{res['new_tokens']} new tokens after {res['prompt_len']}-token prompts, "
             f"{res.get('rounds', 1)} round(s): median tok/s (min-max))", "",
             f"Model file: {full / 2**20:.0f} MiB.", "",
             "| budget | prefetch | cold tok/s | warm tok/s | warm hit rate | prefetch accuracy | stall ms/token | "
             "peak RSS delta MiB | max resident experts MiB | tokens = resident |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        c, w = r["cold"], r["warm"]
        acc = w.get("prefetch_accuracy")
        res_mib = w.get("max_resident_bytes")
        pfs = ("on" if r["prefetch"] else "off") if not r["mode"].startswith("resident") else "-"
        def tps(ph):
            v = ph.get("decode_tok_s_rounds", [ph["decode_tok_s"]])
            return f"{ph['decode_tok_s']:.2f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else "")

        lines.append(f"| {r['mode']} | {pfs} | {tps(c)} | "
                     f"{tps(w)} | {w.get('hit_rate', 1.0):.3f} | "
                     f"{'-' if acc is None else f'{acc:.3f}'} | {w.get('stall_ms_per_token', 0.0):.1f} | "
                     f"{r['peak_rss_delta'] / 2**20:.0f} | {'-' if res_mib is None else f'{res_mib / 2**20:.0f}'} | "
                     f"{r.get('tokens_match_resident', '-')} |")
    lines += ["", "tokens = resident: greedy tokens of this budget and the resident model, both run once more on the",
              "`reference` expert backend (the same per-expert loop), are equal. The timed rows use each model's",
              "default backend; the resident one's fused kernels round bf16 differently, which flips greedy ties",
              "of a random-init model after a few tokens."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for pf, mk in ((1, "o"), (0, "s")):
        rs = [r for r in runs[1:] if r["prefetch"] == pf]
        xs = [float(r["mode"]) if float(r["mode"]) <= 1 else r["mode"] for r in rs]
        ax[0].plot(xs, [r["warm"]["decode_tok_s"] for r in rs], marker=mk, label=f"prefetch {'on' if pf else 'off'}")
        ax[1].plot(xs, [r["warm"]["hit_rate"] for r in rs], marker=mk, label=f"prefetch {'on' if pf else 'off'}")
    ax[0].axhline(runs[0]["warm"]["decode_tok_s"], color="0.5", ls="--", label="resident")
    ax[0].set_xlabel("expert budget (fraction)")
    ax[0].set_ylabel("decode tok/s (warm)")
    ax[1].set_xlabel("expert budget (fraction)")
    ax[1].set_ylabel("hit rate (warm)")
    for x in ax:
        x.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
