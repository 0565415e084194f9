"""What quantization did to a model: routing agreement per layer, next-token KL, same-top-token rate,
bits per byte and its delta, per-expert weight error, calibration coverage, file size, decode speed.

Shape legend: B batch, S sequence, V vocab, T tokens, K experts per token, E experts.

Both models run on the same evaluation windows in one loop. When the quantized model had its
routers recalibrated, a second variant swaps the original routers back in (same quantized weights),
which isolates what the router calibration changed.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moekit.moe.experts import GroupedExperts
from moekit.quant.modules import QuantizedExperts
from moekit.quant.router_fit import set_agreement, shared_agreement


@contextlib.contextmanager
def original_routers(quant, orig):
    """Temporarily give `quant` the routers of `orig` (weights and bias)."""
    saved = []
    for lq, lo in zip(quant.moe_layers(), orig.moe_layers()):
        rq, ro = lq.router, lo.router
        saved.append((rq, rq.weight.detach().clone(), None if rq.bias is None else rq.bias.detach().clone()))
        with torch.no_grad():
            rq.weight.copy_(ro.weight.to(rq.weight.dtype))
            if rq.bias is not None:
                rq.bias.copy_(ro.bias.to(rq.bias.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for rq, w, b in saved:
                rq.weight.copy_(w)
                if b is not None:
                    rq.bias.copy_(b)


@torch.no_grad()
def compare(orig, quant, tokens: np.ndarray, *, seq_len: int = 256, batch_size: int = 8, n_bytes: int | None = None
            ) -> dict[str, Any]:
    """Per-layer routing agreement, KL(orig || quant), same-top-token rate and NLL / bpb of both."""
    from moekit.data import iter_eval_batches

    moe_idx = [i for i, b in enumerate(orig.layers) if b.is_moe]
    exact = np.zeros(len(moe_idx))
    shared = np.zeros(len(moe_idx))
    n_tok = 0
    kl = same = nll_o = nll_q = 0.0
    for x_BS, y_BS in iter_eval_batches(tokens, batch_size, seq_len):
        o = orig(x_BS, return_routing_ids=True)
        q = quant(x_BS, return_routing_ids=True)
        lo = o.logits.float().reshape(-1, o.logits.shape[-1]).log_softmax(-1)
        lq = q.logits.float().reshape(-1, q.logits.shape[-1]).log_softmax(-1)
        T = lo.shape[0]
        kl += float(F.kl_div(lq, lo, log_target=True, reduction="sum"))
        same += float((lo.argmax(-1) == lq.argmax(-1)).sum())
        y = y_BS.reshape(-1)
        nll_o += float(F.nll_loss(lo, y, reduction="sum"))
        nll_q += float(F.nll_loss(lq, y, reduction="sum"))
        for j, i in enumerate(moe_idx):
            a, b = o.routing[i].expert_ids, q.routing[i].expert_ids
            exact[j] += set_agreement(a, b) * T
            shared[j] += shared_agreement(a, b) * T
        n_tok += T
    out: dict[str, Any] = {
        "tokens": n_tok, "kl": kl / n_tok, "same_top_token": same / n_tok,
        "nll_orig": nll_o / n_tok, "nll_quant": nll_q / n_tok,
        "layers": [{"layer": i, "agreement_exact": exact[j] / n_tok, "agreement_shared": shared[j] / n_tok}
                   for j, i in enumerate(moe_idx)],
    }
    if moe_idx:
        out["agreement_exact_mean"] = float(exact.mean() / n_tok)
        out["agreement_shared_mean"] = float(shared.mean() / n_tok)
    if n_bytes:
        out["bpb_orig"] = nll_o / math.log(2) / n_bytes
        out["bpb_quant"] = nll_q / math.log(2) / n_bytes
        out["bpb_delta_pct"] = 100.0 * (out["bpb_quant"] / out["bpb_orig"] - 1.0)
    return out


@torch.no_grad()
def expert_errors(orig, quant) -> list[dict[str, Any]]:
    """Relative Frobenius error ||W - deq(Q)|| / ||W|| of each expert (w13 and w2 together) per layer."""
    out = []
    for i, (bo, bq) in enumerate(zip(orig.layers, quant.layers)):
        if not bo.is_moe or not isinstance(bo.ffn.experts, GroupedExperts) \
                or not isinstance(bq.ffn.experts, QuantizedExperts):
            continue
        eo, eq = bo.ffn.experts, bq.ffn.experts
        errs = []
        for e in range(eo.num_experts):
            w13, w2 = eq.expert_weights(e, torch.float32)
            num = (eo.w13[e].float() - w13).square().sum() + (eo.w2[e].float() - w2).square().sum()
            den = eo.w13[e].float().square().sum() + eo.w2[e].float().square().sum()
            errs.append(float((num / den.clamp(min=1e-30)).sqrt()))
        out.append({"layer": i, "relative_error": errs, "max": max(errs), "mean": sum(errs) / len(errs)})
    return out


@torch.no_grad()
def decode_tokens_per_s(models: dict[str, Any], prompt_BS: torch.Tensor, new_tokens: int, rounds: int = 3,
                        setup: dict[str, Any] | None = None) -> dict[str, float]:
    """Greedy batch-1 decode speed of each model, rounds interleaved (the machine may be shared:
    the best round of each is kept). setup[name], when given, is called before that model's round
    (e.g. to switch a model between two execution paths)."""
    best = {k: 0.0 for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            if setup and name in setup:
                setup[name]()
            cache = m.new_cache(1, prompt_BS.shape[1] + new_tokens)
            out = m(prompt_BS, cache=cache, logits_at=torch.tensor([prompt_BS.shape[1] - 1]))
            cache.advance(prompt_BS.shape[1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                out = m(nxt, cache=cache, logits_at=torch.tensor([0]))
                cache.advance(1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            best[name] = max(best[name], new_tokens / (time.perf_counter() - t0))
    return best


def to_markdown(rep: dict[str, Any]) -> str:
    """The report as a markdown page."""
    lines = [f"# Quantization report: {rep['quant']}", "",
             f"original `{rep['orig']}`, scheme `{rep['quantization'].get('scheme')}` "
             f"(method {rep['quantization'].get('method')}, group {rep['quantization'].get('group_size')}, "
             f"router calibration {rep['quantization'].get('router_calibration')}, "
             f"attention {rep['quantization'].get('attention')}); eval `{rep.get('data', '')}` "
             f"{rep['main']['tokens']} tokens; machine: {rep.get('machine', '')}", "",
             "| variant | bpb | bpb delta | KL | same top token | agreement (exact set) | agreement (>=1 shared) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in rep["variants"].items():
        lines.append(f"| {name} | {v.get('bpb_quant', float('nan')):.4f} | {v.get('bpb_delta_pct', float('nan')):+.3f}% "
                     f"| {v['kl']:.5f} | {v['same_top_token']:.4f} | {v.get('agreement_exact_mean', float('nan')):.4f} "
                     f"| {v.get('agreement_shared_mean', float('nan')):.4f} |")
    sz = rep["size"]
    lines += ["", f"original bpb {rep['main'].get('bpb_orig', float('nan')):.4f}; file size "
              f"{sz['orig_mb']:.2f} MB ({sz.get('orig_dtype', '')}) -> {sz['quant_mb']:.2f} MB "
              f"({sz['ratio']:.2f}x smaller; {sz.get('ratio_vs_bf16', float('nan')):.2f}x smaller than bf16); "
              f"experts alone {sz.get('expert_bytes_bf16', 0) / 1e6:.2f} MB bf16 -> "
              f"{sz.get('expert_bytes_quant', 0) / 1e6:.2f} MB "
              f"({sz.get('expert_bytes_bf16', 0) / max(sz.get('expert_bytes_quant', 0), 1):.2f}x)"]
    if rep.get("decode_tokens_per_s"):
        lines.append("decode tokens/s (batch 1, greedy, best of interleaved rounds): " + ", ".join(
            f"{k} {v:.1f}" for k, v in rep["decode_tokens_per_s"].items()))
    lines += ["", "## Per layer", "", "| layer | " + " | ".join(f"{n} exact | {n} shared" for n in rep["variants"])
              + " | expert weight error (mean / max) | tokens per expert (calibration) | all-experts calibration |",
              "|---:|" + "---:|---:|" * len(rep["variants"]) + "---|---|---|"]
    errs = {e["layer"]: e for e in rep["expert_error"]}
    cov = {c["layer"]: c for c in rep.get("calibration", []) if c.get("layer") is not None}
    for j, L in enumerate(rep["main"]["layers"]):
        i = L["layer"]
        cells = [f"{v['layers'][j]['agreement_exact']:.4f} | {v['layers'][j]['agreement_shared']:.4f}"
                 for v in rep["variants"].values()]
        e = errs.get(i)
        err = "" if e is None else f"{e['mean']:.4f} / {e['max']:.4f}"
        c = cov.get(i, {})
        lines.append(f"| {i} | " + " | ".join(cells) + f" | {err} "
                     f"| {c.get('tokens_per_expert', '')} | {c.get('all_experts_calibration', '')} |")
    return "\n".join(lines) + "\n"


def plot(rep: dict[str, Any], path: Path) -> None:
    """PNG: exact-set routing agreement per MoE layer, per variant (with / without router calibration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, v in rep["variants"].items():
        xs = [L["layer"] for L in v["layers"]]
        ax.plot(xs, [L["agreement_exact"] for L in v["layers"]], marker="o", label=f"{name}: exact set")
        ax.plot(xs, [L["agreement_shared"] for L in v["layers"]], marker=".", ls="--", label=f"{name}: >=1 shared")
    ax.set_xticks([L["layer"] for L in rep["main"]["layers"]])
    ax.set_xlabel("layer")
    ax.set_ylabel("top-k agreement with original")
    ax.set_title(f"routing agreement ({rep['quantization'].get('scheme')}, {rep['quantization'].get('method')})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(paths: list[str]) -> str:
    """One markdown row per quant_report.json: the numbers docs/quantization.md tabulates."""
    import json

    head = ("| model | bpb | bpb delta | KL | same top token | agreement exact | agreement >=1 shared "
            "| agreement, original routers | file MB | x smaller than bf16 | experts x smaller | decode tok/s (orig / quant) |")
    rows = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for p in paths:
        r = json.loads(Path(p).read_text())
        m, sz, q = r["main"], r["size"], r["quantization"]
        label = f"{q['scheme']} {q['method']}" + (" + router cal." if q["router_calibration"] else "") + \
            (f" g{q['group_size']}" if q["group_size"] != 32 else "") + \
            (", attention int8" if q.get("attention") == "int8" else "")
        fp = r["variants"].get("quantized, original routers")
        dec = r.get("decode_tokens_per_s", {})
        rows.append(
            f"| {label} | {m['bpb_quant']:.4f} | {m['bpb_delta_pct']:+.3f}% | {m['kl']:.5f} | {m['same_top_token']:.4f} "
            f"| {m.get('agreement_exact_mean', float('nan')):.4f} | {m.get('agreement_shared_mean', float('nan')):.4f} "
            f"| {'' if fp is None else format(fp['agreement_exact_mean'], '.4f')} | {sz['quant_mb']:.2f} "
            f"| {sz['ratio_vs_bf16']:.2f} | {sz['expert_bytes_bf16'] / max(sz['expert_bytes_quant'], 1):.2f} "
            f"| {' / '.join(f'{v:.1f}' for v in dec.values())} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    print(summary_table(sys.argv[1:]))
