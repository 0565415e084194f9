"""The continuous-batching scheduler driven step by step: batched fresh prefill, chunked prefill,
prefix-cache hits and mixed prefill/decode all give the batch engine's greedy tokens (standard
attention and MLA's latent cache), and slots are reused after finishing."""

from __future__ import annotations

import dataclasses
import queue

import pytest
import torch

import moekit
from moekit.inference import Engine, SamplingParams
from moekit.serve.metrics import Metrics
from moekit.serve.scheduler import Scheduler, Seq, SeqParams, ServeConfig
from moekit.serve.text import TextCodec


def _model(kind: str):
    if kind == "mla":
        cfg = dataclasses.replace(moekit.get_preset("tiny-deepseek"), attention="mla", q_lora_rank=32,
                                  kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    else:
        cfg = moekit.get_preset(kind)
    return moekit.build_model(cfg, seed=0).eval()


def _sched(model, **cfg) -> Scheduler:
    n_moe = sum(b.is_moe for b in model.layers)
    m = Metrics("t", n_moe, model.config.moe.num_experts if n_moe else 0)
    return Scheduler(model, TextCodec(None, None, model.config.vocab_size), ServeConfig(**cfg), m)


def _run(sched: Scheduler, prompts, n_new: int, rounds=None):
    """Submit prompts (in `rounds` of arrival), step until all finish; tokens per prompt."""
    q = queue.Queue()
    seqs = [Seq(p, SeqParams(max_tokens=n_new, temperature=0.0, ignore_eos=True), q.put, i, sched.codec)
            for i, p in enumerate(prompts)]
    rounds = rounds or [list(range(len(seqs)))]
    with torch.inference_mode():
        for r in rounds:
            sched.submit([seqs[i] for i in r])
            sched._intake(False)
            sched._step()
        while any(not s.done for s in seqs):
            sched._step()
    return [s.tokens for s in seqs]


def _want(model, prompts, n_new):
    # One ragged batch (test_inference checks it equals each prompt alone).
    return [g.tokens for g in Engine(model).generate(prompts, SamplingParams(max_new_tokens=n_new))]


@pytest.mark.parametrize("kind", ["tiny-moe", "tiny-qwen-moe", "mla"])
def test_fresh_batch_chunked_and_prefix_match_engine(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 500, (40,), generator=g).tolist()
    prompts = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (5, 23, 9, 60)]
    prompts += [shared + [7, 8, 9], shared + [10, 11]]
    want = _want(model, prompts, 8)
    sched = _sched(model, max_num_seqs=6, max_num_batched_tokens=64, prefix_cache_tokens=256)
    calls = {"fresh": 0}
    orig = sched._prefill_fresh

    def counted(seqs):
        calls["fresh"] += 1
        return orig(seqs)

    sched._prefill_fresh = counted
    # Four arrive together (one padded prefill; the 60-token prompt is chunked), then two that
    # share a 40-token prefix arrive while the first ones decode.
    got = _run(sched, prompts, 8, rounds=[[0, 1, 2, 3], [4], [], [], [5]])
    assert got == want
    assert calls["fresh"] >= 1
    hits = sched.metrics.prefix_hits._value.get()
    assert hits >= 32  # the sixth prompt reused two 16-token blocks of the fifth
    assert all(s is None for s in sched.slots) and sched.host_len == [0] * 6


def test_prefix_cache_eviction_keeps_results_right():
    model = _model("tiny-moe")
    sched = _sched(model, max_num_seqs=2, prefix_cache_tokens=32)  # two blocks only
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 500, (40,), generator=g).tolist() for _ in range(4)]
    prompts += prompts[:2]  # their blocks were evicted or kept: either way the same tokens
    assert _run(sched, prompts, 4, rounds=[[i] for i in range(6)]) == _want(model, prompts, 4)
    assert len(sched.prefix.index) <= 2
