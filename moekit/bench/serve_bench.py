"""`moekit bench serve URL`: a load generator for any OpenAI-compatible server (vLLM's method).

Requests arrive by a Gamma process at `request_rate` (burstiness 1 = Poisson; rate 0 = all at
once), optionally capped at `max_concurrency` in flight. Every request streams, so each one gives
TTFT (send -> first text), ITL (gaps between text chunks), TPOT ((e2e - TTFT) / (tokens - 1)) and
end-to-end latency. Reports p50/p90/p99 of each, request/token throughput, and goodput (requests
per second meeting every SLO given, e.g. `--goodput ttft:500 tpot:100`). Prompts: en-prose
documents (from `moekit data`'s source cache), a text/JSONL file, or token ids when the server
has no tokenizer; `shared_prefix` words prepended to every prompt measure a prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moekit.errors import MoekitError


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


def load_prompts(source: str, n: int, words: int, data_dir: Path, seed: int) -> list[str]:
    """`n` prompts of about `words` words: from a file (one per line, or JSONL {"prompt"}), or
    en-prose documents (Wikipedia leads + State of the Union, via the data source cache)."""
    rng = random.Random(seed)
    p = Path(source)
    if p.is_file():
        texts = []
        for line in p.read_text().splitlines():
            if line.strip():
                try:
                    obj = json.loads(line)
                    texts.append(obj["prompt"] if isinstance(obj, dict) else str(obj))
                except (json.JSONDecodeError, KeyError, TypeError):
                    texts.append(line)
    elif source == "en-prose":
        from moekit.data.corpora import load_source

        texts = []
        for name in ("wiki", "sotu"):
            docs, _ = load_source(name, data_dir, log=lambda m: None)
            texts += [d["text"] if isinstance(d, dict) else getattr(d, "text", str(d)) for d in docs]
    else:
        raise MoekitError(f"--prompts {source!r}: give en-prose or an existing text/JSONL file")
    pool = " ".join(texts).split()
    if len(pool) < words + 1:
        raise MoekitError(f"--prompts {source!r} has only {len(pool)} words; need at least {words + 1}")
    out = []
    for _ in range(n):
        i = rng.randrange(0, len(pool) - words)
        out.append(" ".join(pool[i:i + words]))
    return out


def arrival_delays(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Inter-arrival gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)); all 0 for rate 0."""
    if rate <= 0:
        return [0.0] * n
    rng = np.random.default_rng(seed)
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size=n).tolist()


async def _one(client, url: str, body: dict, chat: bool) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    res.error = str(obj["error"].get("message"))[:200]
                    return res
                if obj.get("usage"):
                    res.output_tokens = obj["usage"]["completion_tokens"]
                    res.prompt_tokens = obj["usage"]["prompt_tokens"]
                for c in obj.get("choices", []):
                    text = (c.get("delta") or {}).get("content") if chat else c.get("text")
                    # A completions chunk without a finish_reason is one generated token even when its
                    # text is empty: servers hold back the bytes of an incomplete UTF-8 character
                    # (llama-server does), and the token still arrived. Chat role-only chunks do not count.
                    token = text or (not chat and text is not None and c.get("finish_reason") is None)
                    if token:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
        res.e2e = time.perf_counter() - t0
        res.ok = last is not None
        if not res.ok:
            res.error = "no output text"
    except Exception as e:  # connection refused, reset, timeout: a failed request, not a crash
        res.error = f"{type(e).__name__}: {str(e)[:200]}"
    return res


async def run_load(base: str, prompts: list, model: str, max_tokens: int, rate: float, burstiness: float,
                   max_concurrency: int, chat: bool, seed: int, ignore_eos: bool, timeout: float
                   ) -> tuple[list[RequestResult], float]:
    import httpx

    path = "/v1/chat/completions" if chat else "/v1/completions"
    delays = arrival_delays(len(prompts), rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    limits = httpx.Limits(max_connections=max(len(prompts), 1), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        async def task(p) -> RequestResult:
            body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                    "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
            body.update({"messages": [{"role": "user", "content": p}]} if chat else {"prompt": p})
            if sem is None:
                return await _one(client, path, body, chat)
            async with sem:
                return await _one(client, path, body, chat)

        t0 = time.perf_counter()
        tasks = []
        for p, d in zip(prompts, delays):
            tasks.append(asyncio.create_task(task(p)))
            if d:
                await asyncio.sleep(d)
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs) * 1e3
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99))}


def summarize(results: list[RequestResult], duration: float, slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)

    def good(r: RequestResult) -> bool:
        t = (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        vals = {"ttft": r.ttft, "tpot": t, "e2el": r.e2e}
        return all(vals[k] * 1e3 <= v for k, v in slos.items())

    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_throughput": len(ok) / duration, "output_throughput": out_tok / duration,
        "total_token_throughput": (in_tok + out_tok) / duration,
        "total_input_tokens": in_tok, "total_output_tokens": out_tok,
        "request_goodput": (sum(good(r) for r in ok) / duration) if slos else None,
        "ttft_ms": _pcts([r.ttft for r in ok]), "tpot_ms": _pcts(tpot),
        "itl_ms": _pcts([x for r in ok for x in r.itl]), "e2el_ms": _pcts([r.e2e for r in ok]),
    }


def markdown(s: dict, cfg: dict) -> str:
    rows = [f"# moekit bench serve: {cfg['url']}", "",
            f"model `{cfg['model']}`, {cfg['num_prompts']} prompts of ~{cfg['input_words']} words "
            f"(+{cfg['shared_prefix']} shared), max_tokens {cfg['max_tokens']}, rate "
            f"{cfg['request_rate'] or 'inf'} req/s (burstiness {cfg['burstiness']}), max concurrency "
            f"{cfg['max_concurrency'] or 'unbounded'}", "",
            "| metric | value |", "|---|---|",
            f"| completed / failed | {s['completed']} / {s['failed']} |",
            f"| duration (s) | {s['duration_s']:.2f} |",
            f"| request throughput (req/s) | {s['request_throughput']:.2f} |",
            f"| output token throughput (tok/s) | {s['output_throughput']:.1f} |",
            f"| total token throughput (tok/s) | {s['total_token_throughput']:.1f} |"]
    if s["request_goodput"] is not None:
        rows.append(f"| request goodput (req/s) | {s['request_goodput']:.2f} |")
    rows += ["", "| ms | mean | p50 | p90 | p99 |", "|---|---|---|---|---|"]
    for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        v = s[k]
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        rows.append(f"| {k[:-3].upper()} | {f(v['mean'])} | {f(v['p50'])} | {f(v['p90'])} | {f(v['p99'])} |")
    return "\n".join(rows) + "\n"


def plot(results: list[RequestResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (name, xs) in zip(axes, (("TTFT", [r.ttft for r in ok]), ("ITL", [x for r in ok for x in r.itl]),
                                     ("E2E", [r.e2e for r in ok]))):
        xs = np.sort(np.asarray(xs) * 1e3)
        if len(xs):
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
