"""OpenAI response bodies and stream chunks, assembled from scheduler `Event`s.

Choice index = prompt index x n + choice (OpenAI's order for batched prompts). Usage counts each
prompt once, completion tokens per choice; with `stream_options.include_usage` one extra chunk
with `choices: []` carries the same totals as the non-streamed body.
"""

from __future__ import annotations

import json
import time

from moekit.serve.scheduler import Event
from moekit.serve.text import TextCodec


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Builder:
    def __init__(self, rid: str, model: str, chat: bool, codec: TextCodec, n_choices: int,
                 prompts: list[list[int]], n: int, echo: list[str] | None, logprobs: bool,
                 token_ids: bool = False):
        self.rid, self.model, self.chat, self.codec = rid, model, chat, codec
        self.created = int(time.time())
        self.prompts, self.n, self.echo, self.want_lp = prompts, n, echo, logprobs
        self.text = [""] * n_choices
        self.lp: list[list] = [[] for _ in range(n_choices)]
        self.finish: list[str | None] = [None] * n_choices
        self.routed: list = [None] * n_choices
        self.completion = [0] * n_choices
        self.cached = [0] * n_choices
        self.started = [False] * n_choices
        self.offset = [0] * n_choices
        self.want_ids = token_ids
        self.ids: list[list[int]] = [[] for _ in range(n_choices)]

    # ------------------------------------------------------------ logprobs
    def _tok(self, t: int) -> str:
        return self.codec.token_text(t)

    def _lp_entry(self, i: int, ev: Event):
        if not self.want_lp or ev.token is None or ev.logprob is None:
            return None
        s = self._tok(ev.token)
        top = [(self._tok(t), lp) for t, lp in (ev.top or [])]
        if self.chat:
            return {"token": s, "logprob": ev.logprob, "bytes": list(s.encode("utf-8", "replace")),
                    "top_logprobs": [{"token": ts, "logprob": lp, "bytes": list(ts.encode("utf-8", "replace"))}
                                     for ts, lp in top]}
        off = self.offset[i]
        self.offset[i] += len(s)
        return {"token": s, "logprob": ev.logprob, "top": dict(top), "offset": off}

    def _lp_block(self, entries: list):
        if not self.want_lp:
            return None
        if self.chat:
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [e["top"] for e in entries], "text_offset": [e["offset"] for e in entries]}

    # ------------------------------------------------------------ non-stream
    def _record(self, ev: Event):
        i = ev.index
        entry = self._lp_entry(i, ev)
        if ev.token is not None:
            self.ids[i].append(ev.token)
        if entry is not None:
            self.lp[i].append(entry)
        if ev.finish is not None:
            self.finish[i] = ev.finish
            self.completion[i] = ev.completion_tokens
            self.cached[i] = ev.cached_tokens
            self.routed[i] = ev.routed_experts
        return entry

    def add(self, ev: Event) -> None:
        self._record(ev)
        self.text[ev.index] += ev.text

    def _prefix(self, i: int) -> str:
        return self.echo[i // self.n] if self.echo is not None else ""

    def _choice_extra(self, i: int) -> dict:
        out = {} if self.routed[i] is None else {"routed_experts": self.routed[i]}
        if self.want_ids:
            out.update(token_ids=self.ids[i], prompt_token_ids=self.prompts[i // self.n])
        return out

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        comp = sum(self.completion)
        cached = sum(max(self.cached[k * self.n:(k + 1) * self.n], default=0) for k in range(len(self.prompts)))
        return {"prompt_tokens": prompt, "completion_tokens": comp, "total_tokens": prompt + comp,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def final(self) -> dict:
        choices = []
        for i in range(len(self.text)):
            lp = self._lp_block(self.lp[i])
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": self.text[i]},
                                "logprobs": lp, "finish_reason": self.finish[i], **self._choice_extra(i)})
            else:
                choices.append({"index": i, "text": self._prefix(i) + self.text[i], "logprobs": lp,
                                "finish_reason": self.finish[i], **self._choice_extra(i)})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    # ------------------------------------------------------------ stream
    def _chunk(self, choice: dict) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": None}

    def chunks(self, ev: Event) -> list[dict]:
        i = ev.index
        entry = self._record(ev)
        out = []
        text = ev.text
        if not self.started[i]:
            self.started[i] = True
            if self.chat:
                out.append(self._chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}))
            else:
                text = self._prefix(i) + text
        if not text and entry is None and ev.finish is None:
            return out
        lp = self._lp_block([entry] if entry is not None else [])
        if self.chat:
            c = {"index": i, "delta": {"content": text} if text or ev.finish is None else {}, "logprobs": lp,
                 "finish_reason": ev.finish}
        else:
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish}
        if ev.finish is not None:
            c.update(self._choice_extra(i))
        out.append(self._chunk(c))
        return out

    def usage_chunk(self) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
