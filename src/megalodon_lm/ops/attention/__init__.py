"""Megalodon chunk attention ops: naive reference and the SDPA fast path with a streaming cache."""

from .chunk import chunk_attention
from .naive import chunk_attention_naive

__all__ = ["chunk_attention", "chunk_attention_naive"]
