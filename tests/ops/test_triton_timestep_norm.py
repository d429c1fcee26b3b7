"""TimestepNorm Triton kernels vs the float64 Welford reference: outputs, final statistics, every gradient.

Runs on CUDA when present, else on CPU under Triton's interpreter (fixture `triton_device`), on tiny fp32
shapes. Lengths straddle the 32-token chunk: 1, 7, 33, 64, 65. Inputs have mean 5 and std 3 (a far-from-zero
mean exercises the shifted sums). Tolerances: fp32 kernels vs float64 reference, relative 2e-6 on outputs
and statistics, 2e-5 on gradients (observed ~1e-7). bf16 at a real width is a `gpu` test.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.ops import timestep_norm, timestep_norm_naive
from megalodon_lm.ops.timestep_norm.triton import timestep_norm_triton

F64 = torch.float64
EPS = 1e-5
TOL_OUT, TOL_GRAD = 2e-6, 2e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero."""
    a, b = a.detach().cpu().to(b.dtype), b.detach().cpu()
    den = b.norm()
    return ((a - b).norm() / den).item() if den > 0 else a.norm().item()


def _case(B: int, L: int, D: int, G: int, seed: int, counts: list[int]):
    """Float64 leaves x, weight, bias, mean0, var0; counts; and weights of a linear functional of all outputs."""
    g = torch.Generator().manual_seed(seed)
    x = (5.0 + 3.0 * torch.randn(B, L, D, generator=g, dtype=F64)).requires_grad_(True)
    weight = (0.3 * torch.randn(D, generator=g, dtype=F64)).requires_grad_(True)
    bias = (0.3 * torch.randn(D, generator=g, dtype=F64)).requires_grad_(True)
    mean = (5.0 + torch.randn(B, G, generator=g, dtype=F64)).requires_grad_(True)
    var = (0.5 + 9.0 * torch.rand(B, G, generator=g, dtype=F64)).requires_grad_(True)
    count = torch.tensor(counts, dtype=torch.long)
    wts = [torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, G, generator=g, dtype=F64),
           torch.randn(B, G, generator=g, dtype=F64)]
    return [x, weight, bias, mean, var], count, wts


def _run(fn, leaves, count, valid, wts, G, dtype, device):
    x, weight, bias, mean, var = (t.to(device, dtype) for t in leaves)
    v = None if valid is None else valid.to(device)
    y, c, m, s = fn(x, weight, bias, G, EPS, count.to(device), mean, var, v)
    y, m, s = y.double().cpu(), m.double().cpu(), s.double().cpu()
    loss = (y * wts[0]).sum() + (m * wts[1]).sum() + (s * wts[2]).sum()
    return y, c.cpu(), m, s, torch.autograd.grad(loss, leaves)


def _check(out, ref):
    assert rel(out[0], ref[0]) <= TOL_OUT, "y"
    assert torch.equal(out[1], ref[1]), "count"
    assert rel(out[2], ref[2]) <= TOL_OUT, "mean"
    assert rel(out[3], ref[3]) <= TOL_OUT, "var"
    for name, a, b in zip(("x", "weight", "bias", "mean", "var"), out[4], ref[4], strict=True):
        assert rel(a, b) <= TOL_GRAD, name


@pytest.mark.parametrize(
    ("L", "counts", "padded"),
    [(1, [0, 3], False), (7, [4, 0], True), (33, [0, 0], False), (64, [2, 7], True), (65, [0, 9], True)],
)
def test_triton_timestep_norm_matches_naive(triton_device, L, counts, padded):
    """B=2, D=8, G=2, 32-token chunks; right padding to lengths (L, L//2 + 1); fresh and counted priors."""
    B, D, G = 2, 8, 2
    leaves, count, wts = _case(B, L, D, G, seed=L, counts=counts)
    valid = torch.arange(L) < torch.tensor([L, L // 2 + 1]).unsqueeze(1) if padded else None
    ref = _run(timestep_norm_naive, leaves, count, valid, wts, G, F64, "cpu")
    out = _run(lambda *a: timestep_norm_triton(*a, chunk=32), leaves, count, valid, wts, G, torch.float32,
               triton_device)
    _check(out, ref)


def test_triton_timestep_norm_general_mask_and_empty_rows(triton_device):
    """A mask with holes, a row with no real token and a fresh prior (stats kept, gradients pass straight
    to mean0/var0), a row with no real token and a counted prior; 8-token chunks, default chunking."""
    B, L, D, G = 3, 19, 6, 3
    leaves, count, wts = _case(B, L, D, G, seed=3, counts=[2, 0, 5])
    g = torch.Generator().manual_seed(4)
    valid = torch.rand(B, L, generator=g) < 0.6
    valid[1:] = False
    ref = _run(timestep_norm_naive, leaves, count, valid, wts, G, F64, "cpu")
    for chunk in (8, 0):
        out = _run(lambda *a, chunk=chunk: timestep_norm_triton(*a, chunk=chunk), leaves, count, valid, wts, G,
                   torch.float32, triton_device)
        _check(out, ref)


def test_triton_timestep_norm_large_mean_precision(triton_device):
    """Mean-1000, std-1 data over 200 tokens (7 chunks): no cancellation in the running variance."""
    B, L, D, G = 1, 200, 4, 1
    g = torch.Generator().manual_seed(5)
    x = 1000.0 + torch.randn(B, L, D, generator=g, dtype=F64)
    w, b = torch.zeros(D, dtype=F64), torch.zeros(D, dtype=F64)
    count, mean, var = torch.zeros(B, dtype=torch.long), torch.zeros(B, G, dtype=F64), torch.ones(B, G, dtype=F64)
    y_ref, _, m_ref, v_ref = timestep_norm_naive(x, w, b, G, EPS, count, mean, var)
    y, _, m, v = timestep_norm_triton(*(t.float().to(triton_device) for t in (x, w, b)), G, EPS,
                                      count.to(triton_device), *(t.float().to(triton_device) for t in (mean, var)),
                                      chunk=32)
    assert rel(v, v_ref) <= 1e-4 and rel(m, m_ref) <= 1e-6
    assert (y.double().cpu() - y_ref)[:, 1:].abs().max() <= 1e-3  # token 0: var 0, y = 0 / sqrt(eps) in both


def test_triton_timestep_norm_empty_sequence(triton_device):
    leaves, count, _ = _case(2, 0, 4, 2, seed=6, counts=[3, 0])
    x, w, b, m, v = (t.detach().float().to(triton_device) for t in leaves)
    y, c, m2, v2 = timestep_norm_triton(x, w, b, 2, EPS, count.to(triton_device), m, v)
    assert y.shape == (2, 0, 4) and torch.equal(c.cpu(), count)
    assert torch.equal(m2, m) and torch.equal(v2, v)


def test_triton_timestep_norm_dispatch_and_errors(triton_device, monkeypatch):
    """MEGALODON_NORM_IMPL=triton agrees with prefix; bad names and indivisible groups raise ValueError."""
    leaves, count, _ = _case(2, 9, 8, 2, seed=7, counts=[0, 4])
    x, w, b, m, v = (t.detach().float().to(triton_device) for t in leaves)
    c = count.to(triton_device)
    monkeypatch.setenv("MEGALODON_NORM_IMPL", "triton")
    out_t = timestep_norm(x, w, b, 2, EPS, c, m, v)
    monkeypatch.setenv("MEGALODON_NORM_IMPL", "prefix")
    out_p = timestep_norm(x, w, b, 2, EPS, c, m, v)
    for a, r in zip(out_t, out_p, strict=True):
        assert torch.equal(a, r) if a.dtype == torch.long else rel(a, r.double()) <= TOL_OUT
    monkeypatch.setenv("MEGALODON_NORM_IMPL", "cuda")
    with pytest.raises(ValueError, match="MEGALODON_NORM_IMPL"):
        timestep_norm(x, w, b, 2, EPS, c, m, v)
    with pytest.raises(ValueError, match="divisible"):
        timestep_norm_triton(x, w, b, 3, EPS, c, m, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_timestep_norm_bf16_gpu():
    """bf16 x at D=512, G=8, L=3000 (default chunking) vs float64 reference on the bf16-rounded input:
    outputs and x-gradient within bf16 rounding (rel 1e-2), statistics rel 1e-5 (float32)."""
    from megalodon_lm.ops._triton import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    B, L, D, G = 2, 3000, 512, 8
    leaves, count, wts = _case(B, L, D, G, seed=8, counts=[0, 100])
    xb = leaves[0].detach().to(torch.bfloat16)
    xg = xb.cuda().requires_grad_(True)
    rest = [t.detach().float().cuda() for t in leaves[1:]]
    y, _, m, v = timestep_norm_triton(xg, rest[0], rest[1], G, EPS, count.cuda(), rest[2], rest[3])
    assert y.dtype == torch.bfloat16
    gx = torch.autograd.grad((y.float() * wts[0].float().cuda()).sum(), xg)[0]
    x64 = xb.double().requires_grad_(True)
    y_ref, _, m_ref, v_ref = timestep_norm_naive(x64, *(t.detach() for t in leaves[1:3]), G, EPS, count,
                                                 *(t.detach() for t in leaves[3:]))
    gx_ref = torch.autograd.grad((y_ref * wts[0]).sum(), x64)[0]
    assert rel(y.float(), y_ref) <= 1e-2 and rel(gx.float(), gx_ref) <= 1e-2
    assert rel(m, m_ref) <= 1e-5 and rel(v, v_ref) <= 1e-5
