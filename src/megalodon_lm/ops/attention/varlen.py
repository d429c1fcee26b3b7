"""Chunk attention over packed documents (`cu_seqlens`): each document has its own chunk grid.

Every document is cut into its own chunks (chunk boundaries at doc_start + k*C, RoPE positions restarting
at 0 at each document start), and the pieces are laid out in padded chunks grouped by size
(`ops.varlen.chunk_buckets`): full pieces as C-slot chunks, a short last piece of l tokens in a slot of the
next power of two >= l. Each group is one folded causal SDPA call, exactly as in the plain path: padding
follows every real query of its chunk, so causality hides it and no mask is needed. The real tokens are
gathered back. Cost: at most log2(C) + 1 SDPA calls, over fewer than total + sum_i min(l_i, C) slots.
"""

from __future__ import annotations

import torch

from ..rope import apply_rope
from ..varlen import chunk_buckets
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
    qk = torch.cat([q, k], dim=2).reshape(total, 2 * H, -1)
    vf = v.reshape(total, H, -1)
    layout = chunk_buckets(cu_seqlens, total, chunk_size)
    outs = []
    for bucket in layout.buckets:
        S, P = bucket.size, bucket.src.numel()
        qk_b = apply_rope(qk.index_select(0, bucket.src).unsqueeze(0), torch.arange(P, device=q.device) % S, freqs)
        vb = vf.index_select(0, bucket.src).unsqueeze(0)
        outs.append(_attend_from_offset(qk_b[:, :, :H], qk_b[:, :, H:], vb, None, None, 0, S, dropout_p)[0])
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.index_select(0, layout.slot).view(B, L, H, v.shape[-1])
