"""Interleaved rotary position embedding (docs/architecture.md §4.4).

Consecutive pairs (2j, 2j+1) of a head vector form one complex number that is rotated by
pos * freqs[j], freqs[j] = base^(-2j/d). Megalodon restarts positions at every attention chunk, so
callers pass positions modulo the chunk size. Rotation runs in float32 (float64 for float64 inputs)
and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch

from ._dtypes import compute_dtype


def rope_inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies base^(-2j/head_dim)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head width, got {head_dim}")
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)).float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: (B, L, H, d); positions: (L,) or (B, L) integer; freqs: (d/2,) -> rotated x, same dtype."""
    dt = compute_dtype(x)
    angles = positions.to(dt).unsqueeze(-1) * freqs.to(dt)  # (..., L, d/2)
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = torch.cos(angles).unsqueeze(2), torch.sin(angles).unsqueeze(2)  # (B|1, L, 1, d/2)
    pairs = x.to(dt).unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)
