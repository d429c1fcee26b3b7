"""Rotary embedding: real-arithmetic fast path vs the complex-multiplication reference; interleaved pairs.

Tolerances: float64 comparisons 1e-14 (relative / absolute as stated); bf16 to bf16 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from megalodon_lm.ops import apply_rope, rope_inverse_frequencies
from megalodon_lm.ops.attention.naive import _rope_naive

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_inverse_frequencies():
    """freqs[j] = base^(-2j/d) (float32), and an odd head width is rejected."""
    d, base = 8, 500.0
    f = rope_inverse_frequencies(d, base)
    assert f.dtype == torch.float32 and f.shape == (d // 2,)
    expected = torch.tensor([base ** (-2 * j / d) for j in range(d // 2)], dtype=F64)
    assert torch.allclose(f.double(), expected, rtol=1e-7, atol=0)
    with pytest.raises(ValueError):
        rope_inverse_frequencies(7, base)


@pytest.mark.parametrize("d", [2, 8])
def test_apply_rope_matches_complex_reference(d):
    """apply_rope == _rope_naive (complex multiplication) in float64, positions (L,): rel 1e-14."""
    B, L, H = 2, 11, 3
    g = torch.Generator().manual_seed(d)
    x = torch.randn(B, L, H, d, generator=g, dtype=F64)
    pos = torch.randint(0, 1000, (L,), generator=g)
    freqs = rope_inverse_frequencies(d, 10000.0)
    y = apply_rope(x, pos, freqs)
    assert y.dtype == F64 and y.shape == x.shape
    assert rel(y, _rope_naive(x, pos, freqs)) <= 1e-14
    # rotations preserve the norm of every pair
    assert torch.allclose(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1),
                          rtol=1e-13, atol=0)


def test_apply_rope_per_row_positions():
    """positions (B, L): each row rotated by its own positions (== the (L,) call on that row), 1e-14."""
    B, L, H, d = 3, 5, 2, 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, H, d, generator=g, dtype=F64)
    pos = torch.randint(0, 64, (B, L), generator=g)
    freqs = rope_inverse_frequencies(d, 10000.0)
    y = apply_rope(x, pos, freqs)
    for b in range(B):
        assert rel(y[b : b + 1], _rope_naive(x[b : b + 1], pos[b], freqs)) <= 1e-14


def test_interleaved_pairing():
    """Only elements 0 and 1 non-zero at position p: they rotate as one complex number by p*freqs[0]
    (interleaved layout, not NeoX half-split); all other elements stay exactly zero. Tol 1e-14 abs."""
    d, L, p = 8, 6, 5
    freqs = rope_inverse_frequencies(d, 10.0)  # small base: freqs differ strongly between pairs
    x = torch.zeros(1, L, 1, d, dtype=F64)
    a, b = 0.7, -1.3
    x[0, p, 0, 0], x[0, p, 0, 1] = a, b
    y = apply_rope(x, torch.arange(L), freqs)
    ang = p * float(freqs[0])
    expected = torch.zeros(d, dtype=F64)
    expected[0] = a * math.cos(ang) - b * math.sin(ang)
    expected[1] = a * math.sin(ang) + b * math.cos(ang)
    assert torch.allclose(y[0, p, 0], expected, rtol=0, atol=1e-14)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, p, 0, :2] = False
    assert bool((y[mask] == 0).all())
    # the second pair uses freqs[1]
    x2 = torch.zeros(1, L, 1, d, dtype=F64)
    x2[0, p, 0, 2] = 1.0
    y2 = apply_rope(x2, torch.arange(L), freqs)
    ang1 = p * float(freqs[1])
    assert abs(y2[0, p, 0, 2].item() - math.cos(ang1)) <= 1e-14
    assert abs(y2[0, p, 0, 3].item() - math.sin(ang1)) <= 1e-14


def test_position_zero_is_identity():
    x = torch.randn(2, 1, 3, 4, dtype=F64)
    assert torch.equal(apply_rope(x, torch.zeros(1, dtype=torch.long), rope_inverse_frequencies(4, 1e4)), x)


def test_bf16_rotated_in_float32():
    """bf16 input: bf16 output equal to the float32 rotation rounded (elementwise <= 2^-8 rel + 1e-6)."""
    B, L, H, d = 2, 9, 2, 8
    g = torch.Generator().manual_seed(3)
    xb = torch.randn(B, L, H, d, generator=g).to(torch.bfloat16)
    pos = torch.arange(L) * 37
    freqs = rope_inverse_frequencies(d, 10000.0)
    yb = apply_rope(xb, pos, freqs)
    assert yb.dtype == torch.bfloat16
    y32 = apply_rope(xb.float(), pos, freqs)
    assert bool(((yb.float() - y32).abs() <= 2.0**-8 * y32.abs() + 1e-6).all())
