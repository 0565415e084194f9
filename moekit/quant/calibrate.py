"""`quantize_model`: block-by-block quantization with calibration data (GPTQ, router calibration).

Shape legend: B batch, S sequence, T = B*S calibration tokens, D model dim, E experts, K experts per
token, H = 2F expert first-projection rows, F expert hidden dim.

Two hidden-state streams run side by side through the blocks: the full-precision model's (x_fp) and
the partly quantized model's (x_q). Block i is quantized knowing exactly what the already-quantized
blocks 0..i-1 feed it, which is what both GPTQ and EAC-MoE's router calibration (QESC) need.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from moekit.moe.experts import activate
from moekit.quant.apply import Target, block_targets, head_target, quantize_rtn, quantize_target, replace, targets
from moekit.quant.config import QuantConfig, QuantError
from moekit.quant.gptq import Hessian, gptq
from moekit.quant.modules import QuantizedTensor
from moekit.quant.router_fit import fit_router, set_agreement

EXPERT_FLOOR = 64
"""Experts routed fewer calibration tokens than this get every calibration token (all-experts
calibration) so that none is left on plain RTN or with a degenerate Hessian."""


def _rel_err(w: torch.Tensor, q: QuantizedTensor) -> list[float]:
    """||W - Q|| / ||W|| per matrix of the stack (one value for a plain matrix)."""
    w = w.detach().float()
    d = q.dequantize(torch.float32)
    if w.dim() == 2:
        w, d = w.unsqueeze(0), d.unsqueeze(0)
    num = (w - d).flatten(1).norm(dim=1)
    den = w.flatten(1).norm(dim=1).clamp(min=1e-12)
    return (num / den).tolist()


def _gptq_tensor(w_BOI: torch.Tensor, hess: Hessian, t: Target, group_size: int) -> QuantizedTensor:
    """GPTQ of a stack (or of one matrix, given as a stack of 1 and returned unstacked)."""
    Q, s, z = gptq(w_BOI, hess.mean(), t.scheme, group_size, t.zero_point)
    if hess.single:
        Q, s, z = Q[0], s[0], None if z is None else z[0]
    return QuantizedTensor.from_float(Q, t.scheme, group_size, t.zero_point, s, z)


def _quantize_ffn(t: Target, h_TD: torch.Tensor, qcfg: QuantConfig) -> nn.Module:
    """A dense FFN / shared expert with GPTQ on all tokens (w2's inputs from the quantized w13)."""
    ffn, g = t.module, qcfg.group_size
    w13, w2 = ffn.w13.weight, ffn.w2.weight
    h13 = Hessian(1, w13.shape[1], single=True)
    h13.add(0, h_TD)
    q13 = _gptq_tensor(w13.unsqueeze(0), h13, t, g)
    a_TF = activate(h_TD.float() @ q13.dequantize(torch.float32).t(), ffn.act)
    h2 = Hessian(1, w2.shape[1], single=True)
    h2.add(0, a_TF)
    return quantize_target(t, g, q13, _gptq_tensor(w2.unsqueeze(0), h2, t, g))


def _quantize_experts(t: Target, h_TD: torch.Tensor, ids_TK: torch.Tensor, qcfg: QuantConfig, floor: int,
                      method: str) -> tuple[nn.Module, dict[str, Any]]:
    """Stacked experts with per-expert Hessians from the tokens routed to each expert; experts below
    `floor` tokens get all T tokens instead (and are flagged)."""
    ex, g = t.module, qcfg.group_size
    E = ex.num_experts
    routed_E = torch.bincount(ids_TK.reshape(-1), minlength=E)
    low = [e for e in range(E) if int(routed_E[e]) < floor]
    info = {"tokens_per_expert": routed_E.tolist(), "all_experts_calibration": low, "floor": floor}
    if method == "rtn":
        return quantize_target(t, g), info
    x = h_TD.float()
    rows_E = [x if e in low else x[(ids_TK == e).any(-1)] for e in range(E)]
    h13 = Hessian(E, ex.dim)
    for e in range(E):
        h13.add(e, rows_E[e])
    q13 = _gptq_tensor(ex.w13, h13, t, g)
    h2 = Hessian(E, ex.hidden)
    for e in range(E):
        # w2's inputs as the quantized expert computes them (bias and activation constants included).
        pre = rows_E[e] @ q13.dequantize(torch.float32, e).t()
        if getattr(ex, "b13", None) is not None:
            pre = pre + ex.b13[e].float()
        h2.add(e, activate(pre, ex.act, getattr(ex, "alpha", 1.702), getattr(ex, "limit", 7.0)))
    q2 = _gptq_tensor(ex.w2, h2, t, g)
    info["hessian_tokens"] = h13.n.tolist()
    return quantize_target(t, g, q13, q2), info


def _errors(t: Target, new: nn.Module) -> list[float]:
    if t.kind == "experts":
        a, b = _rel_err(t.module.w13, new.qw13), _rel_err(t.module.w2, new.qw2)
        return [(x * x + y * y) ** 0.5 / 2 ** 0.5 for x, y in zip(a, b)]
    if t.kind == "ffn":
        return _rel_err(t.module.w13.weight, new.w13.qweight) + _rel_err(t.module.w2.weight, new.w2.qweight)
    return _rel_err(t.module.weight, new.qweight)


@torch.no_grad()
def quantize_model(model: nn.Module, scheme: str = "int8", group_size: int = 32, *, method: str = "rtn",
                   calib: torch.Tensor | None = None, attention: str = "bf16", router_calibration: bool = False,
                   lm_head: bool = False, dense: bool = True, zero_point: bool = False,
                   expert_floor: int = EXPERT_FLOOR, router_mask_k: int | None = None,
                   progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize `model` in place; returns (model, report).

    calib: int64 [B, S] token ids, needed for method="gptq", router_calibration and the per-expert
    coverage report. router_mask_k: width K' > top_k of the masked logit fit (default 2 * top_k).
    The report holds, per layer, tokens seen per expert, the experts calibrated on all tokens,
    relative weight errors, and (with router calibration) routing agreement before and after.
    """
    # Plan: 1. config and a plain RTN shortcut; 2. per block: (a) full-precision pass, (b) attention,
    # (c) quantized-stream input of the FFN, (d) router refit, (e) shared expert / dense FFN,
    # (f) experts, (g) advance both streams; 3. the head.
    qcfg = QuantConfig(scheme=scheme, group_size=group_size, zero_point=zero_point, method=method,
                       attention=attention, lm_head=lm_head, dense=dense, router_calibration=router_calibration)
    tgts = targets(model, qcfg)  # validates shapes before any work
    model.eval()
    t0 = time.time()
    if calib is None:
        if method == "gptq" or router_calibration:
            raise QuantError(f"{'GPTQ' if method == 'gptq' else 'router calibration'} needs calibration tokens; "
                             "pass --calib (a prepared corpus directory, a corpus name or a text file)")
        report = {"layers": [{"layer": t.layer, "name": t.name, "weight_error": _errors(t, quantize_target(
            t, group_size))} for t in tgts]}
        quantize_rtn(model, qcfg)
        model.quant_config = qcfg
        report["time_s"] = time.time() - t0
        return model, report
    ids_BS = calib.long()
    B, S = ids_BS.shape
    K_mask = router_mask_k or 2 * (model.config.moe.top_k if model.config.moe else 1)
    dt = model.dtype
    pos_BS = torch.arange(S).unsqueeze(0).expand(B, S)
    cos, sin = model.rope(pos_BS, dt)
    x_fp = model.embed(ids_BS)
    x_q = x_fp.clone()
    layers: list[dict[str, Any]] = []

    def attn_out(block, x):
        return x + block.attn(block.attn_norm(x), cos, sin, pos_BS, None, None, 0)

    for i, block in enumerate(model.layers):
        rec: dict[str, Any] = {"layer": i, "moe": bool(block.is_moe), "weight_error": {}}
        # (a) the full-precision block, before any of its weights change
        h_fp_TD = block.ffn_norm(attn_out(block, x_fp)).reshape(B * S, -1)
        x_fp_next = block(x_fp, cos, sin, pos_BS, None, None, 0, False)[0]
        bt = block_targets(model, qcfg, i)
        # (b) attention (int8 round to nearest: near-lossless, and what the FFN then sees)
        for t in (t for t in bt if t.kind == "linear"):
            new = quantize_target(t, group_size)
            rec["weight_error"][t.attr] = _errors(t, new)
            replace(t, new)
        # (c) what the quantized model feeds this block's FFN
        h_q_TD = block.ffn_norm(attn_out(block, x_q)).reshape(B * S, -1)
        if block.is_moe:
            layer = block.ffn
            # (d) router refit on quantized inputs against the full-precision logits
            fp_ids = layer.router(h_fp_TD).topk_ids_TK
            before = set_agreement(layer.router(h_q_TD).topk_ids_TK, fp_ids)
            rec["router"] = {"agreement_before": before}
            if router_calibration:
                rec["router"].update(fit_router(layer.router, h_q_TD, h_fp_TD, K_mask, fp_ids))
        for t in bt:
            if t.kind == "ffn":  # (e)
                new = _quantize_ffn(t, h_q_TD, qcfg) if method == "gptq" else quantize_target(t, group_size)
                rec["weight_error"][t.attr] = _errors(t, new)
                replace(t, new)
            elif t.kind == "experts":  # (f) routed by the (possibly refit) router on quantized inputs
                ids_TK = block.ffn.router(h_q_TD).topk_ids_TK
                new, info = _quantize_experts(t, h_q_TD, ids_TK, qcfg, expert_floor, method)
                rec.update(info)
                rec["weight_error"]["experts"] = _errors(t, new)
                replace(t, new)
        # (g) advance both streams
        x_q = block(x_q, cos, sin, pos_BS, None, None, 0, False)[0]
        x_fp = x_fp_next
        layers.append(rec)
        if progress:
            r = rec.get("router", {})
            msg = f"layer {i}: " + (f"agreement {r.get('agreement_before', 0):.3f}" if r else "dense")
            if "agreement_after" in r:
                msg += f" -> {r['agreement_after']:.3f}{'' if r['accepted'] else ' (refit rejected)'}"
            if rec.get("all_experts_calibration"):
                msg += f", all-experts calibration for {rec['all_experts_calibration']}"
            print(msg, file=sys.stderr, flush=True)
    for t in head_target(model, qcfg):  # 3.
        new = quantize_target(t, group_size)
        layers.append({"layer": None, "name": "lm_head", "weight_error": {"lm_head": _errors(t, new)}})
        replace(t, new)
    qcfg.calibration = {"tokens": B * S, "seq_len": S, "expert_floor": expert_floor, "router_mask_k": K_mask}
    model.quant_config = qcfg
    return model, {"layers": layers, "calib_tokens": B * S, "time_s": time.time() - t0}
