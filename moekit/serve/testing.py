"""Run a server in this process on a free loopback port, or any OpenAI-compatible server as a
subprocess until it is healthy (tests, notebooks, benchmarks)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

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


@contextlib.contextmanager
def server_process(cmd: list[str], url: str, log: Path, timeout: float = 600):
    """Start `cmd` (moekit serve, llama-server, ...) with its output in `log`, wait until GET
    url/health answers 200, yield the process; SIGTERM it on exit (drain), kill after 60 s.
    RuntimeError with the log's tail when it exits or stays unhealthy."""
    import httpx

    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not healthy after {timeout:.0f} s"
                raise RuntimeError(f"`{' '.join(map(str, cmd[:6]))} ...` {why}; its log ({log}) ends:\n"
                                   f"{Path(log).read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


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
