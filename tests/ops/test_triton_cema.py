"""CEMA Triton kernels vs the float64 step-by-step reference: outputs, final states and every gradient.

Runs on CUDA when present, else on CPU under Triton's interpreter (fixture `triton_device`), on tiny fp32
shapes; lengths straddle the checkpoint segment (32 steps): 1, 7, 33, 64, 65. Tolerances: fp32 kernel vs
float64 reference, relative 2e-5 on outputs and states, 5e-5 on gradients (observed ~1e-6). bf16 at a real
width is a `gpu` test.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from megalodon_lm.ops import cema, cema_coefficients, cema_naive
from megalodon_lm.ops.cema.triton import CHECKPOINT_EVERY, cema_triton

F64 = torch.float64
RAW_NAMES = ("alpha", "delta", "theta", "gamma", "omega")
TOL_OUT, TOL_GRAD = 2e-5, 5e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero (e.g. the q gradients at L = 1 without h0)."""
    a, b = a.detach().cpu().to(b.dtype), b.detach().cpu()
    den = b.abs().norm()
    return ((a - b).abs().norm() / den).item() if den > 0 else a.abs().norm().item()


def _case(B: int, L: int, D: int, N: int, seed: int):
    """Float64 leaves: raw parameters (reference shapes), x, h0 as a real view, and functional weights."""
    g = torch.Generator().manual_seed(seed)
    raw = {
        "alpha": torch.randn(D, N, 1, generator=g, dtype=F64),
        "delta": torch.randn(D, N, 1, generator=g, dtype=F64),
        "theta": torch.randn(D, 1, 1, generator=g, dtype=F64),
        "gamma": torch.randn(D, N, 2, generator=g, dtype=F64),
        "omega": torch.randn(D, 1, generator=g, dtype=F64) * 0.25,
    }
    raw = {k: v.requires_grad_(True) for k, v in raw.items()}
    x = torch.randn(B, L, D, generator=g, dtype=F64).requires_grad_(True)
    h0r = torch.randn(B, D, N, 2, generator=g, dtype=F64).requires_grad_(True)
    weights = [torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, D, N, 2, generator=g, dtype=F64)]
    return raw, x, h0r, weights


def _run(fn, raw, x, h0r, weights, valid, with_h0, dtype, device):
    """y, final state and the gradients of <Wy, y (real steps)> + <Wh, h> w.r.t. x, h0 and the raw parameters."""
    coef = cema_coefficients(*(raw[n].to(device, dtype) for n in RAW_NAMES))
    h0 = torch.view_as_complex(h0r.to(device, dtype)) if with_h0 else None
    y, h = fn(x.to(device, dtype), coef, h0)
    y, h = y.double().cpu(), torch.view_as_real(h).double().cpu()
    loss = (y * weights[0] * valid.unsqueeze(-1)).sum() + (h * weights[1]).sum()
    leaves = [x, *(raw[n] for n in RAW_NAMES)] + ([h0r] if with_h0 else [])
    return y * valid.unsqueeze(-1), h, torch.autograd.grad(loss, leaves)


CK = CHECKPOINT_EVERY


@pytest.mark.parametrize(
    ("L", "with_h0", "padded", "checkpoint", "slice_len"),
    [(1, False, False, CK, 0), (7, True, True, CK, 0), (33, True, False, CK, 0), (64, False, True, CK, 0),
     (65, True, True, CK, 0), (17, True, True, 8, 0), (65, True, True, 8, 16), (33, False, True, 4, 9)],
)
def test_triton_cema_matches_naive(triton_device, L, with_h0, padded, checkpoint, slice_len):
    """Outputs at real steps, final state, grads of x, h0 and all raw parameters (B=2, D=5, N=3).

    slice_len > 0: time cut into slices scanned in parallel (65 steps in 16-step slices; 33 in 12-step
    slices of 4-step segments), with a padded row whose real steps end inside a slice."""
    B, D, N = 2, 5, 3
    raw, x, h0r, w = _case(B, L, D, N, seed=L)
    lengths = torch.tensor([L, (L + 1) // 2]) if padded else None
    valid = torch.ones(B, L, dtype=torch.bool) if lengths is None else torch.arange(L) < lengths.unsqueeze(1)
    ref = _run(lambda x, c, h0: cema_naive(x, c, h0, valid), raw, x, h0r, w, valid, with_h0, F64, "cpu")
    lens = None if lengths is None else lengths.to(triton_device)
    out = _run(lambda x, c, h0: cema_triton(x, c, h0, lens, True, checkpoint, slice_len),
               raw, x, h0r, w, valid, with_h0, torch.float32, triton_device)
    assert rel(out[0], ref[0]) <= TOL_OUT
    assert rel(out[1], ref[1]) <= TOL_OUT
    names = ["x", *RAW_NAMES, "h0"]
    for name, a, b in zip(names, out[2], ref[2], strict=False):
        assert rel(a, b) <= TOL_GRAD, name


def test_triton_cema_empty_row_keeps_state(triton_device):
    """A row of length 0 returns h0 unchanged; its h0 gradient is the final-state gradient."""
    B, L, D, N = 2, 4, 3, 2
    raw, x, h0r, w = _case(B, L, D, N, seed=5)
    coef = cema_coefficients(*(raw[n].float().to(triton_device) for n in RAW_NAMES))
    h0 = torch.view_as_complex(h0r.detach().float()).to(triton_device).requires_grad_(True)
    _, h = cema_triton(x.detach().float().to(triton_device), coef, h0, torch.tensor([L, 0]).to(triton_device),
                       need_state=True)
    assert torch.equal(h[1].cpu(), h0[1].detach().cpu())
    gh = torch.randn(B, D, N, dtype=torch.complex64).to(triton_device)
    (g,) = torch.autograd.grad((h * gh.conj()).real.sum(), [h0])
    assert torch.allclose(g[1].cpu(), gh[1].cpu())


def test_triton_cema_dispatch(triton_device, monkeypatch):
    """MEGALODON_CEMA_IMPL=triton routes to the kernels and agrees with the chunked path; bad names raise."""
    raw, x, h0r, _ = _case(1, 9, 4, 2, seed=7)
    coef = cema_coefficients(*(raw[n].detach().float().to(triton_device) for n in RAW_NAMES))
    xf = x.detach().float().to(triton_device)
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "triton")
    y_t, h_t = cema(xf, coef, need_state=True)
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "chunk")
    y_c, h_c = cema(xf, coef, need_state=True)
    assert rel(y_t, y_c.double()) <= TOL_OUT and rel(h_t, h_c.to(torch.complex128)) <= TOL_OUT
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "cuda")
    with pytest.raises(ValueError, match="MEGALODON_CEMA_IMPL"):
        cema(xf, coef)


def test_triton_forced_on_cpu_without_interpreter_raises(monkeypatch):
    """CPU tensors without TRITON_INTERPRET=1, or float64 inputs, are a clear ValueError (no triton needed)."""
    raw, x, _, _ = _case(1, 3, 2, 2, seed=8)
    coef = cema_coefficients(*(raw[n].detach().float() for n in RAW_NAMES))
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        cema(x.detach().float(), coef)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="float32"):
        cema_triton(x.detach(), coef)


def test_without_triton_forced_raises_and_auto_falls_back(monkeypatch):
    """A missing triton install: forcing the path is a ValueError naming it; auto uses PyTorch."""
    monkeypatch.setattr(importlib.import_module("megalodon_lm.ops._triton"), "_TRITON_INSTALLED", False)
    raw, x, _, _ = _case(1, 5, 2, 2, seed=10)
    coef = cema_coefficients(*(raw[n].detach().float() for n in RAW_NAMES))
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "triton")
    with pytest.raises(ValueError, match="not installed"):
        cema(x.detach().float(), coef)
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "auto")
    y, _ = cema(x.detach().float(), coef)
    assert rel(y, cema_naive(x.detach(), cema_coefficients(*(raw[n].detach() for n in RAW_NAMES)))[0]) <= TOL_OUT


def test_auto_on_cpu_keeps_pytorch_paths(monkeypatch):
    """auto never picks Triton for CPU tensors, interpreter or not."""
    cema_pkg = importlib.import_module("megalodon_lm.ops.cema")  # (ops.cema the attribute is the function)

    def boom(*a, **k):
        raise AssertionError("triton path taken on CPU")

    monkeypatch.setattr(cema_pkg, "cema_triton", boom)
    monkeypatch.delenv("MEGALODON_CEMA_IMPL", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    raw, x, _, _ = _case(1, 5, 2, 2, seed=9)
    coef = cema_coefficients(*(raw[n].detach().float() for n in RAW_NAMES))
    cema(x.detach().float(), coef)


def test_torch_compile_fullgraph(triton_device):
    """torch.compile(fullgraph=True) of CEMA + TimestepNorm modules on the Triton ops: no graph break,
    same outputs and input gradients as eager (aot_eager backend: the fake impls must give the shapes)."""
    from megalodon_lm.modules.cema import ComplexEMA
    from megalodon_lm.modules.timestep_norm import TimestepNorm

    torch.manual_seed(0)
    ema, norm = ComplexEMA(8, 4).to(triton_device), TimestepNorm(8, 2).to(triton_device)

    def f(x):
        y, (c, m, v) = norm(x)
        z, h = ema(y, need_state=True)
        return z, torch.view_as_real(h), m, v

    mp = pytest.MonkeyPatch()
    mp.setenv("MEGALODON_CEMA_IMPL", "triton")
    mp.setenv("MEGALODON_NORM_IMPL", "triton")
    try:
        torch._dynamo.reset()
        x = torch.randn(2, 9, 8, device=triton_device, requires_grad=True)
        outs = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
        g = torch.autograd.grad(sum(o.square().sum() for o in outs), x)[0]
        ref = f(x)
        g_ref = torch.autograd.grad(sum(o.square().sum() for o in ref), x)[0]
    finally:
        mp.undo()
    for a, b in zip(outs, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_cema_bf16_gpu():
    """bf16 x at D=256, N=16, L=1000 vs float64 reference on the bf16-rounded input: outputs within bf16
    rounding (rel 1e-2), state and x-gradient rel 1e-4 (state math is float32)."""
    from megalodon_lm.ops._triton import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    B, L, D, N = 2, 1000, 256, 16
    raw, x, h0r, w = _case(B, L, D, N, seed=11)
    xb = x.detach().to(torch.bfloat16)
    coef = cema_coefficients(*(raw[n].detach().float().cuda() for n in RAW_NAMES))
    xg = xb.cuda().requires_grad_(True)
    y, h = cema_triton(xg, coef, need_state=True)
    assert y.dtype == torch.bfloat16
    gx = torch.autograd.grad((y.float() * w[0].float().cuda()).sum(), xg)[0]
    coef64 = cema_coefficients(*(raw[n].detach() for n in RAW_NAMES))
    x64 = xb.double().requires_grad_(True)
    y_ref, h_ref = cema_naive(x64, coef64)
    gx_ref = torch.autograd.grad((y_ref * w[0]).sum(), x64)[0]
    assert rel(y.float(), y_ref) <= 1e-2
    assert rel(h, h_ref) <= 1e-4
    assert rel(gx.float(), gx_ref) <= 1e-2
