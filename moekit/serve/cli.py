"""`moekit serve MODEL`: load a model in the background and serve it with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from moekit.errors import MoekitError


def serve_cli(model: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
              max_num_seqs: int = 8, max_num_batched_tokens: int = 512, max_model_len: int = 0,
              max_queue: int = 64, scheduling_policy: Literal["fcfs", "priority"] = "fcfs",
              request_timeout: float = 600.0, prefix_cache_tokens: int = 4096, per_expert_metrics: bool = False,
              max_body_bytes: int = 4 << 20, shutdown_timeout: int = 30,
              dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto", threads: int = 0, seed: int = 0,
              pack_experts: bool = False, log_level: Literal["debug", "info", "warning", "error"] = "info") -> int:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching.

    Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health (503 while loading),
    /health_generate, /metrics (Prometheus, moekit: prefix), /dashboard (live expert-load heatmap).
    SIGTERM stops accepting connections and drains in-flight requests for up to --shutdown-timeout s.

    Args:
        model: model directory, .gguf file, or preset name (random weights from --seed).
        host: address to bind (loopback by default).
        port: TCP port.
        served_model_name: the `model` name clients send (default: MODEL's basename).
        max_num_seqs: sequences decoded together (KV-cache slots).
        max_num_batched_tokens: token budget per scheduler step (decode + chunked prefill).
        max_model_len: context per sequence, prompt + output (0 = the model's, capped at 4096).
        max_queue: waiting sequences before new requests get 429 + Retry-After.
        scheduling_policy: fcfs, or priority (request `priority`, lower first).
        request_timeout: seconds before a request is aborted.
        prefix_cache_tokens: prefix-cache pool size in tokens (0 = off).
        per_expert_metrics: also export moekit:expert_tokens_total{layer,expert} (layers x experts series).
        max_body_bytes: largest request body accepted (413 above).
        shutdown_timeout: seconds to drain in-flight requests on SIGTERM.
        dtype: weights dtype (auto = as stored; float32 for presets).
        threads: torch CPU threads for the model (0 = all cores but one, which the HTTP loop and
            tokenizer keep; on a busy or 2-core machine extra OpenMP threads mostly spin).
        seed: weights seed for a preset.
        pack_experts: pack expert weights for the CPU outer-product kernel.
        log_level: uvicorn/moekit log level.
    """
    try:
        import uvicorn

        from moekit.serve.app import ServerState, create_app, load_in_background
        from moekit.serve.scheduler import ServeConfig
    except ImportError as e:
        raise MoekitError(f"`moekit serve` needs the serve extra ({e}); pip install 'moekit[serve]'") from None
    import torch

    if not 0 < port < 65536:
        raise MoekitError(f"--port must be in 1..65535 (got {port})")
    for name, v in (("max-num-seqs", max_num_seqs), ("max-num-batched-tokens", max_num_batched_tokens),
                    ("max-queue", max_queue)):
        if v < 1:
            raise MoekitError(f"--{name} must be >= 1 (got {v})")
    import os

    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServeConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                      max_model_len=max_model_len or None, max_queue=max_queue, policy=scheduling_policy,
                      request_timeout_s=request_timeout, prefix_cache_tokens=prefix_cache_tokens)
    name = served_model_name or Path(model.rstrip("/")).name
    state = ServerState(name, cfg, per_expert_metrics=per_expert_metrics, max_body_bytes=max_body_bytes)

    def loader():
        from moekit.inference.cli import load_for_inference, load_tokenizer
        from moekit.inference.engine import Engine

        m = load_for_inference(model, dtype, seed)
        if cfg.max_model_len and cfg.max_model_len > m.config.max_seq_len:
            raise MoekitError(f"--max-model-len {cfg.max_model_len} exceeds the model's {m.config.max_seq_len}")
        Engine(m, pack_experts=pack_experts)  # eval mode, packed experts, allocator policy
        tok = load_tokenizer(model) or getattr(m, "tokenizer", None)
        p = Path(model)
        return m, tok, (p if p.is_dir() else None), _gguf_tokenizer_config(p)

    app = create_app(state)

    @app.on_event("startup")
    async def _start():
        load_in_background(state, loader)

    @app.on_event("shutdown")
    async def _stop():
        state.draining = True
        if state.scheduler is not None:
            state.scheduler.shutdown()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Drain from the first signal: /health turns 503, new requests get 503, dashboard
            # streams end (so they do not hold the shutdown), in-flight generations finish.
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run()
    return 0


def _gguf_tokenizer_config(path: Path) -> dict:
    """chat_template and eos_token from a GGUF's metadata ({} for anything else)."""
    if path.suffix != ".gguf" or not path.is_file():
        return {}
    from moekit.checkpoint.gguf import _meta, _reader

    meta = _meta(_reader(path))
    out = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        out["chat_template"] = meta["tokenizer.chat_template"]
    return out
