"""One engine per process: moekit, its dense equivalent, transformers, llama.cpp (llama-cpp-python).

Shape legend: B batch rows, P prompt tokens, N decode steps, V vocabulary.

Each runner gets the same protocol: B random prompts of P tokens, one prefill (time to first
token = prefill + first sample), then N greedy decode steps timed one by one. Run as
`python -m moekit.bench.runners SPEC.json OUT.json` so that each engine's peak RSS is its own
and a crash (llama.cpp) cannot take the benchmark down.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from moekit.precision import apply_inference_policy


def _prompts(vocab: int, batch: int, prompt: int, seed: int) -> torch.Tensor:
    # Ids from the top of the vocab down avoid the placeholder control ids of a GGUF vocab.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3 + 256, vocab, (batch, prompt), generator=g) if vocab > 1000 else \
        torch.randint(0, vocab, (batch, prompt), generator=g)


P99_MIN_STEPS = 100
"""Fewer timed steps than this and the 99th percentile is just the maximum: report it as max only."""


def _result(batch: int, prompt: int, ttft_s: float, steps_s: list[float]) -> dict:
    steps_ms = sorted(s * 1e3 for s in steps_s)
    p99 = steps_ms[min(len(steps_ms) - 1, round(0.99 * (len(steps_ms) - 1)))] \
        if len(steps_ms) >= P99_MIN_STEPS else None
    return {"batch": batch, "prompt": prompt, "new_tokens": len(steps_s) + 1,
            "prefill_tok_s": batch * prompt / ttft_s, "ttft_ms": ttft_s * 1e3,
            "decode_tok_s": batch * len(steps_s) / sum(steps_s),
            "p50_ms": statistics.median(steps_ms), "p99_ms": p99, "max_ms": steps_ms[-1]}


# ----------------------------------------------------------------------------------- moekit
def run_moekit(model, batch: int, prompt: int, new_tokens: int, seed: int, precision: str = "auto") -> dict:
    from moekit.inference import Engine, SamplingParams

    eng = Engine(model, max_batch_size=batch, precision=precision)
    ids = _prompts(model.config.vocab_size, batch, prompt, seed).tolist()
    skipping = any(getattr(layer, "skip", None) is not None for layer in model.moe_layers())
    if skipping:
        from moekit.memory.skip import skip_stats

        before = skip_stats(model)
    eng.generate(ids, SamplingParams(max_new_tokens=new_tokens + 1), time_steps=True)
    res = _result(batch, prompt, eng.stats.prefill_s, eng.stats.step_s)
    if skipping:  # NAEE / PESF: the share of routed-expert FLOPs this run skipped
        after = skip_stats(model)
        d = {k: after[k] - before[k] for k in ("assignments", "skipped", "assignments_prefill", "skipped_prefill")}
        res["skip_flops_saved"] = d["skipped"] / max(d["assignments"], 1)
        res["skip_flops_saved_prefill"] = d["skipped_prefill"] / max(d["assignments_prefill"], 1)
    return res


# ----------------------------------------------------------------------------- transformers
def run_transformers(model, batch: int, prompt: int, new_tokens: int, seed: int) -> dict:
    from transformers import DynamicCache

    ids = _prompts(model.config.vocab_size, batch, prompt, seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True,
                    logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1)
        ttft = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for _ in range(new_tokens):
            t = time.perf_counter()
            out = model(input_ids=tok[:, None], past_key_values=past, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
            past = out.past_key_values
            steps.append(time.perf_counter() - t)
    return _result(batch, prompt, ttft, steps)


# -------------------------------------------------------------------------------- llama.cpp
class LlamaCpp:
    """Minimal multi-sequence greedy driver over llama-cpp-python's low-level C API."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_seq: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        if hasattr(mp, "use_extra_bufts"):
            # The AMX build's weight repacking segfaults on quantized models (llama.cpp #20824).
            mp.use_extra_bufts = False
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 2048, 512
        cp.n_seq_max = n_seq
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(2048, 0, n_seq)

    def close(self) -> None:
        """Free the batch, context and model (C memory the garbage collector does not see)."""
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.L.llama_model_free(self.model)
            self.ctx = self.model = None

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, want_logits); returns greedy next tokens for the wanted ones."""
        import numpy as np

        nxt = []
        for start in range(0, len(items), 2048):
            chunk = items[start:start + 2048]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = seq
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    ptr = self.L.llama_get_logits_ith(self.ctx, i)
                    nxt.append(int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax()))
        return nxt


def run_llamacpp(llm: LlamaCpp, batch: int, prompt: int, new_tokens: int, seed: int) -> dict:
    ids = _prompts(llm.n_vocab, batch, prompt, seed).tolist()
    llm.clear()
    t0 = time.perf_counter()
    items = [(t, p, s, p == prompt - 1) for s in range(batch) for p, t in enumerate(ids[s])]
    toks = llm.decode(items)
    ttft = time.perf_counter() - t0
    steps = []
    for i in range(new_tokens):
        t = time.perf_counter()
        toks = llm.decode([(toks[s], prompt + i, s, True) for s in range(batch)])
        steps.append(time.perf_counter() - t)
    return _result(batch, prompt, ttft, steps)


# ------------------------------------------------------------------------------------ worker
def _load(spec: dict):
    """(run function, handle) for the spec's engine."""
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
    eng = spec["engine"]
    if eng in ("moekit", "moekit-packed", "dense", "moekit-int8", "moekit-int4"):
        import moekit

        if eng == "dense":
            cfg = moekit.dense_equivalent(moekit.resolve_config(spec["path"]))
            model = moekit.build_model(cfg, dtype=dtype, seed=spec["seed"]).eval()
        else:
            model = moekit.load_model(spec["path"], dtype=dtype).eval()
            if eng == "moekit-packed":
                # counted in load_s; its bytes in the peak RSS. Nothing packed (no MoE layer, a dtype or
                # build the packed kernel cannot take) would time plain moekit under this name: fail.
                if moekit.pack_experts(model) == 0:
                    raise RuntimeError("moekit-packed: no expert weights were packed (no MoE layer, or the "
                                       "packed kernel cannot take this model/dtype/build)")
        if eng != "dense" and spec.get("skip"):  # NAEE / PESF expert skipping (moekit.memory.skip)
            from moekit.memory.skip import set_skipping

            set_skipping(model, **spec["skip"])
        if eng != "dense" and spec.get("routing"):  # cost-aware routing options (moekit.moe.cost)
            from moekit.moe.cost import apply_cli

            apply_cli(model, **spec["routing"])
        # The compute-dtype policy (moekit.precision) once, before timing: with "auto", fp32 compute
        # where bf16 is not native (big weights stay bf16 where the kernels widen them).
        prec = spec.get("precision", "auto")
        spec["compute"] = apply_inference_policy(model, prec)
        return functools.partial(run_moekit, precision=prec), model
    if eng == "transformers":
        from transformers import AutoModelForCausalLM

        # transformers in its fastest dtype here: with "auto", fp32 where bf16 is not native (its
        # bf16 matmuls would run 3-100x slower), else the weights' dtype.
        tdt = transformers_dtype(dtype, spec.get("precision", "auto"))
        spec["compute"] = str(tdt).removeprefix("torch.")
        model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=tdt).eval()
        return run_transformers, model
    if eng in ("llama.cpp", "llama.cpp-q8_0", "llama.cpp-q4_0"):
        n_seq = max(spec["batch_sizes"])
        n_ctx = n_seq * (max(spec["prompt_lens"]) + spec["new_tokens"] + 8)
        return run_llamacpp, LlamaCpp(spec["path"], spec["threads"], n_ctx, n_seq)
    raise ValueError(f"unknown engine {eng!r}")


def transformers_dtype(weights: torch.dtype, precision: str) -> torch.dtype:
    """The dtype the transformers engine computes in for this precision setting."""
    from moekit.precision import bf16_native

    if precision == "fp32" or (precision == "auto" and weights != torch.float32 and not bf16_native("cpu")):
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    return weights


def _peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a worker would report its parent's peak (the parent built the weights)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    # The same allocator conditions for every engine: moekit's engine keeps freed memory (glibc
    # settings + caching CPU allocator, moekit.utils.retain_freed_memory); set it here, before any
    # engine loads, so transformers and llama.cpp run under it too (spec "retain": false: none does).
    from moekit.utils import retain_freed_memory

    if not spec.get("retain", True):
        import os

        os.environ["MOEKIT_RETAIN_MEMORY"] = "0"  # moekit's engine would otherwise set it for itself only
    retained = retain_freed_memory(True)
    t0 = time.perf_counter()
    run, handle = _load(spec)
    load_s = time.perf_counter() - t0
    run(handle, 1, 16, 2, 0)  # warm-up: first-call allocations, lazy init, oneDNN primitive cache
    results = []
    for prompt in spec["prompt_lens"]:
        for batch in spec["batch_sizes"]:
            if spec.get("max_prefill_tokens") and batch * prompt > spec["max_prefill_tokens"]:
                continue
            run(handle, batch, min(16, prompt), 2, 1)  # warm this batch shape
            r = run(handle, batch, prompt, spec["new_tokens"], spec["seed"])
            r["engine"] = spec["engine"]
            results.append(r)
            print(json.dumps(r), flush=True)
    rss = _peak_rss()
    Path(out_path).write_text(json.dumps({"engine": spec["engine"], "load_s": load_s, "peak_rss_bytes": rss,
                                          "retained_memory": retained, "compute": spec.get("compute"),
                                          "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
