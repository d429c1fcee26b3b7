"""Shared small model for the generation tests."""

from __future__ import annotations

import functools

import torch

from megalodon_lm import MegalodonConfig, MegalodonLM

# Chunk 8: prompts and decodes cross several attention-chunk boundaries.
SMALL = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=128, chunk_size=8,
             norm_num_groups=8)


@functools.cache
def small_model(**overrides) -> MegalodonLM:
    """A seeded eval-mode model (cached: tests must not change its weights)."""
    torch.manual_seed(0)
    return MegalodonLM(MegalodonConfig.from_preset("nano", **{**SMALL, **overrides})).eval()
