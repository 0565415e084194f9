"""Data pipeline of moekit: corpora, split, byte-level BPE tokenizer, token files.

Typical use::

    from moekit.data import prepare
    data = prepare("en-prose", data_dir="data", vocab_size=8192)
    train = data.dataset("train")
    sampler = train.sampler(batch_size=32, seq_len=256, seed=0)
    x, y = next(sampler)            # int64 [32, 256]; resume via sampler.state_dict()
    val_bpb = data.dataset("val").bits_per_byte(total_nll_nats)

See :func:`prepare` for the corpora and the on-disk layout.
"""

from moekit.data.corpora import CORPORA, CorpusSpec, read_user_corpus
from moekit.data.errors import DataError
from moekit.data.loader import BatchSampler, TokenDataset, iter_eval_batches
from moekit.data.pipeline import PreparedData, SplitInfo, load_prepared, prepare, prepare_cli
from moekit.data.pretokenize import read_tokens, write_token_file
from moekit.data.sources import SOURCES, Document
from moekit.data.split import DEFAULT_FRACTIONS, assign_split, split_documents
from moekit.data.tokenizer import (DEFAULT_VOCAB_SIZE, EOS_TOKEN, PAD_TOKEN, decode,
                                   encode_documents, load_tokenizer, train_tokenizer)

__all__ = [
    "BatchSampler", "CORPORA", "CorpusSpec", "DEFAULT_FRACTIONS", "DEFAULT_VOCAB_SIZE",
    "DataError", "Document", "EOS_TOKEN", "PAD_TOKEN", "PreparedData", "SOURCES",
    "SplitInfo", "TokenDataset", "assign_split", "decode", "encode_documents",
    "iter_eval_batches", "load_prepared", "load_tokenizer", "prepare", "prepare_cli",
    "read_tokens",
    "read_user_corpus", "split_documents", "train_tokenizer", "write_token_file",
]
