"""Faults and load: client disconnect frees the slot, full queue gives 429 (nothing lost or
duplicated), an engine failure mid-stream sends an error chunk then [DONE], priority order,
a bounded loopback load test, and SIGTERM draining a live stream (subprocess)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from moekit.serve.testing import free_port, serve_in_thread, tiny_state  # noqa: E402

C = "/v1/completions"


def _slow(state, delay: float = 0.02):
    """Make each decode step take at least `delay` s so requests overlap deterministically."""
    sched = state.scheduler
    orig = sched._decode

    def slow(dec):
        time.sleep(delay)
        return orig(dec)

    sched._decode = slow


def _load(url):
    return httpx.get(url + "/load").json()


def _metric(url, name):
    from prometheus_client.parser import text_string_to_metric_families

    for f in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if f.name == name:
            return sum(s.value for s in f.samples)
    raise KeyError(name)


def test_disconnect_mid_stream_frees_slot():
    state = tiny_state(max_num_seqs=2)
    _slow(state)
    with serve_in_thread(state) as url:
        body = {"prompt": "the fox", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as c, c.stream("POST", url + C, json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(x.startswith("data: {") for x in got)
            assert _load(url)["running"] == 1
        t0 = time.monotonic()
        while _load(url)["running"] and time.monotonic() - t0 < 2:
            time.sleep(0.02)
        assert _load(url)["running"] == 0, "slot not freed within 2 s of the disconnect"
        assert _metric(url, "moekit:num_aborted_requests") == 1
        assert _metric(url, "moekit:http_requests_client_disconnected") == 1
        assert httpx.post(url + C, json={"prompt": "fox", "max_tokens": 3}).status_code == 200


def test_full_queue_gives_429_and_nothing_lost():
    state = tiny_state(max_num_seqs=1, max_queue=2)
    _slow(state, 0.01)
    with serve_in_thread(state) as url:
        def one(i):
            r = httpx.post(url + C, json={"prompt": [5 + i, 6], "max_tokens": 8, "temperature": 0,
                                          "ignore_eos": True, "return_token_ids": True}, timeout=60)
            return i, r
        with cf.ThreadPoolExecutor(8) as ex:
            res = list(ex.map(one, range(8)))
        codes = [r.status_code for _, r in res]
        assert set(codes) <= {200, 429} and 429 in codes and 200 in codes
        for _, r in res:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "RateLimitError"
        ok = [(i, r.json()) for i, r in res if r.status_code == 200]
        ids = [b["id"] for _, b in ok]
        assert len(set(ids)) == len(ids)
        for i, b in ok:  # each accepted request got its own complete answer
            assert b["choices"][0]["prompt_token_ids"] == [5 + i, 6] and len(b["choices"][0]["token_ids"]) == 8
        assert _metric(url, "moekit:num_rejected_requests") == codes.count(429)
        assert _load(url) == {"running": 0, "waiting": 0, "slots": 1}


def test_engine_failure_mid_stream_sends_error_then_done():
    state = tiny_state()
    sched = state.scheduler
    orig, calls = sched._decode, [0]

    def flaky(dec):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("simulated device fault")
        return orig(dec)

    sched._decode = flaky
    with serve_in_thread(state) as url:
        r = httpx.post(url + C, json={"prompt": "fox", "max_tokens": 20, "stream": True, "ignore_eos": True})
        events = [x[6:] for x in r.text.split("\n\n") if x.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == 500 and "simulated device fault" in err["message"]
        assert httpx.get(url + "/health").status_code == 503
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny", prompt="fox", max_tokens=2)
        assert e.value.status_code == 503


def test_priority_policy_runs_lower_value_first():
    state = tiny_state(max_num_seqs=1, policy="priority")
    _slow(state, 0.01)
    done = []
    with serve_in_thread(state) as url:
        def one(prio):
            n = 60 if prio == 0 else 4
            httpx.post(url + C, json={"prompt": "fox", "max_tokens": n, "priority": prio, "ignore_eos": True},
                       timeout=60)
            done.append(prio)
        with cf.ThreadPoolExecutor(4) as ex:
            first = ex.submit(one, 0)  # occupies the only slot
            time.sleep(0.1)
            futs = [ex.submit(one, p) for p in (5, 3, -1)]
            time.sleep(0.1)
            for f in [first, *futs]:
                f.result()
    assert done[0] == 0 and done[1:] == [-1, 3, 5]


def test_load_8_clients_x_5_requests_no_errors():
    state = tiny_state(max_num_seqs=8)
    with serve_in_thread(state) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def worker(w):
            out = []
            for k in range(5):
                if k % 2:
                    s = client.completions.create(model="tiny", prompt=f"fox {w} {k}", max_tokens=8, stream=True,
                                                  extra_body={"ignore_eos": True})
                    out.append("".join(c.choices[0].text for c in s if c.choices))
                else:
                    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"{w}"}],
                                                       max_tokens=8, extra_body={"ignore_eos": True})
                    out.append(r.choices[0].message.content)
            return out

        with cf.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(worker, range(8)))
        assert sum(len(r) for r in results) == 40
        assert _metric(url, "moekit:e2e_request_latency_seconds") > 0
        assert _load(url)["running"] == 0


@pytest.mark.slow
def test_sigterm_drains_inflight_stream(tmp_path):
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", "tiny-moe", "--port", str(port),
                             "--log-level", "warning", "--shutdown-timeout", "30"], cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 60 and proc.poll() is None, "server did not come up"
            time.sleep(0.2)
        body = {"prompt": [1, 2, 3], "max_tokens": 150, "stream": True, "ignore_eos": True}
        n_tokens = 0
        with httpx.stream("POST", url + C, json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    n_tokens += 1
                    break
            proc.send_signal(signal.SIGTERM)
            tail = [line for line in lines if line.startswith("data: ")]
        assert tail[-1] == "data: [DONE]"
        last = json.loads(tail[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"  # drained to completion, not cut
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    finally:
        if proc.poll() is None:
            proc.kill()
