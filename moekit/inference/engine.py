"""The generation engine: token ids in, token ids out, over a preallocated KV cache.

Shape legend: B batch rows, S prompt length after right-padding, N max new tokens, V vocabulary.

A batch of ragged prompts is right-padded and prefilled in one forward, taking each row's logits
at its own last valid position (`logits_at`); the cache then advances by each row's true length,
so every row's next token lands right after its own prompt (the padding slots are overwritten and
never attended). Decode runs one token per row per step; rows that finish keep their slot (their
outputs are masked) so the batch shape never changes, and the loop checks on the host whether all
rows are done only every `check_every` steps (or every step when streaming, which needs the
tokens on the host anyway).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch

from moekit.errors import MoekitError
from moekit.inference.sampling import SamplingParams, sample
from moekit.moe.layer import pack_experts as pack_all
from moekit.precision import apply_inference_policy
from moekit.utils import retain_freed_memory


class ContextLengthError(MoekitError):
    """A prompt does not fit the model's context window."""


FinishReason = Literal["stop", "length", "context"]


@dataclass
class Generation:
    """One prompt's result."""

    prompt: list[int]
    tokens: list[int]
    """Generated ids, without the stop token that ended them."""
    finish_reason: FinishReason
    stop_token: int | None = None


@dataclass
class GenerationStats:
    """Timings of the last `generate` call (seconds; one forward each for prefill and each step)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    step_s: list[float] = field(default_factory=list)
    """Wall time of each decode step (only when `time_steps=True`: timing needs a device sync)."""


TokenCallback = Callable[[int, int], None]
"""on_token(row, token_id): called for each new token of each unfinished row, in order."""


class Engine:
    """Batched generation for any moekit `Transformer` (dense, MoE, MLA)."""

    def __init__(self, model, max_batch_size: int = 64, check_every: int = 8, pack_experts: bool = False,
                 precision: str = "auto", skip_beta: float = 0.0, skip_alpha: float = 0.0):
        # The compute-dtype policy (moekit.precision): with "auto", bf16/fp16 weights on a device
        # without native bf16 compute in fp32 (bf16 matmuls there run 3-100x slower), the big
        # matrices kept in bf16 where the kernels widen them in registers; an explicit
        # "bf16"/"fp32" casts to it (with a warning where bf16 is slow).
        self.precision = apply_inference_policy(model, precision)
        self.model = model.eval()
        # Packed expert weights (moekit.pack_experts): the outer-product CPU kernel runs every MoE
        # layer in one call at any batch size, faster than the row-major kernel and oneDNN/MKL from
        # 8 tokens per expert; costs as much memory again as the expert weights.
        self.packed_bytes = pack_all(model) if pack_experts else 0
        if skip_beta or skip_alpha:  # NAEE / PESF expert skipping (moekit.memory.skip)
            from moekit.memory.skip import set_skipping

            set_skipping(model, beta=skip_beta, alpha=skip_alpha)
        self.cfg = model.config
        # Prefill allocates and frees multi-MB activations per layer; with glibc's defaults each is a
        # fresh mmap paying a page fault per 4 KiB (a Mixtral-style MoE block at 2048 tokens: 150 ms
        # -> 99 ms per call with freed memory kept). Process-wide; MOEKIT_RETAIN_MEMORY=0 opts out.
        retain_freed_memory()
        self.max_batch_size = max_batch_size
        self.check_every = check_every
        self.stats = GenerationStats()

    # ------------------------------------------------------------------ public
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[int], params: SamplingParams | None = None,
                 on_token: TokenCallback | None = None, time_steps: bool = False) -> list[Generation]:
        """Generate for each prompt (lists of token ids); batches of up to `max_batch_size` rows."""
        params = params or SamplingParams()
        params.validate()
        if len(prompts) and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as a flat list of ids
        prompts = [list(map(int, p)) for p in prompts]
        self._check_prompts(prompts)
        gen = None
        if not params.greedy:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        self.stats = GenerationStats(prompt_tokens=sum(len(p) for p in prompts))
        results: list[Generation] = []
        # Balance losses and router entropy are training/eval values: skip them while generating.
        moe = [layer for layer in self.model.moe_layers() if hasattr(layer, "loss_stats")]
        saved = [layer.loss_stats for layer in moe]
        try:
            for layer in moe:
                layer.loss_stats = False
            for start in range(0, len(prompts), self.max_batch_size):
                chunk = prompts[start:start + self.max_batch_size]
                cb = None if on_token is None else (lambda r, t, s=start: on_token(r + s, t))
                results.extend(self._generate_batch(chunk, params, gen, cb, time_steps))
        finally:
            for layer, v in zip(moe, saved):
                layer.loss_stats = v
        return results

    # ---------------------------------------------------------------- internals
    def _check_prompts(self, prompts: list[list[int]]) -> None:
        limit, vocab = self.cfg.max_seq_len, self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ContextLengthError(f"prompt {i} is empty; give at least one token (e.g. a BOS id)")
            if len(p) > limit:
                raise ContextLengthError(
                    f"prompt {i} has {len(p)} tokens but the model's context limit (max_seq_len) is {limit}; "
                    f"shorten the prompt to at most {limit} tokens")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise MoekitError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab}); "
                                  "check that the tokenizer matches the model")

    def prefill(self, cache, ids_BS: torch.Tensor, lens_B: torch.Tensor) -> torch.Tensor:
        """Write right-padded prompts into `cache`; logits [B, V] at each row's last valid token."""
        out = self.model(ids_BS, cache=cache, logits_at=lens_B - 1)
        cache.advance(lens_B)
        return out.logits[:, -1]

    def decode_step(self, cache, tok_B: torch.Tensor) -> torch.Tensor:
        """Append one token per row; logits [B, V] for the next one."""
        out = self.model(tok_B.unsqueeze(1), cache=cache)
        cache.advance(1)
        return out.logits[:, -1]

    def sync_tokens(self, tok_B: torch.Tensor) -> torch.Tensor:
        """The tokens every row continues with, after sampling; the identity here. A hook for engines
        whose processes must agree on every token (expert parallel: `moekit.distributed.infer`
        broadcasts rank 0's)."""
        return tok_B

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, gen: torch.Generator | None,
                        on_token: TokenCallback | None, time_steps: bool) -> list[Generation]:
        # Plan:
        # 1. right-pad the prompts, size the cache to the longest prompt + max_new_tokens (capped
        #    at the context limit), prefill and sample the first token of every row;
        # 2. decode step by step: sample on device, mask finished rows, mark stop tokens;
        # 3. copy the generated block to the host once and cut each row at its stop token.
        dev = self.model.device
        B, S = len(prompts), max(len(p) for p in prompts)
        max_len = min(S + params.max_new_tokens, self.cfg.max_seq_len)
        # The first token needs no cache slot (it comes from the prefill logits): hence the +1.
        steps = min(params.max_new_tokens, max_len - S + 1)
        lens_B = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=dev)
        ids_BS = torch.zeros(B, S, dtype=torch.int64, device=dev)
        for b, p in enumerate(prompts):
            ids_BS[b, :len(p)] = torch.tensor(p, dtype=torch.int64)
        seen_BV = None
        if params.repetition_penalty != 1.0:
            valid_BS = torch.arange(S, device=dev).unsqueeze(0) < lens_B.unsqueeze(1)
            seen_BV = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=dev)
            seen_BV.scatter_(1, ids_BS, valid_BS)
            # Padding used id 0: undo its mark in rows whose real prompt lacks token 0.
            seen_BV[:, 0] = ((ids_BS == 0) & valid_BS).any(1)
        stop_ids = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.int64, device=dev)
        out_BN = torch.zeros(B, steps, dtype=torch.int64, device=dev)
        done_B = torch.zeros(B, dtype=torch.bool, device=dev)

        t0 = time.perf_counter()
        cache = self.model.new_cache(B, max_len)
        logits_BV = self.prefill(cache, ids_BS, lens_B)
        n_done = 0
        step = 0
        t_dec = None
        for step in range(steps):
            ts = time.perf_counter()
            if step > 0:
                logits_BV = self.decode_step(cache, out_BN[:, step - 1])
            tok_B = self.sync_tokens(sample(logits_BV, params, gen, seen_BV))
            out_BN[:, step] = tok_B
            if time_steps and step > 0:
                _sync(dev)
                self.stats.step_s.append(time.perf_counter() - ts)
            if step == 0:
                _sync(dev)
                t_dec = time.perf_counter()
                self.stats.prefill_s += t_dec - t0
            if seen_BV is not None:
                seen_BV.scatter_(1, tok_B.unsqueeze(1), True)
            if on_token is not None:
                live = (~done_B).tolist()
                for b, t in enumerate(tok_B.tolist()):
                    if live[b] and t not in params.stop_token_ids:
                        on_token(b, t)
            if stop_ids.numel():
                done_B |= torch.isin(tok_B, stop_ids)
                if on_token is not None or (step + 1) % self.check_every == 0:
                    n_done = int(done_B.sum())
                    if n_done == B:
                        break
        _sync(dev)
        self.stats.decode_s += time.perf_counter() - (t_dec if t_dec is not None else t0)

        out = out_BN[:, :step + 1].tolist()
        results = []
        stop_set = set(params.stop_token_ids)
        for b, p in enumerate(prompts):
            row = out[b]
            cut = next((i for i, t in enumerate(row) if t in stop_set), None)
            if cut is not None:
                results.append(Generation(p, row[:cut], "stop", row[cut]))
            else:
                reason: FinishReason = "length" if len(row) >= params.max_new_tokens else "context"
                results.append(Generation(p, row, reason))
            self.stats.generated_tokens += len(results[-1].tokens)
        return results


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def generate(model, prompts: Sequence[Sequence[int]], **sampling) -> list[Generation]:
    """One-call convenience: `generate(model, [[1, 2, 3]], max_new_tokens=8, temperature=0.7, seed=0)`."""
    return Engine(model).generate(prompts, SamplingParams(**sampling))
