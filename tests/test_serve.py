"""moekit serve through the official `openai` client: completions and chat, streamed and not, n=2,
logprobs, routed experts; greedy output equals the batch engine's; prefix cache; metrics; CLI."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from moekit.inference import Engine, SamplingParams  # noqa: E402
from moekit.serve.testing import serve_in_thread, tiny_state  # noqa: E402

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}))
    state = tiny_state(d, prefix_cache_tokens=1024)
    with serve_in_thread(state) as url:
        yield state, url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0, timeout=30)


def _engine_greedy(state, ids: list[int], n: int) -> list[int]:
    return Engine(state.scheduler.model).generate([ids], SamplingParams(max_new_tokens=n))[0].tokens


def test_completion_and_stream_match(client, server):
    kw = dict(model="tiny", prompt="the quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert text == full.choices[0].text
    # Continuous batching gives the batch engine's greedy tokens.
    ids = full.model_extra["choices"][0]["token_ids"] if "choices" in (full.model_extra or {}) else \
        full.choices[0].model_extra["token_ids"]
    prompt_ids = full.choices[0].model_extra["prompt_token_ids"]
    assert ids == _engine_greedy(server[0], prompt_ids, 12)


def test_chat_stream_usage_equals_nonstream(client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the lazy dog"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"


def test_n2_logprobs_seed(client):
    r = client.completions.create(model="tiny", prompt="the lazy", max_tokens=6, n=2, temperature=1.0, seed=7,
                                  logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.token_logprobs) == 6 and all(v <= 0 for v in lp.token_logprobs)
        assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # distinct ids may decode alike
        # The sampled token's logprob is at most the best one.
        assert all(v <= max(t.values()) + 1e-6 for v, t in zip(lp.token_logprobs, lp.top_logprobs))
    again = client.completions.create(model="tiny", prompt="the lazy", max_tokens=6, n=2, temperature=1.0, seed=7,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "fox"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, n=2, extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2
    assert all(len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 2 for c in chat.choices)


def test_routed_experts(client, server):
    state = server[0]
    r = client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=4, temperature=0,
                                  extra_body={"return_routed_experts": True, "ignore_eos": True})
    routed = r.choices[0].model_extra["routed_experts"]
    cfg = state.scheduler.model.config
    # Every processed token (prompt + all outputs but the last), every MoE layer, top_k experts.
    assert len(routed) == 5 + 4 - 1
    assert all(len(t) == cfg.n_layers and all(len(set(k)) == cfg.moe.top_k for k in t) for t in routed)
    # Reference: the model's own routing over the same tokens in one full forward.
    ids = [5, 6, 7, 8, 9] + _engine_greedy(state, [5, 6, 7, 8, 9], 3)
    with torch.no_grad():
        out = state.scheduler.model(torch.tensor([ids]), return_routing_ids=True)
    want = [[sorted(out.routing[l].expert_ids[t].tolist()) for l in range(cfg.n_layers)] for t in range(len(ids))]
    assert [[sorted(k) for k in t] for t in routed] == want


def test_concurrent_requests_match_sequential(client, server):
    prompts = [[3 + i] * (4 + 7 * i) for i in range(6)]
    want = [_engine_greedy(server[0], p, 10) for p in prompts]

    def one(p):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    with cf.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(one, prompts))
    assert got == want


def test_prefix_cache_hits_and_same_output(client, server):
    system = "the quick brown fox jumps over the lazy dog " * 6
    kw = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    a = client.completions.create(prompt=system + "one", **kw)
    b = client.completions.create(prompt=system + "one", **kw)
    assert a.usage.prompt_tokens_details.cached_tokens < 32 <= b.usage.prompt_tokens_details.cached_tokens
    assert a.choices[0].text == b.choices[0].text
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(server[1] + "/metrics").text)}
    hits = fams["moekit:prefix_cache_hits"].samples[0].value
    assert hits >= 32


def test_models_health_metrics(server):
    url = server[1]
    m = httpx.get(url + "/v1/models").json()
    assert m["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/health_generate", timeout=30).status_code == 200
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    for name in ("moekit:num_requests_running", "moekit:num_requests_waiting", "moekit:kv_cache_usage_perc",
                 "moekit:time_to_first_token_seconds", "moekit:inter_token_latency_seconds",
                 "moekit:e2e_request_latency_seconds", "moekit:request_queue_time_seconds",
                 "moekit:prompt_tokens", "moekit:generation_tokens", "moekit:expert_load",
                 "moekit:expert_balancedness", "moekit:dead_experts", "moekit:expert_load_imbalance"):
        assert name in fams, name
    running = fams["moekit:num_requests_running"].samples[0].value
    assert running == 0
    layers = {s.labels["layer"] for s in fams["moekit:expert_load"].samples}
    assert layers == {"0", "1"}
    ttft = next(s.value for s in fams["moekit:time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    e2e = next(s.value for s in fams["moekit:e2e_request_latency_seconds"].samples if s.name.endswith("_count"))
    assert ttft == e2e > 0  # every finished sequence had a first token


def test_health_503_while_loading():
    from moekit.serve import ServeConfig, ServerState, create_app
    from fastapi.testclient import TestClient

    state = ServerState("x", ServeConfig())
    c = TestClient(create_app(state))
    assert c.get("/health").status_code == 503
    r = c.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == 503


def test_dashboard_page_and_live_feed(server, client):
    url = server[1]
    page = httpx.get(url + "/dashboard")
    assert page.status_code == 200 and "EventSource" in page.text
    assert "<script src" not in page.text and "cdn" not in page.text.lower()  # self-contained, no CDN

    def snapshot(c):
        with c.stream("GET", url + "/dashboard/events?interval=0.1") as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return json.loads(line[6:])

    with httpx.Client(timeout=30) as c:
        before = snapshot(c)
        client.completions.create(model="tiny", prompt="the fox " * 10, max_tokens=8, extra_body={"ignore_eos": True})
        after = snapshot(c)
    assert len(after["heatmap"]) == 2 and len(after["heatmap"][0]) == 8
    assert sum(map(sum, after["heatmap"])) > sum(map(sum, before["heatmap"]))
    assert 0 < after["balancedness"] <= 1 and after["ttft_p50"] is not None


def test_bench_serve_against_server(server, tmp_path):
    from moekit.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "serve", server[1], "--token-ids", "--num-prompts", "6", "--max-tokens", "4",
               "--input-words", "8", "--request-rate", "50", "--max-concurrency", "3", "--warmup", "1",
               "--goodput", "ttft:60000", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["summary"]
    assert res["completed"] == 6 and res["failed"] == 0 and res["total_output_tokens"] == 24
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])
    assert res["ttft_ms"]["p50"] > 0 and res["itl_ms"]["p99"] >= res["itl_ms"]["p50"]
    assert (out / "results.md").read_text().startswith("# moekit bench serve") and (out / "latency.png").stat().st_size


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["ok", "color", "n"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates(client):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "answer"}],
                                       max_tokens=60, temperature=1.0, seed=3, n=2, response_format=rf)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    # Seeded: a random model may otherwise write one long string key past max_tokens.
    s = list(client.completions.create(model="tiny", prompt="fox", max_tokens=100, stream=True, seed=3,
                                       extra_body={"response_format": {"type": "json_object"}}))
    assert s[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads("".join(c.choices[0].text for c in s if c.choices)), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert e.value.status_code == 400 and "schema" in e.value.message
