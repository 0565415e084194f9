"""`moekit serve` against llama.cpp's `llama-server` on the same GGUF file, same machine, one run.

Both servers get the same slots (`--max-num-seqs` / `-np`), threads and context per slot, and the
same load: `moekit bench serve` with random token-id prompts (the exported GGUF carries a placeholder
vocabulary), streamed, `ignore_eos`, at each concurrency. The engines alternate round by round
(moekit first in even rounds, llama-server first in odd ones) so drift on the machine hits both;
the ratios are paired within a round.

    bash benchmarks/build_llama_server.sh            # builds llama-server from the llama-cpp-python sdist
    python benchmarks/serve_vs_llama_server.py --llama-server /path/to/llama-server \
        --preset tiny-mixtral --dtype bfloat16 --concurrency 4 16 --rounds 2 \
        --out benchmarks/results/serve_vs_llama_server

Plan: 1. export the preset (random weights, fixed seed) to GGUF, or take --gguf; 2. per round and
engine: start the server, wait for /health, run the load at every concurrency, stop the server;
3. medians over rounds and paired ratios to JSON and markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write_text  # noqa: E402
from moekit.serve.testing import server_process  # noqa: E402

METRICS = (("request_throughput", "req/s", True), ("output_throughput", "output tok/s", True),
           ("ttft_p50", "TTFT p50 ms", False), ("ttft_p90", "TTFT p90 ms", False),
           ("tpot_p50", "TPOT p50 ms", False))


def export(preset: str, dtype: str, seed: int, work: Path) -> Path:
    import torch

    import moekit
    from moekit.checkpoint.gguf_export import export_gguf

    m = moekit.build_model(moekit.get_preset(preset), seed=seed).to(getattr(torch, dtype)).eval()
    return export_gguf(m, work / f"{preset}-{dtype}.gguf")


def server_cmd(engine: str, a, gguf: Path, port: int) -> list[str]:
    if engine == "moekit":
        return [sys.executable, "-m", "moekit", "serve", str(gguf), "--port", str(port),
                "--threads", str(a.moekit_threads or a.threads),
                "--max-num-seqs", str(a.slots), "--max-model-len", str(a.ctx), "--served-model-name", "m",
                "--max-num-batched-tokens", str(a.batched_tokens), "--log-level", "warning"]
    return [a.llama_server, "-m", str(gguf), "--port", str(port), "-t", str(a.threads), "-tb", str(a.threads),
            "-np", str(a.slots), "-c", str(a.slots * a.ctx), "-b", str(a.batched_tokens), "-cb", "--no-webui",
            "-a", "m", "--log-disable"]


def summary(path: Path) -> dict:
    s = json.loads((path / "results.json").read_text())["summary"]
    return {"request_throughput": s["request_throughput"], "output_throughput": s["output_throughput"],
            "ttft_p50": s["ttft_ms"]["p50"], "ttft_p90": s["ttft_ms"]["p90"], "tpot_p50": s["tpot_ms"]["p50"],
            "completed": s["completed"], "failed": s["failed"], "errors": s["errors"]}


def markdown(res: dict) -> str:
    a = res["args"]
    rows = [f"# moekit serve vs llama-server, same GGUF ({res['model']})", "",
            f"Machine: {res['machine']}. {a['rounds']} rounds, engines alternating; {a['slots']} slots, "
            f"{a['threads']} threads (moekit {a.get('moekit_threads') or a['threads']}), {a['input_words']} prompt tokens (random ids), {a['max_tokens']} output tokens, "
            f"{a['prompts_per_client']} requests per client. Values: median over rounds (min-max); "
            "ratio = moekit / llama-server paired within a round (for latencies llama-server / moekit, so > 1 "
            "means moekit is better).", "",
            "| clients | metric | moekit | llama-server | ratio (moekit better if > 1) |", "|---|---|---|---|---|"]
    for c, d in res["by_concurrency"].items():
        for key, label, _ in METRICS:
            m, l, r = d["moekit"][key], d["llama-server"][key], d["ratio"][key]
            rows.append(f"| {c} | {label} | {m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f}) | "
                        f"{l['median']:.2f} ({l['min']:.2f}-{l['max']:.2f}) | "
                        f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |")
    rows += ["", f"Failed requests: moekit {res['failed']['moekit']}, llama-server {res['failed']['llama-server']}.", ""]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", required=True, help="path to the llama-server binary")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: export --preset)")
    ap.add_argument("--preset", default="tiny-mixtral")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--prompts-per-client", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--moekit-threads", type=int, default=0,
                    help="moekit's compute threads when they should differ from --threads (its own default keeps a "
                         "core for the HTTP loop)")
    ap.add_argument("--ctx", type=int, default=512, help="context per slot (tokens)")
    ap.add_argument("--batched-tokens", type=int, default=512, help="tokens per scheduler step / llama.cpp -b")
    ap.add_argument("--input-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--out", default="benchmarks/results/serve_vs_llama_server")
    a = ap.parse_args()
    if not (shutil.which(a.llama_server) or Path(a.llama_server).is_file()):
        raise SystemExit(f"--llama-server {a.llama_server}: not found; build it with benchmarks/build_llama_server.sh")
    from moekit.train.pairs import machine

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-vs-llama-"))
    try:
        gguf = Path(a.gguf) if a.gguf else export(a.preset, a.dtype, a.seed, work)
        url = f"http://127.0.0.1:{a.port}"
        raw: dict = {}
        for r in range(a.rounds):
            for engine in (("moekit", "llama-server") if r % 2 == 0 else ("llama-server", "moekit")):
                with server_process(server_cmd(engine, a, gguf, a.port), url, work / f"server-{engine}-r{r}.log"):
                    for c in a.concurrency:
                        d = work / f"r{r}-{engine}-c{c}"
                        cmd = [sys.executable, "-m", "moekit", "bench", "serve", url, "--model", "m", "--token-ids",
                               "--input-words", str(a.input_words), "--max-tokens", str(a.max_tokens),
                               "--num-prompts", str(c * a.prompts_per_client), "--max-concurrency", str(c),
                               "--warmup", "2", "--seed", str(a.seed + r), "--out", str(d)]
                        print(f"round {r} {engine} c={c}", flush=True)
                        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
                        raw.setdefault(str(c), {}).setdefault(engine, []).append(summary(d))
        by_c = {}
        for c, d in raw.items():
            agg = {}
            for engine, runs in d.items():
                agg[engine] = {k: {"median": statistics.median(x[k] for x in runs), "min": min(x[k] for x in runs),
                                   "max": max(x[k] for x in runs), "runs": [x[k] for x in runs]} for k, *_ in METRICS}
            ratios = {}
            for k, _, higher in METRICS:
                rs = [(m[k] / l[k]) if higher else (l[k] / m[k]) for m, l in zip(d["moekit"], d["llama-server"])]
                ratios[k] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "runs": rs}
            agg["ratio"] = ratios
            by_c[c] = agg
        res = {"machine": machine(), "model": str(a.gguf or f"{a.preset} {a.dtype}, random weights seed {a.seed}"),
               "args": vars(a), "by_concurrency": by_c, "raw": raw,
               "failed": {e: sum(x["failed"] for d in raw.values() for x in d[e]) for e in ("moekit", "llama-server")}}
        atomic_write_text(out / "results.json", json.dumps(res, indent=2))
        md = markdown(res)
        atomic_write_text(out / "results.md", md)
        print(md)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
