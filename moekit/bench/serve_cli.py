"""`moekit bench serve URL`: the command around `serve_bench` (arguments, outputs)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Literal

from moekit.errors import MoekitError


def _parse_slos(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for it in items or []:
        k, _, v = it.partition(":")
        if k not in ("ttft", "tpot", "e2el"):
            raise MoekitError(f"--goodput {it!r}: use ttft:MS, tpot:MS or e2el:MS")
        try:
            slos[k] = float(v)
        except ValueError:
            raise MoekitError(f"--goodput {it!r}: {v!r} is not a number of milliseconds") from None
    return slos


def bench_serve_cli(url: str, model: str | None = None, num_prompts: int = 50, request_rate: float = 0.0,
                    burstiness: float = 1.0, max_concurrency: int = 0, input_words: int = 64, shared_prefix: int = 0,
                    max_tokens: int = 64, endpoint: Literal["completions", "chat"] = "completions",
                    prompts: str = "en-prose", data_dir: Path = Path("data"), goodput: list[str] | None = None,
                    ignore_eos: bool = True, token_ids: bool = False, seed: int = 0, timeout: float = 600.0, warmup: int = 2,
                    out: Path = Path("bench_serve")) -> int:
    """Load-test an OpenAI-compatible server: TTFT, TPOT, ITL, e2e p50/p90/p99, throughput, goodput.

    Requests arrive by a Gamma process (burstiness 1 = Poisson) at --request-rate (0 = all at
    once), each streamed; works against moekit serve, vLLM, llama-server or any OpenAI-compatible
    server. Writes results.json, results.md and latency.png (CDFs) to --out.

    Args:
        url: server base URL, e.g. http://127.0.0.1:8000.
        model: model name to send (default: the first of GET /v1/models).
        num_prompts: requests to send.
        request_rate: mean arrivals per second (0 = send all at once).
        burstiness: Gamma shape (1 = Poisson, <1 burstier, >1 more regular).
        max_concurrency: cap on requests in flight (0 = no cap).
        input_words: words per prompt, drawn from --prompts.
        shared_prefix: words of one shared system prefix prepended to every prompt (prefix-cache test).
        max_tokens: output tokens per request.
        endpoint: completions or chat.
        prompts: en-prose (needs `moekit data prepare en-prose` or network) or a text/JSONL file.
        data_dir: data directory holding the en-prose source cache.
        goodput: SLOs in ms, e.g. ttft:500 tpot:100 e2el:5000.
        ignore_eos: keep generating to max_tokens (fixed output lengths).
        token_ids: send prompts as random token ids (input_words ids each) for servers without a tokenizer.
        seed: prompt and arrival seed.
        timeout: per-request timeout in seconds.
        warmup: requests sent (one at a time) before measuring.
        out: output directory.
    """
    import httpx

    from moekit.bench.serve_bench import load_prompts, markdown, plot, run_load, summarize
    from moekit.checkpoint.native import atomic_write_text

    if num_prompts < 1:
        raise MoekitError(f"--num-prompts must be >= 1 (got {num_prompts})")
    if burstiness <= 0:
        raise MoekitError(f"--burstiness must be > 0 (got {burstiness})")
    slos = _parse_slos(goodput)
    base = url.rstrip("/")
    try:
        if model is None:
            model = httpx.get(base + "/v1/models", timeout=30).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise MoekitError(f"cannot list models at {base}/v1/models ({type(e).__name__}); is the server up?") from None
    if token_ids:
        import random

        rng = random.Random(seed)
        ids = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731
        shared = ids(shared_prefix)
        texts = [shared + ids(input_words) for _ in range(num_prompts + warmup)]
    else:
        texts = load_prompts(prompts, num_prompts + warmup + 1, input_words + shared_prefix, Path(data_dir), seed)
        prefix = " ".join(texts[-1].split()[:shared_prefix]) if shared_prefix else ""
        texts = [(prefix + " " if prefix else "") + " ".join(t.split()[:input_words]) for t in texts[:-1]]
    args = dict(model=model, max_tokens=max_tokens, burstiness=burstiness, chat=endpoint == "chat", seed=seed,
                ignore_eos=ignore_eos, timeout=timeout)
    if warmup:
        asyncio.run(run_load(base, texts[:warmup], rate=0.0, max_concurrency=1, **args))
    results, duration = asyncio.run(run_load(base, texts[warmup:], rate=request_rate,
                                             max_concurrency=max_concurrency, **args))
    summary = summarize(results, duration, slos)
    cfg = dict(url=base, model=model, num_prompts=num_prompts, request_rate=request_rate, burstiness=burstiness,
               max_concurrency=max_concurrency, input_words=input_words, shared_prefix=shared_prefix,
               max_tokens=max_tokens, endpoint=endpoint, goodput=slos, seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps({"config": cfg, "summary": summary}, indent=2))
    md = markdown(summary, cfg)
    atomic_write_text(out / "results.md", md)
    plot(results, out / "latency.png")
    print(md)
    return 0 if summary["failed"] == 0 else 1
