"""The FastAPI app: OpenAI-compatible endpoints over the continuous-batching `Scheduler`.

Handlers validate (pydantic + vocabulary/context checks), turn a request into one `Seq` per
(prompt, choice), submit them atomically (429 when the queue is full) and read their events from
an asyncio queue fed by the worker thread. A client that goes away aborts its sequences at once
(non-streaming: polled; streaming: the response's `finally`), which frees their slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from moekit.serve import responses as R
from moekit.serve.errors import APIError, context_error, error_body, install
from moekit.serve.grammar import Grammars
from moekit.serve.metrics import Metrics
from moekit.serve.protocol import ChatCompletionRequest, CompletionRequest
from moekit.serve.scheduler import Event, QueueFull, Scheduler, Seq, SeqParams, ServeConfig
from moekit.serve.text import TextCodec

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerState:
    model_name: str
    cfg: ServeConfig
    per_expert_metrics: bool = False
    max_body_bytes: int = 4 << 20
    ready: bool = False
    draining: bool = False
    error: str | None = None
    scheduler: Scheduler | None = None
    codec: TextCodec | None = None
    grammars: Grammars | None = None
    metrics: Metrics | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def attach(self, model, tokenizer, model_dir: Path | None, tokenizer_config: dict | None = None) -> None:
        """Build codec, metrics and scheduler for a loaded model and start the worker."""
        mcfg = model.config
        n_moe = sum(b.is_moe for b in model.layers)
        self.codec = TextCodec(tokenizer, model_dir, mcfg.vocab_size, tokenizer_config)
        self.grammars = Grammars(tokenizer, mcfg.vocab_size, self.codec.stop_ids)
        self.metrics = Metrics(self.model_name, n_moe, mcfg.moe.num_experts if n_moe else 0, self.per_expert_metrics)
        self.scheduler = Scheduler(model, self.codec, self.cfg, self.metrics)
        self.scheduler.start()
        self.ready = True

    def engine(self) -> Scheduler:
        if self.error or (self.scheduler is not None and self.scheduler.dead):
            raise APIError(503, f"the engine is not available: {self.error or self.scheduler.dead}")
        if not self.ready or self.scheduler is None:
            raise APIError(503, "the model is still loading; retry shortly")
        if self.draining:
            raise APIError(503, "the server is shutting down")
        return self.scheduler


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, before anything buffers them."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_big = JSONResponse(error_body(413, f"request body is larger than the {self.limit}-byte limit"), 413)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"request body is larger than the {self.limit}-byte limit")
            return msg

        return await self.app(scope, limited, send)


class SSEResponse(StreamingResponse):
    """A stream that always runs `on_close` (aborting unfinished sequences) however it ends."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _params(req, max_tokens: int, logprobs: int | None) -> SeqParams:
    return SeqParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                     top_k=max(req.top_k, 0), presence_penalty=req.presence_penalty,
                     frequency_penalty=req.frequency_penalty, seed=req.seed, stop=req.stop_list(),
                     stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                     return_routed_experts=req.return_routed_experts, priority=req.priority)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="moekit serve", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.serve = state
    install(app)
    plain_openapi = app.openapi

    def openapi():
        # Document the one model name the server accepts (others get 404), so schema-driven
        # clients and fuzzers reach generation instead of the 404 path.
        schema = plain_openapi()
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = schema.get("components", {}).get("schemas", {}).get(name, {}).get("properties", {})
            if "model" in props:
                props["model"] = {"anyOf": [{"type": "string", "enum": [state.model_name]}, {"type": "null"}],
                                  "title": "Model"}
        return schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                           "model")


    def prepare(sched: Scheduler, prompts: list[list[int]], req, default_max: int, logprobs: int | None):
        codec = state.codec
        for p in prompts:
            codec.check_ids(p)
        limit = sched.max_len
        longest = max(len(p) for p in prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
        if longest >= limit or (max_tokens is not None and longest + max_tokens > limit):
            raise context_error(limit, longest, max_tokens if max_tokens is not None else 1)
        if req.n * len(prompts) > state.cfg.max_queue:
            raise APIError(400, f"n x prompts = {req.n * len(prompts)} exceeds the server queue "
                                f"({state.cfg.max_queue}); send fewer choices per request", "n")
        if max_tokens is None:
            max_tokens = min(default_max, limit - longest)
        return _params(req, max_tokens, logprobs)

    async def run(raw: Request, sched: Scheduler, prompts, params: SeqParams, n: int, grammar: str | None = None):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped): nobody is listening
                pass

        seqs = []
        for i, p in enumerate(prompts):
            for j in range(n):
                sp = params
                if params.seed is not None and j:
                    sp = SeqParams(**{**params.__dict__, "seed": params.seed + j})
                seqs.append(Seq(p, sp, sink, i * n + j, state.codec))
                if grammar is not None:
                    seqs[-1].matcher = state.grammars.matcher(grammar)
        try:
            sched.submit(seqs)
        except QueueFull:
            state.metrics.rejected.inc()
            raise APIError(429, "the server is overloaded: the request queue is full; retry later",
                           headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise APIError(503, str(e)) from None
        return seqs, q

    async def events(raw: Request, sched: Scheduler, seqs, q, poll_disconnect: bool):
        """Events until every sequence has finished; aborts them if the client leaves."""
        left = len(seqs)
        while left:
            try:
                ev: Event = await asyncio.wait_for(q.get(), 0.5)
            except asyncio.TimeoutError:
                if poll_disconnect and await raw.is_disconnected():
                    state.metrics.disconnected.inc()
                    sched.abort(seqs)
                    return
                continue
            if ev.finish is not None or ev.error is not None:
                left -= 1
            yield ev

    async def serve(raw: Request, req, prompts: list[list[int]], chat: bool, prompt_texts: list[str]):
        sched = state.engine()
        check_model(req.model)
        grammar = state.grammars.compile(req.response_format)
        if chat:
            lp = (req.top_logprobs or 0) if req.logprobs else None
        else:
            lp = req.logprobs
        params = prepare(sched, prompts, req, 256 if chat else 16, lp)
        seqs, q = await run(raw, sched, prompts, params, req.n, grammar)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        build = R.Builder(rid, state.model_name, chat, state.codec, len(seqs), prompts, req.n,
                          prompt_texts if req.echo else None, req.logprobs if chat else lp is not None,
                          req.return_token_ids)
        if not req.stream:
            try:
                async for ev in events(raw, sched, seqs, q, poll_disconnect=True):
                    if ev.error is not None:
                        raise APIError(500, ev.error)
                    build.add(ev)
            finally:
                if any(not s.done for s in seqs):
                    sched.abort(seqs)
            return JSONResponse(build.final())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def gen():
            async for ev in events(raw, sched, seqs, q, poll_disconnect=False):
                if ev.error is not None:
                    yield R.sse(error_body(500, ev.error))
                    break
                for chunk in build.chunks(ev):
                    yield R.sse(chunk)
            else:
                if include_usage:
                    yield R.sse(build.usage_chunk())
            yield "data: [DONE]\n\n"

        def on_close():
            if any(not s.done for s in seqs):
                state.metrics.disconnected.inc()
                sched.abort(seqs)

        return SSEResponse(gen(), on_close)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        state.engine()
        p = req.prompt
        items = [p] if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)) else p
        if isinstance(items, list) and not items:
            raise APIError(400, "the prompt is empty: give a non-empty prompt", "prompt")
        prompts, texts = [], []
        for it in items:
            ids = state.codec.encode(it) if isinstance(it, str) else list(it)
            state.codec.check_ids(ids)
            prompts.append(ids)
            texts.append(it if isinstance(it, str) else state.codec.decode(ids))
        return await serve(raw, req, prompts, False, texts)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        state.engine()
        if req.max_tokens is None and req.max_completion_tokens is not None:
            req.max_tokens = req.max_completion_tokens
        msgs = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        text = state.codec.render_chat(msgs, req.add_generation_prompt)
        ids = state.codec.encode(text, special=False)
        return await serve(raw, req, [ids], True, [msgs[-1]["content"]])

    @app.get("/v1/models")
    async def models():
        max_len = state.scheduler.max_len if state.scheduler else None
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "moekit", "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        state.engine()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(raw: Request):
        sched = state.engine()
        params = SeqParams(max_tokens=1, temperature=0.0)
        seqs, q = await run(raw, sched, [[0]], params, 1)
        try:
            async for ev in events(raw, sched, seqs, q, poll_disconnect=True):
                if ev.error is not None:
                    raise APIError(503, ev.error)
        except asyncio.TimeoutError:
            raise APIError(503, "generation timed out") from None
        return Response(status_code=200)

    @app.get("/load")
    async def load():
        return state.scheduler.load() if state.scheduler else {"running": 0, "waiting": 0}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard")
    async def dashboard():
        return HTMLResponse((STATIC / "dashboard.html").read_text())

    @app.get("/dashboard/events")
    async def dashboard_events(raw: Request, interval: float = 1.0):
        interval = min(max(interval, 0.1), 10.0)

        async def gen():
            while not state.draining:
                snap = state.metrics.snapshot() if state.metrics else {"loading": True}
                snap["model"] = state.model_name
                yield f"data: {json.dumps(snap)}\n\n"
                await asyncio.sleep(interval)

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def load_in_background(state: ServerState, loader) -> threading.Thread:
    """Load the model off the event loop (/health answers 503 meanwhile), then start the worker."""

    def target():
        try:
            model, tok, model_dir, tok_cfg = loader()
            state.attach(model, tok, model_dir, tok_cfg)
            log.info("model %s ready", state.model_name)
        except Exception as e:
            log.exception("model load failed")
            state.error = f"{type(e).__name__}: {str(e)[:300]}"

    t = threading.Thread(target=target, name="moekit-serve-load", daemon=True)
    t.start()
    return t
