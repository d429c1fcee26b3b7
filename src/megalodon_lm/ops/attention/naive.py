"""Readable reference for Megalodon's chunk attention (docs/architecture.md §4.3-4.4).

The sequence is cut into chunks of C tokens; attention is causal inside a chunk and never crosses a
chunk boundary; RoPE positions restart at 0 in every chunk; logits are q.k with no 1/sqrt(d) (that
factor lives in the q/k affine). Softmax in float32 or better.
"""

from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from ..varlen import check_cu_seqlens


def _rope_naive(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE written as complex multiplication, for cross-checking `apply_rope`."""
    dt = compute_dtype(x)
    z = torch.view_as_complex(x.to(dt).unflatten(-1, (-1, 2)).contiguous())  # (B, L, H, d/2)
    rot = torch.polar(torch.ones_like(freqs.to(dt)), positions.to(dt).unsqueeze(-1) * freqs.to(dt))
    return torch.view_as_real(z * rot.unsqueeze(1)).flatten(-2).to(x.dtype)


def chunk_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor, chunk_size: int,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q, k: (B, L, H, dz); v: (B, L, H, dv) -> (B, L, H, dv). Whole sequence from position 0.

    cu_seqlens: packed documents over the B*L tokens (ops/varlen.py): each document attends alone.
    """
    B, L, H, _ = q.shape
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B * L)
        bounds = cu_seqlens.tolist()
        q, k, v = (t.reshape(1, B * L, H, t.shape[-1]) for t in (q, k, v))
        parts = [chunk_attention_naive(q[:, a:b], k[:, a:b], v[:, a:b], freqs, chunk_size)
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat(parts, dim=1).view(B, L, H, v.shape[-1])
    dt = compute_dtype(q)
    out = []
    for start in range(0, L, chunk_size):
        end = min(start + chunk_size, L)
        pos = torch.arange(end - start, device=q.device)
        qc = _rope_naive(q[:, start:end], pos, freqs).to(dt)
        kc = _rope_naive(k[:, start:end], pos, freqs).to(dt)
        scores = torch.einsum("bihd,bjhd->bhij", qc, kc)
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out.append(torch.einsum("bhij,bjhd->bihd", probs, v[:, start:end].to(dt)))
    return torch.cat(out, dim=1).to(v.dtype) if out else v.new_zeros(B, 0, H, v.shape[-1])
