"""Pre-tokenize splits once into flat ``uint16`` token files (``<split>.bin``).

Layout of a file: ``EOS doc_1 EOS doc_2 EOS ... doc_n EOS`` -- one leading EOS,
then every document followed by EOS.  Because of the leading EOS, the targets
``tokens[1:]`` contain every token of every document (each predicted with the
document boundary as context) plus one EOS per document, and nothing else, so

    bits_per_byte = sum(NLL over tokens[1:] in nats) / ln(2) / n_bytes

where ``n_bytes`` is the UTF-8 size of the documents' texts (recorded next to
the file; the EOS separators carry no text bytes).  An empty split is an
empty file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from moekit.data.corpora import make_temp
from moekit.data.errors import DataError
from moekit.data.sources import Document
from moekit.data.tokenizer import EOS_TOKEN, encode_documents

TOKEN_DTYPE = np.uint16
#: Documents are encoded in batches of about this many text bytes, which keeps
#: memory flat and lets the progress bar move smoothly even for huge documents.
BATCH_BYTES = 4 << 20


def write_token_file(tok: Tokenizer, docs: Sequence[Document], path: Path, *,
                     progress: bool = True, desc: str | None = None) -> int:
    """Encode ``docs`` and write them to ``path`` as uint16, atomically.

    Args:
        tok: The trained tokenizer (must have ``<|endoftext|>``).
        docs: Documents in the order they are to be stored.
        path: Destination ``.bin`` file.
        progress: Show a tqdm bar (in bytes of text).
        desc: Label of the progress bar.

    Returns:
        Number of tokens written (0 for an empty split).
    """
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise DataError(f"tokenizer has no {EOS_TOKEN} token; retrain it.")
    if tok.get_vocab_size() > np.iinfo(TOKEN_DTYPE).max + 1:
        raise DataError(f"vocabulary of {tok.get_vocab_size()} does not fit in uint16.")
    path = Path(path)
    fd, tmp = make_temp(path)
    n_tokens = 0
    sizes = [len(d.text.encode("utf-8")) for d in docs]
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=desc or path.stem,
               disable=not progress, leave=False)
    try:
        with os.fdopen(fd, "wb") as fh:
            if docs:
                np.array([eos], dtype=TOKEN_DTYPE).tofile(fh)
                n_tokens += 1
            start = 0
            while start < len(docs):
                end, batch_bytes = start, 0
                while end < len(docs) and (end == start or batch_bytes < BATCH_BYTES):
                    batch_bytes += sizes[end]
                    end += 1
                ids = encode_documents(tok, [d.text for d in docs[start:end]])
                eos_arr = np.array([eos], dtype=TOKEN_DTYPE)
                flat = np.concatenate([part for seq in ids for part in
                                       (np.asarray(seq, dtype=TOKEN_DTYPE), eos_arr)])
                flat.tofile(fh)
                n_tokens += flat.size
                bar.update(batch_bytes)
                start = end
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return n_tokens


def read_tokens(path: str | Path) -> np.ndarray:
    """The tokens of a ``.bin`` file as a read-only ``numpy.memmap`` of uint16.

    An empty file (empty split) gives an empty array, since numpy cannot map
    zero bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist; run `moekit data prepare`.")
    size = path.stat().st_size
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise DataError(f"token file {path} has an odd size ({size} bytes): it is "
                        f"corrupt; delete it and run `moekit data prepare` again.")
    if size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def split_documents_from_tokens(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Cut a token file back into per-document id arrays (inverse of the layout)."""
    if tokens.size == 0:
        return []
    bounds = np.flatnonzero(np.asarray(tokens) == eos_id)
    return [np.asarray(tokens[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:])]


__all__ = ["TOKEN_DTYPE", "write_token_file", "read_tokens", "split_documents_from_tokens"]
