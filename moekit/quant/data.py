"""Calibration and evaluation tokens for quantization: a prepared corpus, a corpus name or a text file.

Shape legend: B windows, S window length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.quant.config import QuantError


def _prepared(spec: str, data_dir: str):
    from moekit.data import CORPORA, DataError, load_prepared

    try:
        if (Path(spec) / "prepared.json").is_file():
            return load_prepared(spec)
        if spec in CORPORA:
            return load_prepared(data_dir, corpus=spec)
    except DataError as e:
        raise QuantError(str(e)) from None
    return None


def model_tokenizer(model_dir: str | Path):
    """MODEL/tokenizer.json as a `tokenizers.Tokenizer`, or None."""
    f = Path(model_dir) / "tokenizer.json"
    if not f.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f))


def token_stream(spec: str, *, data_dir: str = "data", split: str = "train", model_dir: str | Path | None = None
                 ) -> np.ndarray:
    """Token ids of `spec`: a prepared corpus directory or name (its `split`), or a .txt/.md/.jsonl
    file (tokenized with MODEL/tokenizer.json)."""
    prep = _prepared(spec, data_dir)
    if prep is not None:
        return np.asarray(prep.memmap(split))
    p = Path(spec)
    if not p.exists():
        raise QuantError(f"calibration data {spec!r}: not a prepared corpus directory, not a corpus name "
                         f"prepared under {data_dir!r}, not a file; run `moekit data prepare` or pass a text file")
    tok = model_tokenizer(model_dir) if model_dir is not None else None
    if tok is None:
        raise QuantError(f"{spec}: a text file needs the model's tokenizer.json beside its weights; "
                         "pass a prepared corpus (--calib data/en-prose-bpe8192) instead")
    from moekit.data import read_user_corpus

    ids: list[int] = []
    for d in read_user_corpus(p):
        ids += tok.encode(d.text).ids
    return np.asarray(ids, dtype=np.int64)


def windows(tokens: np.ndarray, n_tokens: int, seq_len: int, vocab_size: int, what: str = "calibration") -> torch.Tensor:
    """int64 [B, S]: ceil(n_tokens / S) windows of S tokens spread evenly over the stream
    (deterministic: the same data and sizes give the same windows)."""
    S = int(seq_len)
    if len(tokens) < S:
        raise QuantError(f"{what} data has {len(tokens)} tokens, fewer than one window of {S}; use more text "
                         "or a smaller --seq-len")
    B = max(1, -(-int(n_tokens) // S))
    starts = np.linspace(0, len(tokens) - S, num=B).astype(np.int64)
    ids = np.stack([np.asarray(tokens[s:s + S], dtype=np.int64) for s in starts])
    if ids.max() >= vocab_size:
        raise QuantError(f"{what} token id {int(ids.max())} >= model vocab {vocab_size}: the data was tokenized "
                         "with another tokenizer; use the corpus the model was trained on")
    return torch.from_numpy(ids)
