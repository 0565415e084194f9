"""Shared by tests/test_train.py, test_telemetry.py and test_compare.py: a few KB of English-like
text prepared into a tiny corpus (no network), and a tiny MoE sized to its vocabulary."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

SUBJECTS = ["the king", "a ship", "the river", "the old sailor", "our nation", "the city", "a scholar", "the army"]
VERBS = ["crossed", "praised", "built", "watched", "defended", "described", "left", "found"]
OBJECTS = ["the bridge", "a distant shore", "the northern hills", "its people", "the great library", "the harbor"]
TAILS = ["in the spring.", "before the war.", "with great care.", "for many years.", "at dawn.", "without a word."]


def write_corpus(path: Path, n_docs: int = 60, seed: int = 0) -> Path:
    """About 12 KB: documents of grammatical sentences separated by blank lines."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        sents = [f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}"
                 for _ in range(rng.randint(2, 4))]
        docs.append(f"Document {d}. " + " ".join(sents))
    path.mkdir(parents=True, exist_ok=True)
    f = path / "corpus.txt"
    f.write_text("\n\n".join(docs) + "\n")
    return f


def tiny_data(tmp: Path):
    from moekit.data import prepare

    corpus = write_corpus(tmp / "text")
    return prepare(str(corpus), data_dir=tmp / "data", vocab_size=320, split_fractions=(0.6, 0.2, 0.2), ood=(),
                   text_chunk_bytes=200, progress=False)


def tiny_model(data, preset: str = "tiny-moe", seed: int = 0, **moe_changes):
    import dataclasses

    from moekit import build_model, get_preset

    cfg = get_preset(preset).replace(vocab_size=data.vocab_size, max_seq_len=64)
    if moe_changes:
        cfg = cfg.replace(moe=dataclasses.replace(cfg.moe, **moe_changes))
    return build_model(cfg, seed=seed)


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact replays need a fixed reduction order: pin torch to one thread per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
