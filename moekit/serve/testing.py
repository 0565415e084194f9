"""Run a server in this process on a free loopback port (tests, notebooks, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from moekit.serve.app import ServerState, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(state: ServerState, port: int | None = None, timeout_graceful_shutdown: int = 5):
    """Yield the base URL of `create_app(state)` served by uvicorn on 127.0.0.1; stop it on exit."""
    import uvicorn

    port = port or free_port()
    app = create_app(state)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=timeout_graceful_shutdown))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not t.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)
        if state.scheduler is not None:
            state.scheduler.shutdown()


def tiny_state(model_dir=None, preset: str = "tiny-moe", name: str = "tiny", **cfg) -> ServerState:
    """A ready `ServerState` over a randomly initialised preset and a small byte-level BPE
    tokenizer trained on the spot (tests and demos: no downloads)."""
    import moekit
    from moekit.data.tokenizer import train_tokenizer
    from moekit.serve.scheduler import ServeConfig

    corpus = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7} and runs away" for i in range(200)]
    tok = train_tokenizer(corpus, vocab_size=400, show_progress=False)
    model = moekit.build_model(moekit.get_preset(preset), seed=0).eval()
    state = ServerState(name, ServeConfig(**cfg))
    state.attach(model, tok, model_dir)
    return state
