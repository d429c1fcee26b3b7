"""CEMA over packed documents (`cu_seqlens`): every document starts from a zero state.

The stream is scattered into a layout where each document starts at a block boundary (padding < T tokens
per document, after its last token), and the chunked scan runs with the carried state reset at every
document's first block. Cost: the chunked scan on sum_i ceil(len_i / T) * T <= total + n_docs * (T - 1)
tokens (T <= 128), plus one scatter and one gather.
"""

from __future__ import annotations

import torch

from ..varlen import from_padded, padded_layout, to_padded
from .chunk import cema_chunked, default_block_size
from .coefficients import CemaCoefficients


def cema_varlen(
    x: torch.Tensor,
    coef: CemaCoefficients,
    cu_seqlens: torch.Tensor,
    need_state: bool = False,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, L, D) read as one stream of B*L tokens split by cu_seqlens (see ops/varlen.py).

    Returns y (B, L, D) and, if need_state, the final state (1, D, N) of the last document.
    """
    B, L, D = x.shape
    total = B * L
    T = block_size or default_block_size(total)
    layout = padded_layout(cu_seqlens, total, T)
    xp = to_padded(x.reshape(total, D), layout).unsqueeze(0)  # (1, P, D)
    lengths = torch.tensor([layout.last_slot + 1], device=x.device) if need_state else None
    y, h = cema_chunked(xp, coef, None, lengths, need_state, T, layout.block_start.unsqueeze(0))
    return from_padded(y[0], layout).view(B, L, D), h
