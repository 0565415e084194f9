"""`moekit serve` under load, on loopback, in one run: throughput with 32 concurrent clients against
sequential serving (rounds interleaved on one server), a bounded load of 32 clients x 20 requests
checked against the server's own /metrics (nothing lost or duplicated), and the prefix cache's cut
of TTFT with a shared ~512-token system prompt (server restarted with the cache on and off, rounds
alternating). Server and load generator share the machine. Writes JSON and markdown.

    python benchmarks/serve_load.py --data-dir data --out benchmarks/results/serve_load

Plan: 1. save the small-moe preset (random weights, 2048 context) with the en-prose tokenizer;
2. one server with the defaults: sequential and 32-client runs, then the bounded load and /metrics;
3. a server per prefix-cache setting and round: shared-prefix TTFT; 4. ratios and tables.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def serve(model: Path, port: int, extra: list[str], log: Path):
    """`moekit serve MODEL` as a subprocess, healthy, stopped with SIGTERM on exit."""
    cmd = [sys.executable, "-m", "moekit", "serve", str(model), "--port", str(port), "--log-level", "warning", *extra]
    return server_process(cmd, f"http://127.0.0.1:{port}", log, timeout=300)


def bench(port: int, work: Path, name: str, data_dir: str, *args: str) -> dict:
    out = work / name
    subprocess.run([sys.executable, "-m", "moekit", "bench", "serve", f"http://127.0.0.1:{port}", "--data-dir",
                    data_dir, "--out", str(out), *args], check=False, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["summary"]


def metrics(port: int) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("moekit:request_success_total", "moekit:generation_tokens_total",
                          "moekit:num_aborted_requests_total", "moekit:num_requests_running",
                          "moekit:num_requests_waiting"):
                key = s.name + ("" if "finished_reason" not in s.labels else f"{{{s.labels['finished_reason']}}}")
                out[key] = out.get(key, 0.0) + s.value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data", help="holds en-prose-bpe8192 (tokenizer) and the en-prose sources")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8941)
    ap.add_argument("--out", default="benchmarks/results/serve_load")
    a = ap.parse_args()
    import moekit
    from moekit.train.pairs import machine

    tok = Path(a.data_dir) / "en-prose-bpe8192" / "tokenizer.json"
    if not tok.is_file():
        raise SystemExit(f"{tok} not found: run `moekit data prepare en-prose --data-dir {a.data_dir}` first")
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    res: dict = {"machine": machine(), "rounds": a.rounds}
    try:
        model = work / "small-moe-2k"
        cfg = dataclasses.replace(moekit.get_preset("small-moe"), max_seq_len=2048)
        moekit.save_model(moekit.build_model(cfg, seed=0), model)
        shutil.copyfile(tok, model / "tokenizer.json")
        common = ["--input-words", "48", "--max-tokens", "32"]
        # 2. defaults: sequential vs 32 clients, interleaved; then the bounded load
        with serve(model, a.port, [], work / "server.log"):
            seq, c32 = [], []
            for r in range(a.rounds):
                seq.append(bench(a.port, work, f"seq{r}", a.data_dir, *common, "--num-prompts", "12",
                                 "--max-concurrency", "1", "--seed", str(r)))
                c32.append(bench(a.port, work, f"c32-{r}", a.data_dir, *common, "--num-prompts", "64",
                                 "--max-concurrency", "32", "--seed", str(r)))
                print(f"round {r}: sequential {seq[-1]['request_throughput']:.2f} req/s, "
                      f"32 clients {c32[-1]['request_throughput']:.2f} req/s", flush=True)
            before = metrics(a.port)
            bounded = bench(a.port, work, "bounded", a.data_dir, "--input-words", "32", "--max-tokens", "16",
                            "--num-prompts", "640", "--max-concurrency", "32", "--warmup", "0",
                            "--goodput", "ttft:5000", "tpot:200")
            after = metrics(a.port)
        ratios = [c["request_throughput"] / s["request_throughput"] for s, c in zip(seq, c32)]
        res["load"] = {"sequential": seq, "c32": c32, "throughput_ratio": ratios}
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        res["bounded"] = {"summary": bounded, "metrics_delta": delta, "metrics_after": after}
        # 3. prefix cache on/off, a fresh server per setting and round
        pref = {"on": [], "off": []}
        for r in range(a.rounds):
            for setting in (("on", "off") if r % 2 == 0 else ("off", "on")):
                with serve(model, a.port, ["--prefix-cache-tokens", "4096" if setting == "on" else "0"],
                           work / f"server-prefix-{setting}.log"):
                    pref[setting].append(bench(a.port, work, f"prefix-{setting}-{r}", a.data_dir,
                                               "--shared-prefix", "400", "--input-words", "16", "--max-tokens", "8",
                                               "--num-prompts", "10", "--max-concurrency", "1"))
            print(f"round {r}: TTFT p50 prefix cache on {pref['on'][-1]['ttft_ms']['p50']:.1f} ms, "
                  f"off {pref['off'][-1]['ttft_ms']['p50']:.1f} ms", flush=True)
        res["prefix"] = {**pref, "ttft_p50_ratio": [off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"]
                                                    for on, off in zip(pref["on"], pref["off"])]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    md = markdown(res)
    atomic_write_text(out / "results.md", md)
    print(md)
    return 0


def markdown(res: dict) -> str:
    L, B, P = res["load"], res["bounded"], res["prefix"]
    med = statistics.median
    rows = [f"# moekit serve under load ({res['machine']})", "",
            "small-moe preset, random weights, 2048 context, en-prose tokenizer; `moekit serve` defaults; "
            f"{res['rounds']} rounds.", "",
            "| run | request throughput (req/s), per round | TTFT p50 (ms) | TPOT p50 (ms) |", "|---|---|---|---|"]
    for name, runs in (("sequential, 1 client", L["sequential"]), ("32 clients", L["c32"])):
        rows.append(f"| {name} | " + " / ".join(f"{r['request_throughput']:.2f}" for r in runs) + " | "
                    + " / ".join(f"{r['ttft_ms']['p50']:.0f}" for r in runs) + " | "
                    + " / ".join(f"{r['tpot_ms']['p50']:.1f}" for r in runs) + " |")
    rows += ["", "Throughput under 32 clients vs sequential, paired per round: "
             + ", ".join(f"{x:.2f}x" for x in L["throughput_ratio"]) + f" (median {med(L['throughput_ratio']):.2f}x).",
             ""]
    s, d = B["summary"], B["metrics_delta"]
    rows += [f"Bounded load, 32 clients x 20 requests (640): {s['completed']} completed, {s['failed']} failed, "
             f"{s['request_throughput']:.2f} req/s, goodput {s['request_goodput']:.2f} req/s; /metrics over the run: "
             f"finished (length) +{d.get('moekit:request_success_total{length}', 0):.0f}, generation tokens "
             f"+{d.get('moekit:generation_tokens_total', 0):.0f} (640 x 16 = 10240), aborts "
             f"+{d.get('moekit:num_aborted_requests_total', 0):.0f}; running "
             f"{B['metrics_after'].get('moekit:num_requests_running', 0):.0f}, waiting "
             f"{B['metrics_after'].get('moekit:num_requests_waiting', 0):.0f} afterwards.", "",
             "Prefix cache, shared 400-word (~510-token) system prompt + 16 own words, 8 output tokens, one "
             "client, 10 requests per run:", "", "| prefix cache | TTFT p50 (ms), per round | TTFT p90 (ms) |",
             "|---|---|---|"]
    for k in ("on", "off"):
        rows.append(f"| {k} | " + " / ".join(f"{r['ttft_ms']['p50']:.1f}" for r in P[k]) + " | "
                    + " / ".join(f"{r['ttft_ms']['p90']:.1f}" for r in P[k]) + " |")
    rows += ["", "TTFT p50 cut by the prefix cache, paired per round: "
             + ", ".join(f"{x:.1f}x" for x in P["ttft_p50_ratio"]) + "."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
