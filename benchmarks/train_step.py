"""Benchmark: training throughput (tokens/s) of moekit's MoE against the same config trained through
transformers' MixtralForCausalLM, on the same batches, with AdamW, on CPU.

Shape legend: B batch, S sequence.

The model is the `small-moe` preset (the main job's MoE: hidden 256, 4 layers, 8 experts top-2,
expert width 512, vocab 8192, tied embeddings); the HF model gets the same shapes via MixtralConfig
(Mixtral's router = softmax over the chosen top-k, moekit's `topk_softmax`). Each step is forward +
backward (cross-entropy + 0.01 x balance loss in both) + AdamW step (fused, in both), in fp32 and under bf16 autocast.
Implementations are timed in interleaved rounds, so machine noise hits all of them alike; the ratio
measured in one run is what counts. Batches are real text from prepared en-prose when present
(`moekit data prepare`), else random ids (the timing does not depend on the token values).

Usage:
  python benchmarks/train_step.py                  # B16 x S256, 3 rounds of 3 steps (~3 min quiet)
  python benchmarks/train_step.py --quick          # 2 rounds of 2 steps
  python benchmarks/train_step.py --threads 2 --batch 8 --seq 256
Writes benchmarks/results/train_step.json and benchmarks/results/train_step.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moekit import build_model, count_params, get_preset  # noqa: E402
from moekit.checkpoint.native import atomic_write_text  # noqa: E402
from moekit.bench.verdict import Verdict, judge  # noqa: E402
from moekit.utils import retain_freed_memory  # noqa: E402


def _label(v: dict) -> str:
    return Verdict(**{k: v[k] for k in ("status", "ratio", "spread", "rounds", "needed", "kind", "side")}).label()


def _facts() -> str:
    import os

    from moekit.doctor import facts, summary_line

    return f"{summary_line(facts(backends=False))}; load average {os.getloadavg()[0]:.1f}"


def hf_model(cfg):
    import transformers as tf

    m = cfg.moe
    hcfg = tf.MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=m.expert_dim,
                            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                            num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd, num_local_experts=m.num_experts,
                            num_experts_per_tok=m.top_k, max_position_embeddings=cfg.max_seq_len,
                            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, output_router_logits=True,
                            router_aux_loss_coef=m.aux_loss_coef, tie_word_embeddings=cfg.tie_embeddings)
    torch.manual_seed(0)
    return tf.MixtralForCausalLM(hcfg).train()


def batches(n: int, B: int, S: int, vocab: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    try:
        from moekit.data import load_prepared

        data = load_prepared(ROOT / "data")
        if data.vocab_size > vocab:  # a preset with a smaller vocabulary (tiny-moe): its ids would not fit
            raise ValueError("vocabulary mismatch")
        s = data.dataset("train").sampler(B, S, seed=0)
        return [next(s) for _ in range(n)], f"en-prose train batches ({data.root.name})"
    except Exception:  # no prepared data: random ids time the same
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(n):
            w = torch.randint(0, vocab, (B, S + 1), generator=g)
            out.append((w[:, :-1], w[:, 1:]))
        return out, "random token ids"


class Runner:
    def __init__(self, name: str, model, bf16: bool, hf: bool, retain: bool, fused: bool = True):
        self.name, self.model, self.bf16, self.hf, self.retain = name, model, bf16, hf, retain
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, x_BS, y_BS) -> float:
        retain_freed_memory(self.retain)  # this runner's allocator mode (process-wide, so set per step)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if self.hf:
                # HF shifts labels itself (logit t vs labels[t+1]): labels = [x0, y0 .. y_{S-2}] gives the
                # same targets as moekit's, minus the last position's.
                labels = torch.cat([x_BS[:, :1], y_BS[:, :-1]], dim=1)
                loss = self.model(input_ids=x_BS, labels=labels).loss
            else:
                loss = self.model(x_BS, labels=y_BS).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small-moe")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step"))
    ap.add_argument("--precisions", default="auto", choices=["auto", "fp32", "bf16", "both"],
                    help="auto: both where bf16 is native, else fp32 only (there bf16 autocast is 10-100x slower "
                         "for both libraries, so fp32 is the fastest dtype for each: moekit.precision)")
    ap.add_argument("--target", type=float, default=1.5, help="ratio moekit / transformers to reach")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.steps, a.warmup = 2, 2, 1
    torch.set_num_threads(a.threads)
    cfg = get_preset(a.preset)
    B, S = a.batch, a.seq
    data, source = batches(a.rounds * a.steps + 1, B, S, cfg.vocab_size)
    from moekit.precision import bf16_native

    modes = {"fp32": (False,), "bf16": (True,), "both": (False, True),
             "auto": (False, True) if bf16_native("cpu") else (False,)}[a.precisions]
    runners = []
    for bf16 in modes:
        tag = "bf16 autocast" if bf16 else "fp32"
        # moekit as `moekit train` runs it (freed memory retained); transformers as a plain training
        # loop runs it, and again with moekit's allocator setting, so the ratio is not the allocator's.
        runners.append(Runner(f"moekit {tag}", build_model(cfg, seed=0).train(), bf16, hf=False, retain=True))
        runners.append(Runner(f"transformers Mixtral {tag}", hf_model(cfg), bf16, hf=True, retain=False))
        runners.append(Runner(f"transformers Mixtral {tag} + retained memory", hf_model(cfg), bf16, hf=True,
                              retain=True))
    for r in runners:  # warmup (allocator caches, oneDNN primitive caches)
        for _ in range(a.warmup):
            r.step(*data[0])
    for rnd in range(a.rounds):
        for r in runners:
            for i in range(a.steps):
                r.times.append(r.step(*data[1 + rnd * a.steps + i]))
        print(f"round {rnd + 1}/{a.rounds}: " + ", ".join(f"{r.name} {B * S / statistics.median(r.times):,.0f} tok/s"
                                                       for r in runners), flush=True)
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        rows.append({"impl": r.name, "tokens_per_s": B * S / med, "step_s_median": med, "steps": len(r.times),
                     "params": sum(p.numel() for p in r.model.parameters())})
    # Ratios only ever pair the same precision: moekit in fp32 against transformers in fp32, bf16
    # against bf16 (transformers' faster allocator variant of that precision). Per round: each round
    # ran every implementation back to back, so round i of both is one sample of the ratio.
    def round_tok_s(r: Runner) -> list[float]:
        return [B * S / statistics.median(r.times[i * a.steps:(i + 1) * a.steps]) for i in range(a.rounds)]

    same, verdicts = {}, {}
    for tag in [("bf16 autocast" if b else "fp32") for b in modes]:
        ours = next(r for r in runners if r.name == f"moekit {tag}")
        theirs = max((r for r in runners if r.name.startswith(f"transformers Mixtral {tag}")),
                     key=lambda r: B * S / statistics.median(r.times))
        same[tag] = (B * S / statistics.median(ours.times)) / (B * S / statistics.median(theirs.times))
        per_round = [x / y for x, y in zip(round_tok_s(ours), round_tok_s(theirs))]
        verdicts[tag] = {"baseline": theirs.name, **judge(per_round, a.target, "ratio").to_dict()}
    # The headline: the precision in which moekit trains fastest, against transformers in that precision.
    head = max(same, key=lambda tag: next(x["tokens_per_s"] for x in rows if x["impl"] == f"moekit {tag}"))
    ratio_best = same[head]
    pc = count_params(cfg)
    meta = {"preset": a.preset, "batch": B, "seq": S, "threads": a.threads, "rounds": a.rounds, "steps": a.steps,
            "batches": source, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "machine_facts": _facts(), "moekit_total_params": pc.total_params,
            "moekit_active_params": pc.active_params, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    from moekit import kernels

    meta["kernels"] = kernels.available()
    meta["cpu_cache"] = kernels.cpu_cache_stats()
    res = {"meta": meta, "rows": rows, "headline_precision": head, "ratio_best_same_precision": ratio_best,
           "ratio_same_precision": same, "verdicts": verdicts, "target": f">= {a.target}x transformers tokens/s",
           "meets_target": verdicts[head]["met"]}
    out = Path(a.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1))
    md = [f"# Training step throughput: moekit vs transformers Mixtral ({a.preset})", "",
          f"B{B} x S{S}, AdamW, {a.threads} threads, {a.rounds} interleaved rounds x {a.steps} steps, {source}; "
          f"torch {meta['torch']}, transformers {meta.get('transformers', '?')}, {meta['date']}.", "",
          f"Machine: {meta['machine_facts']}.", "",
          "| implementation | tokens/s | median step (s) | params |", "|---|---:|---:|---:|"]
    md += [f"| {x['impl']} | {x['tokens_per_s']:,.0f} | {x['step_s_median']:.3f} | {x['params'] / 1e6:.2f}M |"
           for x in rows]
    md += ["", "moekit runs with freed memory retained, as `moekit train` sets it (`moekit.utils.retain_freed_memory`: "
           "glibc keeps its heap, and torch's CPU allocator becomes moekit's caching allocator, so large buffers are "
           "reused instead of page-faulted in again each step); transformers runs both ways, plain and with the same "
           "setting, and its best row is the baseline. moekit's CPU training kernels (cross-entropy, causal softmax, "
           "rotary, RMSNorm, MoE gather/combine/SwiGLU backward) are on, as in `moekit train`.",
           "", f"moekit in its fastest precision ({head}) / transformers in the same precision: **{ratio_best:.2f}x** "
           f"(target >= {a.target}x: {_label(verdicts[head])}). Same precision, median over rounds (spread) and verdict: "
           + "; ".join(f"{tag} {same[tag]:.2f}x ({verdicts[tag]['spread']:.2f}) {_label(verdicts[tag])}"
                       for tag in same)
           + ". Ratios never pair different precisions. Verdicts (`moekit/bench/verdict.py`): yes/no only with 2+ "
           f"rounds and the median ratio clearing {a.target}x by more than the spread over rounds; 1 round is indicative.", "",
           "Rerun: `python benchmarks/train_step.py` (`--quick` for a short run)."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
