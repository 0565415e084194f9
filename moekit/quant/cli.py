"""`moekit quantize` and `moekit quant-report`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from moekit.quant.config import QuantError

REPORT_STEM = "quant_report"


def _file_bytes(path: str | Path) -> int:
    """Bytes of a model's weight files (a run directory: its latest checkpoint's; optimizer state excluded)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not (p / "config.json").is_file():
        from moekit.train.evaluate import resolve_checkpoint

        p = resolve_checkpoint(p)
    return sum(f.stat().st_size for f in p.glob("model*.safetensors"))


def _bf16_bytes(model) -> int:
    """What the model's weights take in bf16 (float tensors at 2 bytes, others as they are)."""
    ts = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for t in ts)


def _load(path: str | Path):
    from moekit.checkpoint import CheckpointError
    from moekit.train.evaluate import resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise QuantError(f"{p}: no such model directory")
    try:
        from moekit import load_model

        return load_model(resolve_checkpoint(p) if not (p / "config.json").is_file() else p)
    except CheckpointError as e:
        raise QuantError(str(e)) from None


def _experts(model) -> list:
    return [layer.experts for layer in model.moe_layers()]


def run_report(orig: str | Path, quant: str | Path, out: str | Path | None = None, *, data: str = "data",
               split: str = "val", max_tokens: int = 16384, seq_len: int = 256, decode_tokens: int = 32,
               orig_model=None, quant_model=None) -> dict[str, Any]:
    """Compare ORIG and QUANT; write quant_report.{json,md,png} into `out` (default: QUANT)."""
    # Plan: 1. load both (or take them); 2. eval tokens and their bytes; 3. compare (and again with
    # the original routers when QUANT's were recalibrated); 4. weight errors, coverage, size, speed;
    # 5. write JSON, markdown and PNG atomically.
    from moekit.checkpoint.native import atomic_write, atomic_write_text
    from moekit.kernels.isa import cpu_model
    from moekit.quant import report as R
    from moekit.quant.checkpoint import REPORT_NAME
    from moekit.quant.data import _prepared
    from moekit.train.evaluate import _target_bytes

    om = orig_model if orig_model is not None else _load(orig)
    qm = quant_model if quant_model is not None else _load(quant)
    qcfg = getattr(qm, "quant_config", None)
    if qcfg is None:
        raise QuantError(f"{quant}: not a quantized model (no `quantization` section in its config.json)")
    prep = _prepared(data, "data")
    if prep is None:
        raise QuantError(f"--data {data!r}: not a prepared corpus; run `moekit data prepare` and pass its directory")
    tokens = prep.memmap(split)
    capped = len(tokens) - 1 > max_tokens
    if capped:
        tokens = tokens[: max_tokens + 1]
    n_bytes = _target_bytes(prep.tokenizer(), tokens[1:], prep.eos_id) if capped else prep.splits[split].n_bytes
    variants = {}
    main = R.compare(om, qm, tokens, seq_len=min(seq_len, om.config.max_seq_len), n_bytes=n_bytes)
    variants["quantized" + (" + router calibration" if qcfg.router_calibration else "")] = main
    if qcfg.router_calibration:
        with R.original_routers(qm, om):
            variants["quantized, original routers"] = R.compare(om, qm, tokens, seq_len=min(seq_len, om.config.max_seq_len),
                                                                n_bytes=n_bytes)
    qdir = Path(quant)
    cov = json.loads((qdir / REPORT_NAME).read_text()) if (qdir / REPORT_NAME).is_file() else {}
    ob, qb = _file_bytes(orig), _file_bytes(quant)
    rep: dict[str, Any] = {
        "orig": str(orig), "quant": str(quant), "data": str(prep.root), "split": split, "machine": cpu_model(),
        "quantization": qcfg.to_dict(), "main": main, "variants": variants,
        "expert_error": R.expert_errors(om, qm), "calibration": cov.get("layers", []),
        "size": {"orig_bytes": ob, "quant_bytes": qb, "orig_mb": ob / 1e6, "quant_mb": qb / 1e6,
                 "ratio": ob / max(qb, 1), "orig_dtype": str(om.dtype).replace("torch.", ""),
                 "bf16_bytes": _bf16_bytes(om), "ratio_vs_bf16": _bf16_bytes(om) / max(qb, 1),
                 "expert_bytes_bf16": sum(2 * e.w13.numel() + 2 * e.w2.numel() for e in _experts(om)),
                 "expert_bytes_quant": sum(e.qw13.nbytes + e.qw2.nbytes for e in _experts(qm))},
    }
    if decode_tokens:
        prompt = torch.from_numpy(tokens[:16].astype("int64")).unsqueeze(0)
        models, setup = {"orig": om, "quant": qm}, {}
        if qcfg.scheme == "int4":  # also torch's int4 matmul (QuantizedExperts.pack)
            from moekit.quant.modules import pack_int4

            models["quant (int4pack)"] = qm
            setup = {"quant": lambda: [layer.experts.unpack() for layer in qm.moe_layers()],
                     "quant (int4pack)": lambda: pack_int4(qm)}
        rep["decode_tokens_per_s"] = R.decode_tokens_per_s(models, prompt, decode_tokens, setup=setup)
        for layer in qm.moe_layers():
            if hasattr(layer.experts, "unpack"):
                layer.experts.unpack()
        rep["threads"] = torch.get_num_threads()
    out = Path(out) if out is not None else qdir
    atomic_write_text(out / f"{REPORT_STEM}.json", json.dumps(rep, indent=2))
    atomic_write_text(out / f"{REPORT_STEM}.md", R.to_markdown(rep))
    atomic_write(out / f"{REPORT_STEM}.png", lambda tmp: R.plot(rep, Path(tmp + ".png")) or os.replace(tmp + ".png", tmp))
    return rep


def quantize_cli(model: str, out: str, scheme: Literal["int8", "int4", "mxfp4", "q4_k"] = "int8", group_size: int = 32,
                 method: Literal["rtn", "gptq"] = "rtn", calib: str | None = None, calib_tokens: int = 8192,
                 router_calibration: bool = False, attention: Literal["int8", "bf16"] = "bf16",
                 lm_head: bool = False, zero_point: bool = False, expert_floor: int = 64, seq_len: int = 256,
                 data_dir: str = "data", report: bool = True, report_data: str | None = None,
                 report_tokens: int = 16384, gguf: bool = False, threads: int | None = None) -> int:
    """Quantize a model's experts (and dense FFNs / shared experts) weight-only, group-wise.

    Writes OUT (config.json with a `quantization` section, model.safetensors with packed codes and
    scales, quant_calibration.json with tokens seen per expert and weight errors) and, unless
    --no-report, OUT/quant_report.{json,md,png} (see `moekit quant-report`). The router, norms and
    embeddings are kept as they are. Load OUT with `moekit.load_model`.

    Args:
        model: a moekit model directory or `moekit train` run directory.
        out: output directory.
        scheme: int8 (symmetric), int4 (symmetric like GGUF Q4_0, or --zero-point), mxfp4 (E2M1 + E8M0 scales)
            or q4_k (GGML Q4_K super-blocks, llama.cpp's reference quantizer; RTN only, input dims multiples of 256).
        group_size: elements per scale along each row (mxfp4: 32).
        method: rtn (round to nearest) or gptq (per-expert Hessians from the tokens routed to each expert).
        calib: calibration data: a prepared corpus directory, a corpus name prepared under --data-dir, or a text file.
        calib_tokens: calibration tokens.
        router_calibration: refit each MoE router on the quantized model's inputs (EAC-MoE QESC).
        attention: int8 also quantizes the attention projections.
        lm_head: also quantize the output head.
        zero_point: int4 with per-group zero points (asymmetric).
        expert_floor: experts routed fewer calibration tokens than this are calibrated on all of them.
        seq_len: calibration window length.
        data_dir: where corpus names are prepared.
        report: write the quantization report.
        report_data: prepared corpus for the report (default: --calib if it is one, else en-prose under --data-dir).
        report_tokens: evaluation tokens of the report.
        gguf: also write OUT/model.gguf (Mixtral / Qwen3-MoE layouts, group size 32): int8 as Q8_0,
            int4 as Q4_0, mxfp4 as MXFP4, q4_k as Q4_K, the same codes and scales.
        threads: torch threads (default: torch's choice).
    """
    from moekit.checkpoint.native import atomic_write_text
    from moekit.quant.calibrate import quantize_model
    from moekit.quant.checkpoint import REPORT_NAME, save_quantized
    from moekit.quant.data import _prepared, token_stream, windows

    if threads:
        torch.set_num_threads(threads)
    if Path(out).resolve() == Path(model).resolve():
        raise QuantError("OUT must differ from MODEL (the original is needed for the report)")
    m = _load(model)
    ids = None
    if calib is not None:
        stream = token_stream(calib, data_dir=data_dir, model_dir=model)
        ids = windows(stream, calib_tokens, min(seq_len, m.config.max_seq_len), m.config.vocab_size)
    q, rep = quantize_model(m, scheme, group_size, method=method, calib=ids, attention=attention,
                            router_calibration=router_calibration, lm_head=lm_head, zero_point=zero_point,
                            expert_floor=expert_floor, progress=True)
    if calib is not None:
        q.quant_config.calibration["data"] = calib
    save_quantized(q, q.quant_config, out)
    atomic_write_text(Path(out) / REPORT_NAME, json.dumps(rep, indent=2))
    src = Path(model) if (Path(model) / "config.json").is_file() else None
    if src is not None and (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", Path(out) / "tokenizer.json")
    if gguf:
        from moekit.quant.gguf_export import export_quantized_gguf

        print(f"wrote {export_quantized_gguf(q, out)}", file=sys.stderr)
    print(f"quantized {model} -> {out}: {q.quant_config.scheme} ({method}) in {rep['time_s']:.1f} s, "
          f"{_file_bytes(out) / 1e6:.2f} MB", file=sys.stderr)
    rdata = report_data or (calib if calib is not None and _prepared(calib, data_dir) is not None else
                            str(Path(data_dir) / "en-prose-bpe8192"))
    if report and report_data is None and _prepared(rdata, data_dir) is None:
        # The default report corpus is not here: the quantized model is written, so say how to get
        # the report instead of failing after the work is done.
        print(f"no quantization report: {rdata} is not a prepared corpus (run `moekit data prepare en-prose "
              f"--data-dir {data_dir}`, then `moekit quant-report {model} {out} --data {rdata}`)", file=sys.stderr)
        report = False
    if report:
        r = run_report(model, out, data=rdata, max_tokens=report_tokens, seq_len=seq_len, quant_model=q)
        print(Path(out) / f"{REPORT_STEM}.md")
        print(json.dumps({k: r["main"].get(k) for k in ("bpb_orig", "bpb_quant", "bpb_delta_pct", "kl",
                                                        "same_top_token", "agreement_exact_mean")}, indent=2))
    return 0


def quant_report_cli(orig: str, quant: str, data: str = "data/en-prose-bpe8192", out: str | None = None,
                     split: str = "val", max_tokens: int = 16384, seq_len: int = 256, decode_tokens: int = 32,
                     threads: int | None = None) -> int:
    """Compare a quantized model with its original: routing, KL, same top token, bits per byte.

    Per MoE layer: top-k routing agreement (exact set, and at least one expert shared), per-expert
    weight error and calibration coverage; overall: KL(orig || quant) of next-token distributions,
    same-top-token rate, bits per byte on the split and its delta, file sizes, batch-1 decode
    tokens/s. With recalibrated routers, also the same quantized weights with the original routers.
    Writes quant_report.json, .md and .png to --out (default: QUANT).

    Args:
        orig: the original model directory.
        quant: the quantized model directory (from `moekit quantize`).
        data: a prepared corpus directory (`moekit data prepare`).
        out: output directory for the report (default: QUANT).
        split: the corpus split to evaluate on.
        max_tokens: evaluate on the first N tokens of the split.
        seq_len: evaluation window length.
        decode_tokens: tokens of the decode-speed probe (0: skip).
        threads: torch threads (default: torch's choice).
    """
    if threads:
        torch.set_num_threads(threads)
    r = run_report(orig, quant, out, data=data, split=split, max_tokens=max_tokens, seq_len=seq_len,
                   decode_tokens=decode_tokens)
    print(Path(out or quant) / f"{REPORT_STEM}.md")
    print(json.dumps({k: r["main"].get(k) for k in ("bpb_orig", "bpb_quant", "bpb_delta_pct", "kl",
                                                    "same_top_token", "agreement_exact_mean")}, indent=2))
    return 0
