"""Rotary embedding holder: the `freqs` buffer shared by all layers (reference name `rope.freqs`)."""

from __future__ import annotations

import torch.nn as nn

from ..ops.rope import rope_inverse_frequencies


class RotaryEmbedding(nn.Module):
    """Holds the (dz/2,) inverse frequencies. Like the reference, the buffer follows `model.to(dtype)`."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("freqs", rope_inverse_frequencies(head_dim, base))
