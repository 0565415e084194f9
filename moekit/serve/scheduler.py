"""Continuous batching: one worker thread runs the model; HTTP handlers talk to it through queues.

Shape legend: N slots (max running sequences), M slot length (max model length), V vocabulary,
K experts per token.

The KV cache is the model's own preallocated `KVCache` with one row ("slot") per running sequence.
Each iteration (vLLM's iteration-level scheduling):
1. take new sequences and aborts from the thread-safe inbox; drop timed-out and cancelled ones
   (their slot is free for this very iteration);
2. admit waiting sequences into free slots (fcfs, or priority: lower value first, ties by
   arrival), loading any cached prompt prefix into the slot;
3. one decode forward over slots [0, hi) for every sequence past prefill (rows still prefilling
   or empty get a dummy token whose cache write is overwritten later and whose length is not
   advanced);
4. prefill chunks of the admitted sequences with what is left of the token budget (chunked
   prefill, one forward per chunk); a sequence whose prompt is done samples its first token;
5. send each sequence its new token (text delta, logprobs, routed experts at the end) through
   its sink, finish and free slots, update metrics.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np
import torch

from moekit.model.attention import KVCache
from moekit.serve.metrics import Metrics
from moekit.serve.prefix_cache import PrefixCache
from moekit.serve.sampler import RowParams, sample_rows
from moekit.serve.text import Detokenizer, TextCodec

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    """Scheduler settings; the defaults fit a 2-core CPU."""

    max_num_seqs: int = 8
    """Slots: sequences decoded together."""
    max_num_batched_tokens: int = 512
    """Token budget per iteration (decode tokens + prefill chunk tokens)."""
    max_model_len: int | None = None
    """Context per sequence (prompt + output); default the model's max_seq_len capped at 4096."""
    max_queue: int = 64
    """Waiting sequences before new requests get 429."""
    policy: Literal["fcfs", "priority"] = "fcfs"
    request_timeout_s: float = 600.0
    prefix_cache_tokens: int = 4096
    """Prefix-cache pool size in tokens (0 = off)."""
    prefix_block: int = 16


@dataclass
class Event:
    """What a sink receives: one new token of a sequence, or its end (`finish` set), or an error."""

    index: int
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    routed_experts: list | None = None


@dataclass
class SeqParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    return_routed_experts: bool = False
    priority: int = 0


class QueueFull(Exception):
    pass


_ids = itertools.count()


class Seq:
    """One choice of one request, from arrival to finish."""

    def __init__(self, prompt: list[int], params: SeqParams, sink: Callable[[Event], None], index: int,
                 codec: TextCodec):
        self.id = next(_ids)
        self.prompt, self.params, self.sink, self.index = prompt, params, sink, index
        self.arrival = time.monotonic()
        self.slot: int | None = None
        self.cached = 0  # prompt tokens in the slot's cache
        self.hit_tokens = 0
        self.tokens: list[int] = []
        self.detok = Detokenizer(codec, params.stop)
        self.routed: list | None = [] if params.return_routed_experts else None
        self.first_t = self.last_t = None
        self.matcher = None  # llguidance matcher when the request has a response_format grammar
        self.cancelled = False
        self.done = False
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                     else random.getrandbits(63))

    @property
    def prefilling(self) -> bool:
        return self.cached < len(self.prompt)


class Scheduler:
    def __init__(self, model, codec: TextCodec, cfg: ServeConfig, metrics: Metrics):
        self.model, self.codec, self.cfg, self.metrics = model, codec, cfg, metrics
        mcfg = model.config
        self.max_len = cfg.max_model_len or min(mcfg.max_seq_len, 4096)
        self.vocab = mcfg.vocab_size
        self.dev = model.device
        self.cache = model.new_cache(cfg.max_num_seqs, self.max_len)
        self.host_len = [0] * cfg.max_num_seqs
        self.slots: list[Seq | None] = [None] * cfg.max_num_seqs
        self.prefix = PrefixCache(self.cache.layers, cfg.prefix_cache_tokens, cfg.prefix_block)
        self.counts_NV: torch.Tensor | None = None  # generated-token counts, for penalties
        self.moe_idx = [i for i, b in enumerate(model.layers) if b.is_moe]
        self.n_experts = mcfg.moe.num_experts if self.moe_idx else 0
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[tuple] = []  # heap of (priority key, arrival order, seq)
        self.n_waiting = 0  # read by HTTP threads for admission control
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.dead: str | None = None
        self.thread = threading.Thread(target=self._run, name="moekit-serve-worker", daemon=True)

    # ------------------------------------------------------------ HTTP side
    def start(self) -> None:
        self.thread.start()

    def submit(self, seqs: list[Seq]) -> None:
        """Queue a request's sequences together, or raise QueueFull (the caller answers 429)."""
        if self.dead:
            raise RuntimeError(self.dead)
        with self.lock:
            if self.n_waiting + len(seqs) > self.cfg.max_queue:
                raise QueueFull()
            self.n_waiting += len(seqs)
        self.inbox.put(("add", seqs))

    def abort(self, seqs: list[Seq]) -> None:
        """Cancel sequences (client gone): their slots are freed at the start of the next step."""
        for s in seqs:
            s.cancelled = True
        self.inbox.put(("wake", None))

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop_event.set()
        self.inbox.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    def load(self) -> dict:
        running = sum(s is not None for s in self.slots)
        return {"running": running, "waiting": self.n_waiting, "slots": len(self.slots)}

    # ---------------------------------------------------------- worker side
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        for layer in self.model.moe_layers():
            layer.loss_stats = False  # balance losses are training values
        try:
            with torch.inference_mode():
                while not self.stop_event.is_set():
                    busy = any(s is not None for s in self.slots) or self.waiting
                    self._intake(block=not busy)
                    self._step()
        except Exception as e:  # the engine is dead: fail everything, /health says 503
            log.exception("serve worker died")
            self.dead = f"engine failed: {type(e).__name__}: {str(e)[:200]}"
            for s in [s for s in self.slots if s is not None] + [w[2] for w in self.waiting]:
                s.done = True
                s.sink(Event(s.index, error=self.dead))
        finally:
            for s in [s for s in self.slots if s is not None] + [w[2] for w in self.waiting]:
                if not s.done:
                    s.sink(Event(s.index, finish="abort"))

    def _intake(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, seqs = item
            if kind == "add":
                for s in seqs:
                    key = s.params.priority if self.cfg.policy == "priority" else 0
                    heapq.heappush(self.waiting, (key, s.id, s))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _finish(self, s: Seq, reason: str) -> None:
        if s.done:
            return
        s.done = True
        now = time.monotonic()
        m = self.metrics
        if reason == "abort":
            m.aborted.inc()
        m.success.labels(m.model_name, reason).inc()
        m.observe_e2e(now - s.arrival)
        s.sink(Event(s.index, text=s.detok.flush(final=True), finish=reason, prompt_tokens=len(s.prompt),
                     completion_tokens=len(s.tokens), cached_tokens=s.hit_tokens, routed_experts=s.routed))
        if s.slot is not None:
            self.slots[s.slot] = None
            self.host_len[s.slot] = 0
            self.cache.lengths[s.slot] = 0
            s.slot = None

    def _step(self) -> None:
        cfg, now = self.cfg, time.monotonic()
        # 1. drop cancelled / timed-out sequences (running and waiting)
        for s in self.slots:
            if s is not None and (s.cancelled or now - s.arrival > cfg.request_timeout_s):
                self._finish(s, "abort")
        if any(w[2].cancelled or now - w[2].arrival > cfg.request_timeout_s for w in self.waiting):
            keep = []
            for w in self.waiting:
                if w[2].cancelled or now - w[2].arrival > cfg.request_timeout_s:
                    self._finish(w[2], "abort")
                else:
                    keep.append(w)
            heapq.heapify(keep)
            with self.lock:
                self.n_waiting -= len(self.waiting) - len(keep)
            self.waiting = keep
        # 2. admission
        while self.waiting and None in self.slots:
            _, _, s = heapq.heappop(self.waiting)
            with self.lock:
                self.n_waiting -= 1
            self._admit(s, self.slots.index(None), now)
        running = [s for s in self.slots if s is not None]
        m = self.metrics
        m.running.set(len(running))
        m.waiting.set(len(self.waiting))
        if not running:
            m.kv_usage.set(0.0)
            return
        budget = cfg.max_num_batched_tokens
        # 3. decode
        dec = [s for s in running if not s.prefilling]
        if dec:
            self._decode(dec)
            budget -= len(dec)
        # 4. chunked prefill; a full decode batch still lets one block through (no starvation).
        budget = max(budget, cfg.prefix_block)
        used = cfg.max_num_batched_tokens - budget
        pending = sorted((s for s in running if s.prefilling and not s.done), key=lambda s: s.id)
        # Whole prompts starting from an empty slot go together in one padded forward (a burst of
        # arrivals costs one prefill, not one per request); the rest go one chunk at a time.
        fresh, padded = [], 0
        for s in pending:
            n = len(s.prompt)
            if s.cached or max(padded, n) * (len(fresh) + 1) > budget:
                break
            fresh.append(s)
            padded = max(padded, n)
        if len(fresh) > 1:
            self._prefill_fresh(fresh)
            budget -= padded * len(fresh)
            pending = pending[len(fresh):]
        for s in pending:
            n = min(len(s.prompt) - s.cached, budget)
            if n <= 0:
                break
            self._prefill(s, n)
            budget -= n
        m.iteration_tokens.observe(used + max(0, cfg.max_num_batched_tokens - used - budget))
        m.kv_usage.set(sum(self.host_len) / (len(self.slots) * self.max_len))
        m.running.set(sum(s is not None for s in self.slots))

    def _admit(self, s: Seq, slot: int, now: float) -> None:
        s.slot = slot
        self.slots[slot] = s
        self.metrics.queue_time.observe(now - s.arrival)
        blocks = self.prefix.lookup(s.prompt)
        n = self.prefix.load(self.cache.layers, slot, blocks)
        if self.prefix.enabled:
            self.metrics.prefix_queries.inc(len(s.prompt))
            self.metrics.prefix_hits.inc(n)
        s.cached = s.hit_tokens = n
        self.host_len[slot] = n
        self.cache.lengths[slot] = n
        if s.routed is not None and n:
            s.routed.extend([None] * n)  # routing of cached tokens was not recomputed
        if s.params.presence_penalty or s.params.frequency_penalty:
            if self.counts_NV is None:
                self.counts_NV = torch.zeros(len(self.slots), self.vocab, dtype=torch.int32)
        if self.counts_NV is not None:
            self.counts_NV[slot] = 0
        self.metrics.prompt_tokens.inc(len(s.prompt))

    def _view(self, lo: int, hi: int) -> KVCache:
        v = KVCache([tuple(t[lo:hi] for t in st) for st in self.cache.layers], 0, self.max_len, self.dev)
        v.lengths = self.cache.lengths[lo:hi]
        v.seen = max(self.host_len[lo:hi])
        return v

    def _forward(self, ids_BS: torch.Tensor, view: KVCache, logits_at: torch.Tensor | None):
        out = self.model(ids_BS, cache=view, logits_at=logits_at, return_routing_ids=bool(self.moe_idx))
        ids = [out.routing[i].expert_ids for i in self.moe_idx]  # each [B*S, K]
        return out.logits[:, -1], (torch.stack(ids) if ids else None)  # [L, B*S, K]

    def _decode(self, dec: list[Seq]) -> None:
        hi = max(s.slot for s in dec) + 1
        tok_B = torch.zeros(hi, dtype=torch.int64)
        adv_B = torch.zeros(hi, dtype=torch.int64)
        rows = [s.slot for s in dec]
        tok_B[rows] = torch.tensor([s.tokens[-1] for s in dec])
        adv_B[rows] = 1
        view = self._view(0, hi)
        logits_BV, ids_LBK = self._forward(tok_B.view(hi, 1), view, None)
        view.lengths += adv_B
        for r in rows:
            self.host_len[r] += 1
        if ids_LBK is not None:
            self._record_routing(ids_LBK[:, rows], dec, [1] * len(dec))
        self._sample_and_emit(dec, logits_BV[rows])

    def _prefill(self, s: Seq, n: int) -> None:
        c0 = s.cached
        view = self._view(s.slot, s.slot + 1)
        ids = torch.tensor(s.prompt[c0:c0 + n], dtype=torch.int64).view(1, n)
        logits_1V, ids_LSK = self._forward(ids, view, torch.tensor([n - 1]))
        view.lengths += n
        self.host_len[s.slot] += n
        s.cached += n
        if ids_LSK is not None:
            self._record_routing(ids_LSK, [s], [n])
        if not s.prefilling:
            self.prefix.store(self.cache.layers, s.slot, s.prompt)
            self._sample_and_emit([s], logits_1V)

    def _prefill_fresh(self, seqs: list[Seq]) -> None:
        """Prefill several whole prompts into empty slots with one right-padded forward on a scratch
        cache (an empty-cache prefill only writes keys, never reads them), then copy each row's
        keys and values into its slot."""
        B, S = len(seqs), max(len(s.prompt) for s in seqs)
        lens = [len(s.prompt) for s in seqs]
        ids_BS = torch.zeros(B, S, dtype=torch.int64)
        for b, s in enumerate(seqs):
            ids_BS[b, :lens[b]] = torch.tensor(s.prompt)
        scratch = self.model.new_cache(B, S)
        logits_BV, ids_LTK = self._forward(ids_BS, scratch, torch.tensor(lens) - 1)
        for st, sc in zip(self.cache.layers, scratch.layers):
            for t, u in zip(st, sc):
                for b, s in enumerate(seqs):
                    if t.dim() == 4:
                        t[s.slot, :, :lens[b]] = u[b, :, :lens[b]]
                    else:
                        t[s.slot, :lens[b]] = u[b, :lens[b]]
        for b, s in enumerate(seqs):
            self.cache.lengths[s.slot] = lens[b]
            self.host_len[s.slot] = lens[b]
            s.cached = lens[b]
        if ids_LTK is not None:
            L, _, K = ids_LTK.shape
            per_row = ids_LTK.view(L, B, S, K)
            valid = torch.cat([per_row[:, b, :lens[b]] for b in range(B)], dim=1)
            self._record_routing(valid, seqs, lens)
        for s in seqs:
            self.prefix.store(self.cache.layers, s.slot, s.prompt)
        self._sample_and_emit(seqs, logits_BV)

    def _record_routing(self, ids_LTK: torch.Tensor, seqs: list[Seq], n_tok: list[int]) -> None:
        L, _, K = ids_LTK.shape
        flat = ids_LTK + (torch.arange(L) * self.n_experts).view(L, 1, 1)
        counts = torch.bincount(flat.reshape(-1), minlength=L * self.n_experts).view(L, self.n_experts)
        self.metrics.routing.add(counts.numpy())
        if any(s.routed is not None for s in seqs):
            per_tok = ids_LTK.permute(1, 0, 2).tolist()  # [T, L, K]
            t = 0
            for s, n in zip(seqs, n_tok):
                if s.routed is not None:
                    s.routed.extend(per_tok[t:t + n])
                t += n

    def _sample_and_emit(self, seqs: list[Seq], logits_RV: torch.Tensor) -> None:
        rows = [RowParams(s.params.temperature, s.params.top_p, s.params.top_k, s.params.presence_penalty,
                          s.params.frequency_penalty, s.params.logprobs, s.gen) for s in seqs]
        counts = None
        if self.counts_NV is not None and any(r.presence_penalty or r.frequency_penalty for r in rows):
            counts = self.counts_NV[[s.slot for s in seqs]]
        if any(s.matcher is not None for s in seqs):
            from moekit.serve.grammar import mask_logits

            logits_RV = mask_logits(logits_RV, [s.matcher for s in seqs])
        out = sample_rows(logits_RV, rows, counts)
        now = time.monotonic()
        m = self.metrics
        for i, (s, t) in enumerate(zip(seqs, out.tokens)):
            if s.first_t is None:
                s.first_t = now
                m.observe_ttft(now - s.arrival)
            else:
                m.itl.observe(now - s.last_t)
            s.last_t = now
            m.observe_tokens(1)
            if self.counts_NV is not None:
                self.counts_NV[s.slot, t] += 1
            p = s.params
            if t in p.stop_token_ids or (not p.ignore_eos and t in self.codec.stop_ids):
                self._finish(s, "stop")
                continue
            s.tokens.append(t)
            hit = s.detok.add(t)
            if s.matcher is not None:
                s.matcher.consume_token(t)
                if s.matcher.is_stopped() or s.matcher.is_error():
                    hit = ""  # the grammar is complete: stop here
            lp = None if out.logprobs is None else out.logprobs[i]
            top = None if out.top is None else out.top[i]
            if hit is not None:
                s.sink(Event(s.index, token=t, logprob=lp, top=top))
                self._finish(s, "stop")
            elif len(s.tokens) >= p.max_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
                s.sink(Event(s.index, token=t, logprob=lp, top=top))
                self._finish(s, "length")
            else:
                s.sink(Event(s.index, text=s.detok.flush(final=False), token=t, logprob=lp, top=top))


def routing_array(routed: list) -> np.ndarray:
    """Routed experts as an int array [tokens, moe layers, K] (-1 for prefix-cache hits)."""
    rows = [r for r in routed if r is not None]
    if not rows:
        return np.zeros((0, 0, 0), dtype=np.int64)
    L, K = len(rows[0]), len(rows[0][0])
    return np.array([r if r is not None else [[-1] * K] * L for r in routed], dtype=np.int64)
