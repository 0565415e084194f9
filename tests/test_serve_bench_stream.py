"""`moekit bench serve`'s stream parsing: which chunks count as generated tokens."""

from __future__ import annotations

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")

from moekit.bench.serve_bench import _one  # noqa: E402


def _sse(chunks: list[dict]) -> bytes:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"


def _run(chunks: list[dict], chat: bool = False):
    transport = httpx.MockTransport(lambda req: httpx.Response(200, content=_sse(chunks),
                                                               headers={"content-type": "text/event-stream"}))

    async def go():
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await _one(client, "/v1/completions", {"prompt": [1, 2]}, chat)

    return asyncio.run(go())


def test_empty_text_token_chunks_count_but_the_final_chunk_does_not():
    # llama-server sends "" for a token whose UTF-8 character is not complete yet.
    chunks = [{"choices": [{"text": "", "finish_reason": None}]},
              {"choices": [{"text": "\u00e9", "finish_reason": None}]},
              {"choices": [{"text": "a", "finish_reason": None}]},
              {"choices": [{"text": "", "finish_reason": "length"}]},
              {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 2}}]
    r = _run(chunks)
    assert r.ok and r.output_tokens == 3
    assert len(r.itl) == 2 and r.ttft > 0


def test_a_stream_without_tokens_is_a_failure():
    r = _run([{"choices": [{"text": "", "finish_reason": "length"}]}])
    assert not r.ok and r.error == "no output text"


def test_chat_role_only_chunk_is_not_a_token():
    chunks = [{"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
              {"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]},
              {"choices": [{"delta": {}, "finish_reason": "stop"}]}]
    r = _run(chunks, chat=True)
    assert r.ok and r.itl == []
