"""CEMA over packed documents (`cu_seqlens`): every document starts from a zero state.

The stream is scattered into a layout where each document starts at a block boundary (padding < T tokens
per document, after its last token), and the chunked scan runs with the carried state reset at every
document's first block. When every row of the input starts a document (the trainer's windows), the rows
stay rows (each padded to the longest), so the block scan is as short as in the unpacked input; otherwise
the layout is one row. Cost: the chunked scan on about total + n_docs * T / 2 tokens, plus one scatter and
one gather. T is the plain path's block size for the scanned row length, lowered for short documents
towards the mean document length but not below 32: smaller blocks make the block scan dominate
(measured in docs/varlen.md).
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
    if block_size is None:
        # The scan runs over every block of a padded row: the whole stream, or one row when rows are kept.
        row_len = L if B > 1 and bool((cu_seqlens % L == 0).sum() == B) else total
        mean_len = max(1, total // max(1, cu_seqlens.numel() - 1))
        block_size = min(default_block_size(row_len), max(32, 1 << (mean_len.bit_length() - 1)))
    T = block_size
    layout = padded_layout(cu_seqlens, total, T, rows=B)
    R = layout.rows
    xp = to_padded(x.reshape(total, D), layout).view(R, -1, D)  # (R, P / R, D)
    lengths = None
    if need_state:  # only the last row's final state is wanted: the one after the stream's last token
        lengths = torch.full((R,), xp.shape[1], device=x.device)
        lengths[-1] = layout.last_slot - (R - 1) * xp.shape[1] + 1
    y, h = cema_chunked(xp, coef, None, lengths, need_state, T, layout.block_start.view(R, -1))
    return from_padded(y.reshape(-1, D), layout).view(B, L, D), (None if h is None else h[-1:])
