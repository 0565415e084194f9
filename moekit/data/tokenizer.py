"""Byte-level BPE tokenizer (HF ``tokenizers``), trained on the train split only.

Byte-level means every UTF-8 string is representable (no unknown token) and
``decode(encode(text)) == text`` exactly, which bits-per-byte evaluation
relies on.  The tokenizer is a single ``tokenizer.json`` so it can be copied
next to a model checkpoint and reloaded with :func:`load_tokenizer`.

Special tokens get the lowest ids: ``<|endoftext|>`` (id 0) separates
documents in the pre-tokenized data, ``<|pad|>`` (id 1) is for padded batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.data.corpora import atomic_write_bytes
from moekit.data.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)
DEFAULT_VOCAB_SIZE = 8192
#: Token ids are stored as uint16, and the vocabulary must hold the 256 byte
#: symbols plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 65536


def check_vocab_size(vocab_size: int) -> int:
    """Validate a requested vocabulary size (8192-16384 is the intended range)."""
    if not isinstance(vocab_size, int) or not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(f"vocab_size must be an integer in [{MIN_VOCAB_SIZE}, "
                        f"{MAX_VOCAB_SIZE}] (ids are stored as uint16); got {vocab_size!r}")
    return vocab_size


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the GPT-2 pre-tokenization regex.

    ``add_prefix_space=False`` and no normalizer: anything else would change the
    text and break exact round trips.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                    n_texts: int | None = None, min_frequency: int = 2,
                    show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: Training documents (only the train split, to keep val/test unseen).
        vocab_size: Target vocabulary size including the special tokens.  A small
            corpus may end up with fewer tokens (no more merges to learn).
        n_texts: Number of texts, for the progress bar only.
        min_frequency: A pair must occur this often to be merged.
        show_progress: Show the ``tokenizers`` progress bar.
    """
    check_vocab_size(vocab_size)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS), show_progress=show_progress,
        # All 256 byte symbols, even ones absent from train, so that any text
        # (e.g. the OOD sets, user prompts) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=n_texts)
    if tok.token_to_id(EOS_TOKEN) != 0:  # the data format relies on it
        raise DataError("internal error: <|endoftext|> did not get token id 0")
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Save as ``tokenizer.json`` atomically."""
    atomic_write_bytes(Path(path), tok.to_str(pretty=False).encode("utf-8"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (or the one inside a prepared data directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}; run `moekit data prepare` first.")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise DataError(f"could not load tokenizer {path}: {exc}") from None


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, treating special-token strings as plain text.

    With ``encode_special_tokens`` on, a literal ``<|endoftext|>`` inside a
    document is encoded as ordinary bytes, so the EOS id only ever appears as
    the separator we insert (the flag is not saved in tokenizer.json, hence set
    here).
    """
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = False


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """Decode ids to text, keeping special tokens (so EOS separators stay visible)."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)


def iter_texts(docs: Iterable[object]) -> Iterator[str]:
    """The ``.text`` of each document (helper for ``train_tokenizer``)."""
    for d in docs:
        yield d.text  # type: ignore[attr-defined]


__all__ = ["EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "DEFAULT_VOCAB_SIZE",
           "check_vocab_size", "new_tokenizer", "train_tokenizer", "save_tokenizer",
           "load_tokenizer", "encode_documents", "decode", "iter_texts"]
