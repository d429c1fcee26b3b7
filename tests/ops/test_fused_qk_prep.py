"""Fused q/k preparation (per-head RMS norm, q/k affine, interleaved RoPE) on Triton vs the float64 reference.

Runs on CUDA when present, else on CPU under Triton's interpreter (fixture `triton_device`), on tiny fp32
shapes with non-power-of-two head widths (dz = 6, 10, and an odd 5 without rotation; H = 2, 3) and token
counts that leave a partial last tile (tiles of 64 tokens here). Outputs and the gradients of z, gamma and
beta within relative 1e-5 of the reference in float64 (observed ~1e-7). bf16 at a real width is a `gpu` test.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.ops.fused import qk_prep_reference, qk_prep_triton
from megalodon_lm.ops.fused import triton as fused_triton
from megalodon_lm.ops.rope import rope_inverse_frequencies

F64 = torch.float64
EPS = 1e-5
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero."""
    a, b = a.detach().cpu().to(b.dtype), b.detach().cpu()
    den = b.norm()
    return ((a - b).norm() / den).item() if den > 0 else a.norm().item()


def _case(B: int, L: int, H: int, dz: int, seed: int):
    """Float64 leaves z, gamma, beta and the weights of a linear functional of q and k."""
    g = torch.Generator().manual_seed(seed)
    z = (0.5 + 2.0 * torch.randn(B, L, H, dz, generator=g, dtype=F64)).requires_grad_(True)
    gamma = (0.3 * torch.randn(2, H * dz, generator=g, dtype=F64)).requires_grad_(True)
    beta = (0.3 * torch.randn(2, H * dz, generator=g, dtype=F64)).requires_grad_(True)
    wts = [torch.randn(B, L, H, dz, generator=g, dtype=F64) for _ in range(2)]
    return [z, gamma, beta], wts


def _run(fn, leaves, wts, dtype, device, use_k: bool = True):
    """q, k (float64, CPU) and the gradients of sum(q * w0) [+ sum(k * w1)] for every leaf."""
    args = [t.detach().to(device, dtype).requires_grad_(True) for t in leaves]
    q, k = fn(*args)
    loss = (q.double().cpu() * wts[0]).sum()
    if use_k:
        loss = loss + (k.double().cpu() * wts[1]).sum()
    return q.double().cpu(), k.double().cpu(), torch.autograd.grad(loss, args)


def _check(out, ref):
    assert rel(out[0], ref[0]) <= TOL, "q"
    assert rel(out[1], ref[1]) <= TOL, "k"
    for name, a, b in zip(("z", "gamma", "beta"), out[2], ref[2], strict=True):
        assert rel(a, b) <= TOL, name


@pytest.mark.parametrize(
    ("B", "L", "H", "dz", "rows", "chunk"),
    [(2, 45, 3, 6, "shared", 8), (2, 19, 3, 10, "per_row", 5), (1, 7, 2, 5, "none", 0)],
)
def test_triton_qk_prep_matches_reference(triton_device, B, L, H, dz, rows, chunk):
    """Positions t mod chunk shared by all rows, per-row offsets (o_b + t) mod chunk, or no rotation (at an odd
    head width); the first case's 90 tokens are one full and one partial 64-token tile."""
    leaves, wts = _case(B, L, H, dz, seed=L + dz)
    t = torch.arange(L)
    pos = {"shared": t % max(chunk, 1), "per_row": (t + 3 * torch.arange(B).unsqueeze(1)) % max(chunk, 1),
           "none": None}[rows]
    freqs = None if pos is None else rope_inverse_frequencies(dz, 10000.0)
    ref = _run(lambda z, g, b: qk_prep_reference(z, g, b, EPS, freqs, pos), leaves, wts, F64, "cpu")
    dev = (None, None) if pos is None else (freqs.to(triton_device), pos.to(triton_device))
    out = _run(lambda z, g, b: qk_prep_triton(z, g, b, EPS, *dev, chunk or None), leaves, wts, torch.float32,
               triton_device)
    _check(out, ref)


def test_triton_qk_prep_grid_stride_and_query_only(triton_device, monkeypatch):
    """One backward program per head walks both token tiles (partial parameter sums carried across tiles);
    a loss on q alone (no gradient reaches k); the table size found from the positions."""
    monkeypatch.setattr(fused_triton, "MAX_TOKEN_PROGRAMS", 1)
    B, L, H, dz = 3, 23, 2, 6
    leaves, wts = _case(B, L, H, dz, seed=11)
    freqs = rope_inverse_frequencies(dz, 10000.0)
    pos = torch.arange(L) % 16
    ref = _run(lambda z, g, b: qk_prep_reference(z, g, b, EPS, freqs, pos), leaves, wts, F64, "cpu", use_k=False)
    out = _run(lambda z, g, b: qk_prep_triton(z, g, b, EPS, freqs.to(triton_device), pos.to(triton_device)),
               leaves, wts, torch.float32, triton_device, use_k=False)
    _check(out, ref)


def test_triton_qk_prep_errors(triton_device):
    z = torch.zeros(1, 3, 2, 6, device=triton_device)
    p = torch.zeros(2, 12, device=triton_device)
    freqs = rope_inverse_frequencies(6, 10000.0).to(triton_device)
    with pytest.raises(ValueError, match="gamma and beta"):
        qk_prep_triton(z, p[:, :6], p, EPS)
    with pytest.raises(ValueError, match="positions must be"):
        qk_prep_triton(z, p, p, EPS, freqs, torch.zeros(4, dtype=torch.long, device=triton_device))
    with pytest.raises(ValueError, match="non-negative"):
        qk_prep_triton(z, p, p, EPS, freqs, torch.tensor([0, -1, 2], device=triton_device))
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        qk_prep_triton(z.double(), p.double(), p.double(), EPS)
    q, k = qk_prep_triton(z[:, :0], p, p, EPS, freqs, torch.zeros(0, dtype=torch.long, device=triton_device))
    assert q.shape == k.shape == (1, 0, 2, 6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_qk_prep_bf16_gpu():
    """bf16 z at H = 4, dz = 128, 2 x 3000 tokens, chunk 2048 positions, vs the float64 reference on the
    bf16-rounded inputs: q, k and every gradient within bf16 rounding (relative 1e-2)."""
    from megalodon_lm.ops._triton import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    B, L, H, dz, C = 2, 3000, 4, 128, 2048
    leaves, wts = _case(B, L, H, dz, seed=12)
    leaves[0] = leaves[0].detach().to(torch.bfloat16).double()
    freqs = rope_inverse_frequencies(dz, 10000.0)
    pos = torch.arange(L) % C
    ref = _run(lambda z, g, b: qk_prep_reference(z, g, b, EPS, freqs, pos), leaves, wts, F64, "cpu")
    zb = leaves[0].detach().to("cuda", torch.bfloat16).requires_grad_(True)
    g, b = (t.detach().float().cuda().requires_grad_(True) for t in leaves[1:])
    q, k = qk_prep_triton(zb, g, b, EPS, freqs.cuda(), pos.cuda(), C)
    assert q.dtype == k.dtype == torch.bfloat16
    loss = (q.double().cpu() * wts[0]).sum() + (k.double().cpu() * wts[1]).sum()
    grads = torch.autograd.grad(loss, [zb, g, b])
    assert rel(q, ref[0]) <= 1e-2 and rel(k, ref[1]) <= 1e-2
    for name, a, r in zip(("z", "gamma", "beta"), grads, ref[2], strict=True):
        assert rel(a, r) <= 1e-2, name
