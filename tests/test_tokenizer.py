"""Tokenizer and token-file tests: exact round trips, EOS handling, uint16 layout."""

from __future__ import annotations

import random

import numpy as np
import pytest

from moekit.data import DataError, Document, EOS_TOKEN, decode, encode_documents, \
    load_tokenizer, read_tokens, train_tokenizer, write_token_file
from moekit.data.pretokenize import split_documents_from_tokens
from moekit.data.tokenizer import check_vocab_size, save_tokenizer

WORDS = ("the of and to in a is that for it as was with be by on not he this are or "
         "café naïve Zürich 東京 日本語 Ελληνικά русский 🙂 👍🏽 — “quoted” 'single'").split()

SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand CRLF\r",
    "unicode: café naïve Zürich 東京 Ελληνικά русский",
    "emoji: 🙂 👍🏽 👨‍👩‍👧‍👦 and a combining e\u0301 and NFD A\u030a",
    "never-seen bytes: \x00\x01\x7f \u200b zero-width, \ufffd replacement, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "special token text <|endoftext|> and <|pad|> inside a document",
    "",
    " ",
    "1234567890 3.14159 -42 0x1F",
]


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=400, show_progress=False)


def test_special_tokens_have_lowest_ids(tok):
    assert tok.token_to_id(EOS_TOKEN) == 0
    assert tok.token_to_id("<|pad|>") == 1
    assert 258 < tok.get_vocab_size() <= 400


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tok, text):
    ids = encode_documents(tok, [text])[0]
    assert decode(tok, ids) == text


def test_round_trip_random_unicode(tok):
    rng = random.Random(1)
    pool = [chr(c) for c in (*range(32, 127), *range(0xA0, 0x2FF), *range(0x4E00, 0x4E40),
                             0x1F600, 0x1F680, 0x10348, 0x0A, 0x09)]
    for _ in range(50):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 200)))
        assert decode(tok, encode_documents(tok, [text])[0]) == text


def test_literal_special_token_is_plain_text(tok):
    ids = encode_documents(tok, ["a <|endoftext|> b"])[0]
    assert 0 not in ids  # only inserted separators may be EOS
    assert decode(tok, ids) == "a <|endoftext|> b"
    # The setting is restored afterwards: normal encoding still sees the token.
    assert 0 in tok.encode("<|endoftext|>").ids


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    again = load_tokenizer(tmp_path)  # a directory works too
    for text in SAMPLES:
        assert encode_documents(again, [text]) == encode_documents(tok, [text])
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("bad", [100, 257, 65537, 8192.0, "8192"])
def test_vocab_size_validation(bad):
    with pytest.raises(DataError, match="vocab_size"):
        check_vocab_size(bad)


def test_token_file_layout_and_decode(tok, tmp_path):
    texts = _corpus(30, seed=5) + ["unicode 東京 🙂", "x"]
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
    path = tmp_path / "train.bin"
    n = write_token_file(tok, docs, path, progress=False)
    arr = read_tokens(path)
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and len(arr) == n
    assert path.stat().st_size == 2 * n
    assert arr[0] == 0 and arr[-1] == 0
    assert int((arr == 0).sum()) == len(docs) + 1
    pieces = split_documents_from_tokens(arr, 0)
    assert [decode(tok, p) for p in pieces] == texts
    # The whole stream decodes to the documents joined by EOS.
    assert decode(tok, arr) == EOS_TOKEN + "".join(t + EOS_TOKEN for t in texts)


def test_token_file_batches_across_batch_boundary(tok, tmp_path, monkeypatch):
    import moekit.data.pretokenize as pt
    monkeypatch.setattr(pt, "BATCH_BYTES", 50)  # force many encode batches
    docs = [Document(str(i), t) for i, t in enumerate(_corpus(20, seed=9))]
    n_small = write_token_file(tok, docs, tmp_path / "a.bin", progress=False)
    monkeypatch.setattr(pt, "BATCH_BYTES", 1 << 30)
    n_big = write_token_file(tok, docs, tmp_path / "b.bin", progress=False)
    assert n_small == n_big
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_empty_split_is_empty_array(tok, tmp_path):
    path = tmp_path / "val.bin"
    assert write_token_file(tok, [], path, progress=False) == 0
    arr = read_tokens(path)
    assert arr.size == 0 and arr.dtype == np.uint16
    assert split_documents_from_tokens(arr, 0) == []


def test_read_tokens_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_tokens(tmp_path / "nope.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="corrupt"):
        read_tokens(odd)
