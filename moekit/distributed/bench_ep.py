"""`moekit bench MODEL --ep N` under torchrun: the EP engine's prefill/decode tokens/s and the share
of each step spent in the all-to-all, next to one process on the same weights.

Shape legend: B batch rows, P prompt tokens, N decode steps.

Plan (every rank runs this; rank 0 alone prints and writes):
1. load the weights once per rank (same seed everywhere), keep a full copy on rank 0 for the
   one-process baseline, shard the experts (`moekit.distributed.infer`);
2. measure the machine's read bandwidth and matmul peak on rank 0 (the others wait at a barrier);
3. per round and shape, the engines in a rotating order: "moekit-epN" on every rank, "moekit"
   (one process) on rank 0 while the others wait; each with the runner protocol of `moekit bench`
   (warm-up, B random prompts of P tokens, prefill, N greedy steps timed one by one);
4. for the EP engine, per step: seconds inside the all-to-alls (dispatch, combine and the count
   exchange; waiting for the slowest peer included), the all_gather of MoE outputs and the token
   broadcast, from timers around each collective; shares are of the step's wall time on each rank,
   gathered to rank 0;
5. results.json / results.md / throughput.png in `moekit bench`'s format, plus an "ep" section.
Both engines run in the same processes, so their peak RSS is not separable (reported once, per rank).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moekit.errors import MoekitError


def _run_engine(engine, vocab: int, batch: int, prompt: int, new_tokens: int, seed: int) -> dict:
    from moekit.bench.runners import _prompts, _result
    from moekit.inference import SamplingParams

    ids = _prompts(vocab, batch, prompt, seed).tolist()
    engine.generate(ids, SamplingParams(max_new_tokens=new_tokens + 1), time_steps=True)
    r = _result(batch, prompt, engine.stats.prefill_s, engine.stats.step_s)
    steps = getattr(engine, "comm_steps", None)
    if steps:  # EP engine: [prefill, step 1, ...]; step_s[i] is the wall time of decode step i + 1
        dec, step_s = steps[1:len(engine.stats.step_s) + 1], engine.stats.step_s
        a2a = [c["a2a_s"] for c in dec]
        other = [c["gather_s"] + c["bcast_s"] for c in dec]
        r.update({"a2a_ms_per_step": 1e3 * statistics.median(a2a),
                  "a2a_share_decode": sum(a2a) / sum(step_s),
                  "gather_bcast_share_decode": sum(other) / sum(step_s),
                  "a2a_share_prefill": steps[0]["a2a_s"] / engine.stats.prefill_s,
                  "a2a_bytes_per_step": statistics.median(c["a2a_bytes"] for c in dec)})
    return r


def _gather_shares(r: dict) -> dict:
    """Every rank's a2a shares, on rank 0 (collective)."""
    mine = torch.tensor([r["a2a_share_decode"], r["a2a_share_prefill"]], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    r["a2a_share_decode_per_rank"] = [round(float(p[0]), 4) for p in parts]
    r["a2a_share_prefill_per_rank"] = [round(float(p[1]), 4) for p in parts]
    return r


def ep_markdown(data: dict) -> str:
    from moekit.bench import report

    ep = data["ep"]["degree"]
    forced = data["ep"].get("expert_backend_forced")
    lines = [report.markdown(data).rstrip("\n"), "", f"## Expert parallel (EP={ep}, torchrun, {data['ep']['backend']})", "",
             data["ep"]["note"] + (f" Expert backend forced for both engines: MOEKIT_EXPERT_BACKEND={forced}."
                                   if forced else " The EP engine runs the generic `torch` expert backend (the fused "
                                   "CPU kernels need every expert local); the one-process engine chooses as usual."),
             "",
             "| batch | prompt | decode tok/s EP / 1 process | prefill tok/s EP / 1 process | all-to-all ms/step "
             "| all-to-all share of decode (per rank) | all_gather + broadcast share | all-to-all share of prefill "
             "| all-to-all bytes/step (rank 0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        if r["engine"] != data["ep"]["engine"]:
            continue
        base = next((b for b in data["results"] if b["engine"] == "moekit" and b["batch"] == r["batch"]
                     and b["prompt"] == r["prompt"]), None)
        dec = f"{r['decode_tok_s']:,.1f} / {base['decode_tok_s']:,.1f}" if base else f"{r['decode_tok_s']:,.1f} / -"
        pre = f"{r['prefill_tok_s']:,.0f} / {base['prefill_tok_s']:,.0f}" if base else f"{r['prefill_tok_s']:,.0f} / -"
        per = ", ".join(f"{100 * s:.0f}%" for s in r["a2a_share_decode_per_rank"])
        lines.append(f"| {r['batch']} | {r['prompt']} | {dec} | {pre} | {r['a2a_ms_per_step']:.2f} | {per} | "
                     f"{100 * r['gather_bcast_share_decode']:.0f}% | {100 * r['a2a_share_prefill']:.0f}% | "
                     f"{r['a2a_bytes_per_step']:,.0f} |")
    return "\n".join(lines) + "\n"


def bench_ep(model: str, ep: int, batch_sizes: list[int], prompt_lens: list[int], new_tokens: int,
             engines: list[str] | None, dtype: str, threads: int, out: Path, quick: bool, seed: int,
             rounds: int, precision: str, command: str) -> int:
    """`moekit bench --ep N` (see the module docstring); every rank calls it."""
    from moekit.bench.roofline import measure_machine
    from moekit.bench.runners import _peak_rss
    from moekit.distributed.infer import EPEngine, setup_inference, shard_for_inference
    from moekit.inference import Engine
    from moekit.inference.cli import load_for_inference

    name = f"moekit-ep{ep}"
    engines = engines or [name, "moekit"]
    bad = [e for e in engines if e not in (name, "moekit")]
    if bad:
        raise MoekitError(f"--engines {' '.join(bad)}: with --ep {ep} the engines are {name} and moekit "
                          "(one process, on rank 0); run the other engines without --ep")
    joined = not dist.is_initialized()
    rank, world = setup_inference(ep, "bench")
    try:
        torch.set_num_threads(threads)
        lead = rank == 0
        # 1. weights (same seed on every rank), the one-process copy on rank 0 only.
        t0 = time.perf_counter()
        m = load_for_inference(model, dtype, seed, storage_only=True)
        cfg = m.config
        if cfg.moe is None:
            raise MoekitError(f"{model} has no MoE layers: --ep shards experts; run it without --ep")
        if max(prompt_lens) + new_tokens + 1 > cfg.max_seq_len:
            raise MoekitError(f"prompt {max(prompt_lens)} + {new_tokens} new tokens exceeds the model's context "
                              f"limit {cfg.max_seq_len}; lower --prompt-lens or --new-tokens")
        m_ep, full = shard_for_inference(m, ep, keep_full=lead and "moekit" in engines)
        eng = {name: EPEngine(m_ep, max_batch_size=max(batch_sizes), precision=precision)}
        if full is not None:
            eng["moekit"] = Engine(full, max_batch_size=max(batch_sizes), precision=precision)
        load_s = time.perf_counter() - t0
        vocab = cfg.vocab_size

        def run(e: str, b: int, p: int, n: int, s: int) -> dict | None:
            """Engine e on (b, p); the one-process engine on rank 0 while the others wait."""
            if e == "moekit":
                r = _run_engine(eng[e], vocab, b, p, n, s) if lead else None
                dist.barrier()
                return r
            return _gather_shares(_run_engine(eng[e], vocab, b, p, n, s))

        # 2. the machine, 3. the interleaved sweep.
        machines, results = [], []
        shapes = [(b, p) for p in prompt_lens for b in batch_sizes]
        for e in engines:  # first-call allocations and lazy init out of the timings
            run(e, 1, 16, 2, 0)
        for rnd in range(rounds):
            if lead:
                machines.append(measure_machine({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype], quick))
            dist.barrier()
            for i, (b, p) in enumerate(shapes):
                k = (i + rnd) % len(engines)
                for e in engines[k:] + engines[:k]:
                    run(e, b, min(16, p), 2, 1)  # warm this batch shape
                    r = run(e, b, p, new_tokens, seed)
                    if lead:
                        r["engine"] = e
                        results.append(r)
                        print(f"  {e} batch {b} prompt {p}: prefill {r['prefill_tok_s']:,.0f} tok/s, decode "
                              f"{r['decode_tok_s']:,.1f} tok/s" + (f", all-to-all {100 * r['a2a_share_decode']:.0f}% "
                                                                   "of decode" if e == name else ""), flush=True)
        rss = torch.tensor([float(_peak_rss())])
        rss_all = [torch.empty_like(rss) for _ in range(world)]
        dist.all_gather(rss_all, rss)
        if lead:
            _write(Path(out), model, command, engines, name, results, machines, cfg, load_s,
                   [int(x) for x in torch.cat(rss_all).tolist()], {e: eng[e].precision for e in eng})
        dist.barrier()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _write(out: Path, model: str, command: str, engines: list[str], name: str, results: list[dict], machines: list,
           cfg, load_s: float, rss: list[int], compute: dict) -> None:
    """Rank 0: medians over rounds, roofline fractions, results.json/md and the plot."""
    from moekit.bench import report
    from moekit.bench.cli import _machine_desc as machine_desc
    from moekit.bench.cli import _median_over_rounds as median_over_rounds
    from moekit.bench.roofline import Machine
    from moekit.checkpoint.native import atomic_write_text
    from moekit.model.params import dense_equivalent

    ep, rounds = dist.get_world_size(), len(machines)
    out.mkdir(parents=True, exist_ok=True)
    res = median_over_rounds(results)
    for r in res:  # the EP columns are medians over rounds too
        rs = [x for x in results if x["engine"] == r["engine"] and x["batch"] == r["batch"] and x["prompt"] == r["prompt"]]
        for k in ("a2a_ms_per_step", "a2a_share_decode", "gather_bcast_share_decode", "a2a_share_prefill",
                  "a2a_bytes_per_step"):
            if k in r:
                r[k] = statistics.median(x[k] for x in rs)
        for k in ("a2a_share_decode_per_rank", "a2a_share_prefill_per_rank"):
            if k in r:
                r[k] = [statistics.median(x[k][i] for x in rs) for i in range(len(r[k]))]
    res.sort(key=lambda r: (engines.index(r["engine"]), r["prompt"], r["batch"]))
    machine = Machine(**{**machines[0].to_dict(), "read_gbs": statistics.median(m.read_gbs for m in machines),
                         "matmul_gflops": None if any(m.matmul_gflops is None for m in machines)
                         else statistics.median(m.matmul_gflops for m in machines)})
    status = f"ok (EP={ep}: the two engines share each process, so RSS is per rank, not per engine)"
    data = {"model": model, "command": command, "machine_desc": machine_desc(),
            "engines": [{"engine": e, "status": status, "peak_rss_bytes": rss[0], "load_s": load_s,
                         "compute": compute.get(e)} for e in engines],
            "results": res, "machine": machine.to_dict(), "machine_rounds": [m.to_dict() for m in machines],
            "rounds": rounds,
            "ep": {"degree": ep, "engine": name, "backend": dist.get_backend(), "peak_rss_bytes_per_rank": rss,
                   "expert_backend_forced": os.environ.get("MOEKIT_EXPERT_BACKEND") or None,
                   "note": (f"{ep} processes, each with the whole model but 1/{ep} of the experts, run the same "
                            "batch; each MoE layer dispatches each rank's share of the tokens with "
                            "all_to_all_single and all-gathers the outputs (moekit/distributed/infer.py). "
                            "Shares are of each rank's step wall time, waiting for the slowest peer included. "
                            "On one small host the processes share its cores, so EP is expected to be slower "
                            "than one process: this measures the overhead, not a speed-up.")}}
    report.add_bounds(data["results"], {"moe": cfg, "dense": dense_equivalent(cfg)}, machine, machines)
    data["ratios"] = report.ratios(data["results"])
    data["crossover"] = report.crossover(data["results"])
    md = ep_markdown(data)
    atomic_write_text(out / "results.json", json.dumps(data, indent=2, default=str))
    atomic_write_text(out / "results.md", md)
    if data["results"]:
        report.plot(data, out / "throughput.png")
    print(md)
    print(f"wrote {out}/results.json, results.md, throughput.png")
