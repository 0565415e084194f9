"""`moekit serve`: an OpenAI-compatible server with continuous batching, a prefix cache,
Prometheus metrics with routing telemetry, per-request routed experts and a live dashboard.

    from moekit.serve import ServeConfig, ServerState, create_app
    state = ServerState("my-model", ServeConfig()); state.attach(model, tokenizer, None)
    app = create_app(state)   # any ASGI server, or `moekit serve MODEL`
"""

from moekit.serve.app import ServerState, create_app
from moekit.serve.scheduler import ServeConfig

__all__ = ["ServeConfig", "ServerState", "create_app"]
