"""Deterministic document-level train/val/test split.

Each document goes to a split by hashing its stable id: ``sha256(salt + ":" + id)``
read as a number ``u`` in [0, 1) is compared with the cumulative fractions.
Consequences that matter downstream:

* the split of a document never depends on the order, number or content of the
  other documents, so e.g. the Wikipedia articles in ``en-prose`` land in the
  same split in ``en-prose-plus``;
* a document is never cut across splits, so no text leaks from train to val/test
  (exact duplicate texts are removed before splitting, see ``corpora.dedupe``).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from moekit.data.errors import DataError
from moekit.data.sources import Document

SPLITS: tuple[str, str, str] = ("train", "val", "test")
#: Default fractions.  2% rather than 1% for val/test so that val of en-prose
#: holds a few hundred KB of text -- enough for a stable bits-per-byte estimate.
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.96, 0.02, 0.02)
DEFAULT_SALT = "moekit-split-v1"


def split_value(doc_id: str, salt: str = DEFAULT_SALT) -> float:
    """The document's position in [0, 1): the top 64 bits of sha256(salt:id)."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers summing to 1."""
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise DataError(f"split fractions must be three non-negative numbers "
                        f"(train, val, test) summing to 1 with train > 0; got {fractions!r}")
    return fr  # type: ignore[return-value]


def assign_split(doc_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                 salt: str = DEFAULT_SALT) -> str:
    """Name of the split (``train``/``val``/``test``) a document id belongs to."""
    u = split_value(doc_id, salt)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def split_documents(docs: Sequence[Document],
                    fractions: Sequence[float] = DEFAULT_FRACTIONS,
                    salt: str = DEFAULT_SALT) -> dict[str, list[Document]]:
    """Split documents into ``{"train": [...], "val": [...], "test": [...]}``.

    Documents keep their input order within a split.  If a split with a non-zero
    fraction comes out empty (only plausible for tiny corpora), the train
    document(s) whose hash value lies closest above the train boundary are moved
    into it, which is still a pure function of the set of ids.  Raises DataError
    when there are too few documents to give every such split one document.
    """
    fr = check_fractions(fractions)
    values = [split_value(d.id, salt) for d in docs]
    cut1, cut2 = fr[0], fr[0] + fr[1]
    names = ["train" if u < cut1 else "val" if u < cut2 else "test" for u in values]

    needed = [s for s, f in zip(SPLITS, fr) if f > 0]
    if len(docs) < len(needed):
        raise DataError(f"the corpus has {len(docs)} document(s) but the split needs at "
                        f"least {len(needed)} ({', '.join(needed)}); add more text.")
    for target in ("val", "test"):
        if fr[SPLITS.index(target)] > 0 and target not in names:
            # Move the train doc with the largest hash value (nearest the val/test
            # region); keep at least one train doc.
            train_idx = [i for i, n in enumerate(names) if n == "train"]
            if len(train_idx) < 2:
                raise DataError(f"the corpus has too few documents ({len(docs)}) to fill "
                                f"the {target} split; add more text.")
            best = max(train_idx, key=lambda i: (values[i], docs[i].id))
            names[best] = target

    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for d, n in zip(docs, names):
        out[n].append(d)
    return out


__all__ = ["SPLITS", "DEFAULT_FRACTIONS", "DEFAULT_SALT", "split_value", "assign_split",
           "split_documents", "check_fractions"]
