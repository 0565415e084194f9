"""`response_format` json_object / json_schema: grammar-constrained decoding with llguidance.

llguidance (a maintained Rust library, no torch dependency) compiles the JSON schema to a
grammar and, per step, gives the bitmask of tokens that keep the output inside it; the
scheduler masks those rows' logits before sampling and feeds each sampled token back. A
sequence ends when the grammar is complete (its matcher stops). The tokenizer wrapper is built
once per server from the HF `tokenizers` JSON (about a second for a large vocabulary).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import torch

from moekit.serve.errors import APIError

_lock = threading.Lock()


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """Compiles `response_format` into per-sequence matchers for one model's tokenizer."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        self.tok, self.vocab, self.eos = tokenizer, vocab_size, sorted(eos_ids)
        self._ll = None

    def _lltok(self):
        with _lock:
            if self._ll is None:
                import llguidance

                self._ll = llguidance.LLTokenizer(self.tok.to_str(), n_vocab=self.vocab,
                                                  eos_token=self.eos[0] if self.eos else None)
            return self._ll

    def compile(self, rf) -> str | None:
        """The grammar for a `ResponseFormat` (None for plain text); 400 for a bad schema."""
        if rf is None or rf.type == "text":
            return None
        if self.tok is None:
            raise APIError(400, "response_format needs a model with a tokenizer", "response_format")
        if not available():
            raise APIError(400, "response_format needs the llguidance package (pip install llguidance)",
                           "response_format")
        import llguidance

        if rf.type == "json_object":
            schema = {"type": "object"}
        else:
            js = rf.json_schema or {}
            schema = js.get("schema", js.get("schema_"))
            if not isinstance(schema, dict):
                raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON schema object)",
                               "response_format")
        try:
            # Compact JSON (", " / ": " separators, no free whitespace) unless the schema's own
            # "x-guidance" options say otherwise: a weak model otherwise pads with whitespace.
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ",
                                              "key_separator": ": "})
            bad, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._lltok())
        except (ValueError, TypeError) as e:
            raise APIError(400, f"invalid json_schema: {str(e)[:300]}", "response_format") from None
        if bad:
            raise APIError(400, f"invalid json_schema: {'; '.join(msgs)[:300]}", "response_format")
        return grammar

    def matcher(self, grammar: str):
        import llguidance

        m = llguidance.LLMatcher(self._lltok(), grammar, log_level=0)
        if m.is_error():
            raise APIError(400, f"invalid json_schema: {m.get_error()[:300]}", "response_format")
        return m


def mask_logits(logits_RV: torch.Tensor, matchers: list) -> torch.Tensor:
    """Set logits of tokens each row's grammar forbids to -inf (rows without a matcher untouched).

    The allowed-token bitmask (32 tokens per little-endian u32 word) is expanded with shifts here:
    llguidance.torch's helper JIT-compiles on first use (~10 s on this CPU)."""
    logits_RV = logits_RV.float().clone()
    V = logits_RV.shape[-1]
    shifts_32 = torch.arange(32, dtype=torch.int64)
    for i, m in enumerate(matchers):
        if m is None:
            continue
        words_W = torch.from_numpy(np.frombuffer(m.compute_bitmask(), dtype=np.uint32).astype(np.int64))
        allowed_V = ((words_W.unsqueeze(-1) >> shifts_32) & 1).view(-1)[:V].bool()
        if allowed_V.numel() < V:  # ids past the grammar tokenizer's vocabulary are never allowed
            allowed_V = torch.cat([allowed_V, allowed_V.new_zeros(V - allowed_V.numel())])
        logits_RV[i].masked_fill_(~allowed_V, float("-inf"))
    return logits_RV
