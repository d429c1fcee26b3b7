"""Chunk attention over packed documents (`cu_seqlens`): each document has its own chunk grid.

Every document is scattered into its own run of whole chunks (padding at its end, < C per document), so
chunk boundaries fall at doc_start + k*C and RoPE positions restart at 0 at each document start; then the
ordinary folded causal SDPA runs on all chunks at once (the padding follows every real query of its chunk,
so causality hides it; no mask is needed) and the real tokens are gathered back. When every document is
shorter than C, the chunk is shrunk to the longest document (same result: each document is one chunk).
Cost: attention over sum_i ceil(len_i / C') * C' tokens, C' = min(C, longest document).
"""

from __future__ import annotations

import torch

from ..rope import apply_rope
from ..varlen import check_cu_seqlens, from_padded, padded_layout, to_padded
from .chunk import _attend_from_offset


def chunk_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    freqs: torch.Tensor,
    chunk_size: int,
    cu_seqlens: torch.Tensor,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q, k: (B, L, H, dz) un-rotated; v: (B, L, H, dv); the B*L tokens split by cu_seqlens -> (B, L, H, dv)."""
    B, L, H, _ = q.shape
    total = B * L
    check_cu_seqlens(cu_seqlens, total)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    C = min(chunk_size, longest)
    layout = padded_layout(cu_seqlens, total, C)
    qk = to_padded(torch.cat([q, k], dim=2).reshape(total, 2 * H, -1), layout).unsqueeze(0)  # (1, P, 2H, dz)
    pos = torch.arange(layout.padded_len, device=q.device) % C
    qk = apply_rope(qk, pos, freqs)  # one rotation for q and k
    vp = to_padded(v.reshape(total, H, -1), layout).unsqueeze(0)
    out = _attend_from_offset(qk[:, :, :H], qk[:, :, H:], vp, None, None, 0, C, dropout_p)
    return from_padded(out[0], layout).view(B, L, H, v.shape[-1])
