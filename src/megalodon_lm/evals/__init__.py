"""Evaluation harnesses: bits per byte as a function of context length (`megalodon-lm eval ppl`)."""

from .ppl import bpb_vs_context, load_documents, parse_contexts

__all__ = ["bpb_vs_context", "load_documents", "parse_contexts"]
