"""The generation engine: ragged batches, cache equivalence, sampling, stopping, limits, CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit.errors import MoekitError
from moekit.inference import ContextLengthError, Engine, SamplingError, SamplingParams
from moekit.inference.sampling import apply_repetition_penalty, filter_top_k_top_p, sample

PRESETS = ["tiny-moe", "tiny-dense", "tiny-deepseek", "tiny-qwen-moe", "tiny-mla"]


def _config(name: str) -> moekit.ModelConfig:
    if name == "tiny-mla":
        # DeepSeek-style latent attention with its compressed cache (no tiny preset ships one).
        return dataclasses.replace(moekit.get_preset("tiny-deepseek"), attention="mla", q_lora_rank=32,
                                   kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    return moekit.get_preset(name)


_MODELS: dict[str, torch.nn.Module] = {}


def _model(name: str):
    if name not in _MODELS:
        _MODELS[name] = moekit.build_model(_config(name), seed=0).eval()
    return _MODELS[name]


def _prompts(vocab: int, lengths, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy_full_forward(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", PRESETS)
def test_ragged_batch_equals_each_prompt_alone(name):
    model = _model(name)
    prompts = _prompts(model.config.vocab_size, (5, 17, 1, 9))
    params = SamplingParams(max_new_tokens=10)
    eng = Engine(model)
    batch = eng.generate(prompts, params)
    for p, b in zip(prompts, batch):
        assert b.tokens == eng.generate([p], params)[0].tokens
        assert len(b.tokens) == 10 and b.finish_reason == "length"


@pytest.mark.parametrize("name", PRESETS)
def test_cached_decode_equals_full_forward(name):
    model = _model(name)
    prompts = _prompts(model.config.vocab_size, (7, 3), seed=2)
    out = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8))
    for p, g in zip(prompts, out):
        assert g.tokens == _greedy_full_forward(model, p, 8)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-mla"])
def test_cached_logits_match_full_forward(name):
    """Logits, not just argmax: prefill + per-token decode through the cache vs one full forward."""
    model = _model(name)
    ids = torch.tensor(_prompts(model.config.vocab_size, (12,), seed=3))
    with torch.no_grad():
        full = model(ids).logits[0]
        eng = Engine(model)
        cache = model.new_cache(1, 16)
        got = [eng.prefill(cache, ids[:, :6], torch.tensor([6]))[0]]
        for t in range(6, 12):
            got.append(eng.decode_step(cache, ids[:, t])[0])
    torch.testing.assert_close(torch.stack(got[:-1]), full[5:11], rtol=1e-4, atol=1e-4)


def test_seeded_sampling_is_reproducible():
    model = _model("tiny-moe")
    prompts = _prompts(model.config.vocab_size, (4, 6))
    eng = Engine(model)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7)
    a, b = eng.generate(prompts, p), eng.generate(prompts, p)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    c = eng.generate(prompts, dataclasses.replace(p, seed=8))
    assert [g.tokens for g in a] != [g.tokens for g in c]


def test_stop_tokens_and_max_tokens_are_respected():
    model = _model("tiny-moe")
    prompts = _prompts(model.config.vocab_size, (5, 8, 3))
    eng = Engine(model, check_every=2)
    free = eng.generate(prompts, SamplingParams(max_new_tokens=12))
    assert all(len(g.tokens) == 12 and g.finish_reason == "length" for g in free)
    # Stop on the 4th token of row 0: row 0 ends there, the other rows are unaffected unless
    # they produce the same token (then they must stop at its first occurrence too).
    stop = free[0].tokens[3]
    out = eng.generate(prompts, SamplingParams(max_new_tokens=12, stop_token_ids=[stop]))
    for f, g in zip(free, out):
        if stop in f.tokens:
            cut = f.tokens.index(stop)
            assert g.tokens == f.tokens[:cut] and g.finish_reason == "stop" and g.stop_token == stop
        else:
            assert g.tokens == f.tokens and g.finish_reason == "length"


def test_streaming_callback_sees_every_token_in_order():
    model = _model("tiny-moe")
    prompts = _prompts(model.config.vocab_size, (5, 8))
    eng = Engine(model)
    free = eng.generate(prompts, SamplingParams(max_new_tokens=6))
    stop = free[1].tokens[2]
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = eng.generate(prompts, SamplingParams(max_new_tokens=6, stop_token_ids=[stop]),
                       on_token=lambda r, t: seen[r].append(t))
    assert [seen[0], seen[1]] == [g.tokens for g in out]


def test_prompt_longer_than_context_is_a_clear_error():
    model = _model("tiny-moe")
    limit = model.config.max_seq_len
    with pytest.raises(ContextLengthError, match="context limit"):
        Engine(model).generate([[1] * (limit + 1)])
    with pytest.raises(MoekitError, match="outside the vocabulary"):
        Engine(model).generate([[model.config.vocab_size]])
    with pytest.raises(SamplingError):
        Engine(model).generate([[1]], SamplingParams(top_p=0.0))


def test_generation_stops_at_the_context_limit():
    model = _model("tiny-moe")
    limit = model.config.max_seq_len
    out = Engine(model).generate([[1] * (limit - 3)], SamplingParams(max_new_tokens=10))[0]
    assert len(out.tokens) == 4 and out.finish_reason == "context"


def test_batches_larger_than_max_batch_size_are_split():
    model = _model("tiny-dense")
    prompts = _prompts(model.config.vocab_size, (3, 4, 5, 6, 7))
    params = SamplingParams(max_new_tokens=5)
    assert ([g.tokens for g in Engine(model, max_batch_size=2).generate(prompts, params)]
            == [g.tokens for g in Engine(model).generate(prompts, params)])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.floats(0.05, 1.0), st.integers(0, 1000))
def test_top_k_top_p_keep_the_best_token_and_at_most_k(top_k, top_p, seed):
    logits_BV = torch.randn(3, 40, generator=torch.Generator().manual_seed(seed))
    out_BV = filter_top_k_top_p(logits_BV, top_k, top_p)
    kept_B = torch.isfinite(out_BV).sum(-1)
    assert (kept_B >= 1).all()
    if top_k:
        assert (kept_B <= top_k).all()
    best_B = logits_BV.argmax(-1)
    assert torch.isfinite(out_BV.gather(1, best_B[:, None])).all()
    # Nucleus: with top_p < 1 the kept tokens are exactly the smallest most-likely prefix whose mass
    # reaches top_p (applied after top-k, on the renormalised survivors): tokens outside it are dropped.
    topk_BV = filter_top_k_top_p(logits_BV, top_k, 1.0)
    for b in range(3):
        probs_V = topk_BV[b].softmax(-1)
        order = probs_V.argsort(descending=True)
        cum = probs_V[order].cumsum(0)
        n_keep = int((cum < top_p).sum()) + 1 if top_p < 1.0 else int(torch.isfinite(topk_BV[b]).sum())
        n_keep = min(n_keep, int(torch.isfinite(topk_BV[b]).sum()))
        want = torch.zeros(40, dtype=torch.bool)
        want[order[:n_keep]] = True
        assert torch.equal(torch.isfinite(out_BV[b]), want), (b, n_keep)


def test_top_p_drops_the_tail_and_matches_transformers():
    from transformers import TopPLogitsWarper

    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.8), 0.85 keeps three.
    logits_1V = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_top_k_top_p(logits_1V, 0, 0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits_1V, 0, 0.85)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_top_k_top_p(logits_1V, 0, 0.4)).tolist() == [[True, False, False, False]]
    logits_BV = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 2
    for top_p in (0.3, 0.6, 0.9):
        ref_BV = TopPLogitsWarper(top_p)(None, logits_BV.clone())
        assert torch.equal(torch.isfinite(filter_top_k_top_p(logits_BV, 0, top_p)), torch.isfinite(ref_BV))
    # Sampling never returns a token outside the nucleus.
    p = SamplingParams(temperature=1.0, top_p=0.7)
    draws = {int(sample(logits_1V.repeat(500, 1), p, torch.Generator().manual_seed(3))[i]) for i in range(500)}
    assert draws == {0, 1}


def test_repetition_penalty_matches_transformers_and_the_engine_applies_it():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits_BV = torch.randn(2, 30, generator=torch.Generator().manual_seed(0))
    seen_ids = torch.tensor([[1, 5, 7, 5], [0, 2, 29, 3]])
    seen_BV = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, seen_ids, True)
    for pen in (1.3, 0.7):
        ref_BV = RepetitionPenaltyLogitsProcessor(pen)(seen_ids, logits_BV.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits_BV, seen_BV, pen), ref_BV)
    # > 1 lowers every seen token's probability relative to every unseen one; unseen logits unchanged.
    out_BV = apply_repetition_penalty(logits_BV, seen_BV, 1.5)
    assert (out_BV[seen_BV] < logits_BV[seen_BV]).all() and torch.equal(out_BV[~seen_BV], logits_BV[~seen_BV])
    # End to end: greedy decoding with a penalty equals a full-forward loop that penalises every id of the
    # prompt and of the output so far (ragged prompts: the padding must not count as seen).
    model = _model("tiny-moe")
    prompts = _prompts(model.config.vocab_size, (6, 2, 9))
    plain = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8))
    for pen in (3.0, 0.05):  # 0.05 strongly favours seen tokens: the output must change
        got = Engine(model).generate(prompts, SamplingParams(max_new_tokens=8, repetition_penalty=pen))
        proc = RepetitionPenaltyLogitsProcessor(pen)
        for prompt, g in zip(prompts, got):
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(8):
                    logits_1V = model(torch.tensor([ids])).logits[:, -1].float()
                    ids.append(int(proc(torch.tensor([ids]), logits_1V).argmax()))
            assert g.tokens == ids[len(prompt):]
    assert [g.tokens for g in got] != [g.tokens for g in plain]


def test_generate_cli_streams_and_writes_jsonl(tmp_path, capsys):
    from moekit.cli import main

    assert main(["generate", "tiny-moe", "--prompt", "1 2 3", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and all(t.isdigit() for t in printed)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": p}) for p in ([1, 2], [3, 4, 5], [6])) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "tiny-moe", "--prompts-file", str(prompts), "--batch-size", "2",
                 "--max-new-tokens", "4", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_ids"] for r in rows] == [[1, 2], [3, 4, 5], [6]]
    assert all(len(r["token_ids"]) == 4 for r in rows)
    model = moekit.build_model(moekit.get_preset("tiny-moe"), seed=0).eval()
    assert rows[1]["token_ids"] == _greedy_full_forward(model, [3, 4, 5], 4)


def test_generate_cli_bad_input_is_one_line(tmp_path, capsys):
    from moekit.cli import main

    assert main(["generate", "tiny-moe", "--prompt", "1 x 3"]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_generation_restores_moe_loss_stats():
    """The engine switches off balance-loss bookkeeping while generating, and only then."""
    model = _model("tiny-deepseek")
    Engine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert all(layer.loss_stats for layer in model.moe_layers())
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]]))
    assert all(r.entropy > 0 for r in out.routing if r is not None)
