"""Data layer: tokenizers, text sources, and cached token corpora with batch sampling.

Typical use::

    tok = load_tokenizer("byte")
    train, val = build_corpora(resolve_sources(["data/"]), tok, cache_dir=".cache/tokens")
    x, y = sample_batch(train, batch_size=8, seq_len=1024, step=0, seed=0)
"""

from .dataset import (
    TokenizedCorpus,
    build_corpora,
    bytes_per_target,
    eval_windows,
    sample_batch,
    sample_eval_windows,
)
from .sources import Document, default_corpus, is_validation_path, iter_documents, resolve_sources
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, save_tokenizer, train_bpe

__all__ = [
    "ByteTokenizer",
    "Document",
    "HFTokenizer",
    "TokenizedCorpus",
    "build_corpora",
    "bytes_per_target",
    "default_corpus",
    "eval_windows",
    "is_validation_path",
    "iter_documents",
    "load_tokenizer",
    "resolve_sources",
    "sample_batch",
    "sample_eval_windows",
    "save_tokenizer",
    "train_bpe",
]
