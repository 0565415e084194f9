"""`moekit generate`: stream one prompt to the terminal, or run a JSONL file of prompts in batches.

The tokenizer lives at this edge only: a model directory's `tokenizer.json` (Hugging Face
`tokenizers`) when present, plain space-separated token ids otherwise.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Literal

import torch

from moekit.errors import MoekitError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _results_jsonl(results, tok) -> str:
    """One JSON line per generation (prompt and token ids, finish reason, text when a tokenizer exists)."""
    lines = []
    for g in results:
        row = {"prompt_ids": g.prompt, "token_ids": g.tokens, "finish_reason": g.finish_reason}
        if tok is not None:
            row["text"] = tok.decode(g.tokens)
        lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def load_for_inference(model: str, dtype: str = "auto", seed: int = 0, storage_only: bool = False):
    """A model directory / .gguf file, or a preset name (random init from `seed`), in eval mode.
    `storage_only`: just cast the weights to `dtype` (e.g. to export them for other engines), without
    the compute-dtype policy."""
    import moekit

    from moekit.precision import apply_inference_policy

    p = Path(model)
    if p.exists():
        m = moekit.load_model(p)
    else:
        cfg = moekit.resolve_config(model)  # raises ConfigError listing the presets
        m = moekit.build_model(cfg, seed=seed)
    # auto: as stored where the CPU computes that dtype natively; bf16/fp16 weights on a CPU without
    # native bf16 compute in fp32 (moekit.precision.apply_inference_policy). Explicit: as given.
    if storage_only:
        return (m if dtype == "auto" else m.to(DTYPES[dtype])).eval()
    apply_inference_policy(m, dtype)
    return m.eval()


def load_tokenizer(model: str):
    """`tokenizers.Tokenizer` from `MODEL/tokenizer.json` (or a .gguf file's embedded vocab), or None
    (prompts are token ids)."""
    if str(model).endswith(".gguf") and Path(model).is_file():
        from moekit.checkpoint.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(model)
    f = Path(model) / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f))


def encode(text: str, tok) -> list[int]:
    if tok is not None:
        return tok.encode(text).ids
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MoekitError(f"prompt {text[:40]!r} is not a list of token ids and the model has no tokenizer.json; "
                          "pass ids like --prompt '1 2 3' or use a model directory with a tokenizer") from None


def _read_prompts(path: Path, tok) -> list[list[int]]:
    if not path.is_file():
        raise MoekitError(f"{path}: prompts file not found")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MoekitError(f"{path}:{n}: not valid JSON ({e})") from None
        if isinstance(row, dict) and "prompt_ids" in row:
            prompts.append([int(t) for t in row["prompt_ids"]])
        elif isinstance(row, dict) and "prompt" in row:
            prompts.append(encode(str(row["prompt"]), tok))
        else:
            raise MoekitError(f'{path}:{n}: each line needs {{"prompt": "text"}} or {{"prompt_ids": [ids]}}')
    return prompts


def generate_cli(model: str, prompt: str | None = None, prompts_file: Path | None = None,
                 output: Path | None = None, batch_size: int = 8, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int = 0, stop: list[int] | None = None,
                 dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", threads: int = 0,
                 pack_experts: bool = False, skip_beta: float = 0.0, skip_alpha: float = 0.0,
                 expert_memory_budget: str | None = None, cache_policy: Literal["lru", "lfu"] = "lru",
                 prefetch: bool = True, cost_lambda: float | None = None, cost_budget: float | None = None,
                 dynamic_k: float | None = None, cost_source: str | None = None,
                 route_top_k: int | None = None, ep: int = 1) -> int:
    """Generate text (or token ids) from a model directory, .gguf file or preset.

    One --prompt streams its continuation to the terminal as it is produced; --prompts-file runs a
    JSONL file ({"prompt": "text"} or {"prompt_ids": [...]} per line) in batches and writes one
    JSON line per prompt to --output (or stdout). Without a tokenizer.json, prompts are token ids.

    Args:
        model: model directory, .gguf file, or preset name (random weights from --seed).
        prompt: prompt text (or space-separated token ids).
        prompts_file: JSONL file of prompts.
        output: JSONL output file for --prompts-file (default: stdout).
        batch_size: prompts per batch.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 = greedy.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus sampling mass (1.0 = off).
        repetition_penalty: >1 discourages repeats (1.0 = off).
        seed: sampling seed (and the weights' seed for a preset).
        stop: token ids that end a sequence.
        dtype: weights and compute dtype. auto = as stored (float32 for presets), except that bf16/fp16
            weights are widened to float32 on CPUs without native bf16 (see `moekit doctor`).
        threads: torch CPU threads (0 = torch's default).
        pack_experts: pack the expert weights for the CPU outer-product kernel (faster prefill and
            batches; the expert weights take twice the memory).
        skip_beta: NAEE skipping: drop an expert whose weight is below beta x the token's top weight (0 = off).
        skip_alpha: PESF skipping, prefill only: skip experts picked fewer than alpha x the uniform
            share within the sequence (0 = off).
        expert_memory_budget: offload experts (model directory only): bytes (512M, 2G) or a fraction
            of the expert weights (0.4) kept resident; the rest are read from the safetensors file.
        cache_policy: eviction of the offloaded-expert cache.
        prefetch: prefetch the next layer's likely experts on a background thread (with offloading).
        cost_lambda: cost-aware routing: choose experts by score - lambda * normalised cost (docs/routing.md).
        cost_budget: per-token expert-cost budget in normalised units (1.0 = the costliest expert).
        dynamic_k: dynamic-k: run experts in score order until their probability reaches this (top-p).
        cost_source: expert costs: flops (default), offload_misses (with --expert-memory-budget: 1 for
            experts not in the cache), or one number per expert separated by commas.
        route_top_k: run up to this many experts per token instead of the model's top_k.
        ep: expert parallelism over this many processes: launch with `torchrun --nproc-per-node N -m
            moekit generate ... --ep N`; each rank keeps 1/N of the experts, rank 0 prints
            (docs/distributed.md).
    """
    from moekit.checkpoint.native import atomic_write_text
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams

    if (prompt is None) == (prompts_file is None):
        raise MoekitError("give exactly one of --prompt or --prompts-file")
    if batch_size < 1:
        raise MoekitError(f"--batch-size must be >= 1 (got {batch_size})")
    if threads:
        torch.set_num_threads(threads)
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise MoekitError(f"{prompts_file}: prompts file not found")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed, stop_token_ids=list(stop or []))
    params.validate()
    ep_run = _ep_setup(ep, expert_memory_budget=expert_memory_budget, pack_experts=pack_experts,
                       skip_beta=skip_beta, skip_alpha=skip_alpha, cost_lambda=cost_lambda,
                       cost_budget=cost_budget, dynamic_k=dynamic_k, route_top_k=route_top_k)
    if ep_run is not None:
        return _generate_ep(ep_run, model, prompt, prompts_file, output, batch_size, params, dtype, seed)
    if expert_memory_budget is not None:
        from moekit.memory.offload import load_offloaded
        from moekit.precision import apply_inference_policy

        if not Path(model).is_dir():
            raise MoekitError(f"--expert-memory-budget needs a moekit model directory, got {model!r}")
        m = load_offloaded(model, expert_memory_budget, cache_policy, prefetch)
        apply_inference_policy(m, dtype)
    else:
        m = load_for_inference(model, dtype, seed)
    from moekit.moe.cost import FlopsMeter, apply_cli

    routed = apply_cli(m, cost_lambda, cost_budget, dynamic_k, cost_source, route_top_k)
    meter = FlopsMeter(m) if (routed or skip_beta or skip_alpha) and m.moe_layers() else None
    # tokenizer.json beside the weights, else one the loader attached (e.g. embedded in a GGUF).
    tok = load_tokenizer(model) or getattr(m, "tokenizer", None)
    prompts = [encode(prompt, tok)] if prompt is not None else _read_prompts(Path(prompts_file), tok)
    engine = Engine(m, max_batch_size=batch_size, pack_experts=pack_experts, skip_beta=skip_beta,
                    skip_alpha=skip_alpha, precision=dtype)
    if pack_experts and not engine.packed_bytes:
        log.warning("--pack-experts: nothing packed (needs bf16 or fp32 MoE weights on a CPU with the moekit kernels)")

    if prompt is not None:
        streamed: list[int] = []
        printed = [""]

        def on_token(row: int, t: int) -> None:
            streamed.append(t)
            if tok is None:
                sys.stdout.write(f"{t} ")
            else:  # decode the whole tail so multi-token characters print once complete
                text = tok.decode(streamed)
                sys.stdout.write(text[len(printed[0]):])
                printed[0] = text
            sys.stdout.flush()

        engine.generate(prompts, params, on_token=on_token)
        sys.stdout.write("\n")
        s = engine.stats
        print(f"[{s.generated_tokens} tokens; prefill {s.prefill_s * 1e3:.0f} ms, "
              f"decode {s.generated_tokens / max(s.decode_s, 1e-9):.1f} tok/s]", file=sys.stderr)
        _memory_report(m, s.generated_tokens, meter)
        return 0

    results = engine.generate(prompts, params)
    text = _results_jsonl(results, tok)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(Path(output), text)
        s = engine.stats
        print(f"wrote {len(results)} results to {output} ({s.generated_tokens} tokens, "
              f"{s.generated_tokens / max(s.prefill_s + s.decode_s, 1e-9):.1f} tok/s)", file=sys.stderr)
    _memory_report(m, engine.stats.generated_tokens, meter)
    return 0


def _ep_setup(ep: int, **excluded) -> tuple[int, int, bool] | None:
    """None for a one-process run; (rank, world, joined here) under torchrun with --ep N."""
    import os

    if ep == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None
    on = [k for k, v in excluded.items() if v not in (None, False, 0, 0.0)]
    if on:
        raise MoekitError(f"--{on[0].replace('_', '-')} does not work with --ep yet (it needs every expert in "
                          "the process); drop one of them")
    import torch.distributed as dist

    from moekit.distributed.infer import setup_inference

    joined = not dist.is_initialized()
    rank, world = setup_inference(ep, "generate")
    return rank, world, joined


def _generate_ep(ep_run, model, prompt, prompts_file, output, batch_size, params, dtype, seed) -> int:
    """`generate --ep N` on every rank: same prompts and seed everywhere, rank 0 alone prints."""
    import torch.distributed as dist

    from moekit.checkpoint.native import atomic_write_text
    from moekit.distributed.infer import EPEngine, shard_for_inference

    rank, world, joined = ep_run
    try:
        m = load_for_inference(model, dtype, seed)
        tok = load_tokenizer(model) or getattr(m, "tokenizer", None)
        prompts = [encode(prompt, tok)] if prompt is not None else _read_prompts(Path(prompts_file), tok)
        m, _ = shard_for_inference(m, world)
        engine = EPEngine(m, max_batch_size=batch_size, precision=dtype)
        lead = rank == 0
        streamed: list[int] = []
        printed = [""]

        def on_token(row: int, t: int) -> None:
            if not lead or prompt is None:
                return
            streamed.append(t)
            if tok is None:
                sys.stdout.write(f"{t} ")
            else:
                text = tok.decode(streamed)
                sys.stdout.write(text[len(printed[0]):])
                printed[0] = text
            sys.stdout.flush()

        results = engine.generate(prompts, params, on_token=on_token)
        s = engine.stats
        comm = sum(c["a2a_s"] for c in engine.comm_steps)
        total = s.prefill_s + s.decode_s
        if lead and prompt is not None:
            sys.stdout.write("\n")
            print(f"[{s.generated_tokens} tokens; prefill {s.prefill_s * 1e3:.0f} ms, decode "
                  f"{s.generated_tokens / max(s.decode_s, 1e-9):.1f} tok/s; EP={world}, all-to-all "
                  f"{100 * comm / max(total, 1e-9):.0f}% of the time on rank 0]", file=sys.stderr)
        elif lead:
            text = _results_jsonl(results, tok)
            if output is None:
                sys.stdout.write(text)
            else:
                atomic_write_text(Path(output), text)
                print(f"wrote {len(results)} results to {output} ({s.generated_tokens} tokens, "
                      f"{s.generated_tokens / max(total, 1e-9):.1f} tok/s; EP={world}, all-to-all "
                      f"{100 * comm / max(total, 1e-9):.0f}% of the time on rank 0)", file=sys.stderr)
        dist.barrier()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _memory_report(m, tokens: int, meter=None) -> None:
    """Skipping, cost-routing and offloading telemetry on stderr (nothing when none is on)."""
    if meter is not None:
        print(f"[expert FLOPs: {json.dumps(meter.stats())}]", file=sys.stderr)
        meter.close()
    if any(getattr(layer, "skip", None) is not None for layer in m.moe_layers()):
        from moekit.memory.skip import skip_stats

        print(f"[skipping: {json.dumps(skip_stats(m))}]", file=sys.stderr)
    if getattr(m, "_offload_caches", None):
        from moekit.memory.offload import close_offload, offload_telemetry

        t = offload_telemetry(m)
        t["stall_ms_per_token"] = 1e3 * t["stall_s"] / max(tokens, 1)
        print(f"[offload: {json.dumps(t)}]", file=sys.stderr)
        close_offload(m)
