"""Prometheus metrics with vLLM's names under `moekit:`, plus low-cardinality routing telemetry.

Request metrics mirror vLLM (`num_requests_running`, `time_to_first_token_seconds`, ...). Routing
follows SGLang's shape so series stay O(layers), not O(layers x experts):
- `moekit:expert_load` a histogram per MoE layer whose buckets are expert ids (bucket le=e counts
  the tokens routed to experts 0..e), so a heatmap is one query;
- `moekit:expert_balancedness` a summary of per-step balancedness (sum over layers of the mean
  expert load / sum of the max, vLLM's EPLB definition at expert granularity; 1 = perfectly even);
- `moekit:expert_load_imbalance{layer}` max/mean over the recent window, `moekit:dead_experts{layer}`
  experts that got no token in the recent window;
- `moekit:expert_tokens_total{layer,expert}` only with `per_expert_metrics=True` (L x E series).
The routing collector builds its families from numpy arrays at scrape time: no per-token observe.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily

P = "moekit:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)
WINDOW_S = 10.0


class Metrics:
    def __init__(self, model_name: str, n_moe_layers: int, n_experts: int, per_expert: bool = False):
        self.registry = CollectorRegistry()
        lab = ["model_name"]
        r = self.registry
        self.model_name = model_name
        g = lambda n, d: Gauge(P + n, d, lab, registry=r).labels(model_name)  # noqa: E731
        c = lambda n, d: Counter(P + n, d, lab, registry=r).labels(model_name)  # noqa: E731
        h = lambda n, d, b: Histogram(P + n, d, lab, buckets=b, registry=r).labels(model_name)  # noqa: E731
        self.running = g("num_requests_running", "Sequences in the running batch.")
        self.waiting = g("num_requests_waiting", "Sequences waiting for a slot.")
        self.kv_usage = g("kv_cache_usage_perc", "Fraction of KV-cache token slots in use (0-1).")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = c("prompt_tokens", "Prompt tokens processed (prefill, cache hits included).")
        self.gen_tokens = c("generation_tokens", "Generated tokens.")
        self.aborted = c("num_aborted_requests", "Sequences aborted (client disconnect, timeout, shutdown).")
        self.disconnected = c("http_requests_client_disconnected", "HTTP requests whose client went away.")
        self.success = Counter(P + "request_success", "Finished sequences by reason.", lab + ["finished_reason"],
                               registry=r)
        self.rejected = c("num_rejected_requests", "Requests refused with 429 because the queue was full.")
        self.iteration_tokens = h("iteration_tokens_total", "Tokens per scheduler step.",
                                  (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        self.ttft = h("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Arrival to last token.", E2E_BUCKETS)
        self.queue_time = h("request_queue_time_seconds", "Arrival to first scheduled.", E2E_BUCKETS)
        self.routing = RoutingStats(n_moe_layers, n_experts, per_expert)
        if n_moe_layers:
            r.register(_RoutingCollector(self.routing, model_name))
        # Dashboard feed: recent samples for percentiles and throughput.
        self._lock = threading.Lock()
        self._ttft: deque[tuple[float, float]] = deque(maxlen=2000)
        self._e2e: deque[tuple[float, float]] = deque(maxlen=2000)
        self._tok: deque[tuple[float, int]] = deque(maxlen=20000)

    def observe_ttft(self, v: float) -> None:
        self.ttft.observe(v)
        with self._lock:
            self._ttft.append((time.monotonic(), v))

    def observe_e2e(self, v: float) -> None:
        self.e2e.observe(v)
        with self._lock:
            self._e2e.append((time.monotonic(), v))

    def observe_tokens(self, n: int) -> None:
        self.gen_tokens.inc(n)
        with self._lock:
            self._tok.append((time.monotonic(), n))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The dashboard's view: recent throughput, latency percentiles, queue and routing."""
        now = time.monotonic()
        with self._lock:
            toks = sum(n for t, n in self._tok if now - t <= WINDOW_S)
            ttft = [v for t, v in self._ttft if now - t <= 60]
            e2e = [v for t, v in self._e2e if now - t <= 60]
        pct = lambda xs, q: float(np.percentile(xs, q)) if xs else None  # noqa: E731
        snap = {"t": time.time(), "tokens_per_s": toks / WINDOW_S,
                "running": self.running._value.get(), "waiting": self.waiting._value.get(),
                "kv_usage": self.kv_usage._value.get(),
                "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
                "e2e_p50": pct(e2e, 50), "e2e_p90": pct(e2e, 90)}
        snap.update(self.routing.snapshot())
        return snap


class RoutingStats:
    """Tokens per (MoE layer, expert): all-time totals and a decayed recent window."""

    def __init__(self, n_layers: int, n_experts: int, per_expert: bool):
        self.L, self.E, self.per_expert = n_layers, n_experts, per_expert
        self.total_LE = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.recent_LE = np.zeros((n_layers, n_experts), dtype=np.float64)
        self.bal_sum = 0.0
        self.bal_count = 0
        self.bal_history: deque[tuple[float, float]] = deque(maxlen=600)
        self._last_decay = time.monotonic()
        self._lock = threading.Lock()

    def add(self, counts_LE: np.ndarray) -> None:
        """One scheduler step's routed-token counts (valid tokens only)."""
        if not self.L or counts_LE.sum() == 0:
            return
        mean, mx = counts_LE.mean(1).sum(), counts_LE.max(1).sum()
        bal = float(mean / mx) if mx else 1.0
        now = time.monotonic()
        with self._lock:
            self.total_LE += counts_LE
            # Exponential decay with a WINDOW_S time constant: the heatmap shows recent load.
            self.recent_LE *= np.exp(-(now - self._last_decay) / WINDOW_S)
            self._last_decay = now
            self.recent_LE += counts_LE
            self.bal_sum += bal
            self.bal_count += 1
            if not self.bal_history or now - self.bal_history[-1][0] >= 0.5:
                self.bal_history.append((now, bal))

    def snapshot(self) -> dict:
        with self._lock:
            rec = self.recent_LE.copy()
            hist = list(self.bal_history)[-120:]
        if not self.L:
            return {"heatmap": [], "balancedness": None, "dead_experts": []}
        mean, mx = rec.mean(1), rec.max(1)
        return {"heatmap": rec.round(2).tolist(),
                "balancedness": float(mean.sum() / mx.sum()) if mx.sum() else None,
                "balancedness_history": [round(b, 4) for _, b in hist],
                "dead_experts": (rec < 0.5).sum(1).tolist() if rec.sum() else [0] * self.L}


class _RoutingCollector:
    def __init__(self, stats: RoutingStats, model_name: str):
        self.s, self.model = stats, model_name

    def collect(self):
        s = self.s
        with s._lock:
            tot, rec, bsum, bcount = s.total_LE.copy(), s.recent_LE.copy(), s.bal_sum, s.bal_count
        hist = HistogramMetricFamily(P + "expert_load", "Tokens routed per expert (bucket le=e: experts 0..e).",
                                     labels=["model_name", "layer"])
        for l in range(s.L):
            cum = np.cumsum(tot[l])
            buckets = [(str(e), float(cum[e])) for e in range(s.E)] + [("+Inf", float(cum[-1]))]
            hist.add_metric([self.model, str(l)], buckets, float((tot[l] * np.arange(s.E)).sum()))
        yield hist
        summ = SummaryMetricFamily(P + "expert_balancedness", "Per-step mean/max expert load (1 = even).",
                                   labels=["model_name"])
        summ.add_metric([self.model], bcount, bsum)
        yield summ
        imb = GaugeMetricFamily(P + "expert_load_imbalance", "Max/mean tokens per expert, recent window.",
                                labels=["model_name", "layer"])
        dead = GaugeMetricFamily(P + "dead_experts", "Experts with no token in the recent window.",
                                 labels=["model_name", "layer"])
        active = rec.sum() > 0
        for l in range(s.L):
            m = rec[l].mean()
            imb.add_metric([self.model, str(l)], float(rec[l].max() / m) if m else 0.0)
            dead.add_metric([self.model, str(l)], float((rec[l] < 0.5).sum()) if active else 0.0)
        yield imb
        yield dead
        if s.per_expert:
            c = CounterMetricFamily(P + "expert_tokens", "Tokens routed to each expert.",
                                    labels=["model_name", "layer", "expert"])
            for l in range(s.L):
                for e in range(s.E):
                    c.add_metric([self.model, str(l), str(e)], float(tot[l, e]))
            yield c
