"""Fused SiLU, SwiGLU and the SiLU gate before wh2 on Triton vs the float64 reference; the dispatch.

Kernel tests run on CUDA when present, else on CPU under Triton's interpreter (fixture `triton_device`),
on tiny fp32 tensors whose sizes are not multiples of the 1024-element block (nor powers of two).
Outputs and gradients within relative 1e-5 of the reference in float64 (observed ~1e-7). Inputs span
[-30, 30] so that the sigmoid saturates at both ends. bf16 at a real size is a `gpu` test.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.ops import fused
from megalodon_lm.ops.fused import (
    qk_prep_reference,
    silu_gate_reference,
    silu_gate_triton,
    silu_reference,
    silu_triton,
    swiglu_reference,
    swiglu_triton,
)
from megalodon_lm.ops.rope import rope_inverse_frequencies

F64 = torch.float64
TOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero."""
    a, b = a.detach().cpu().to(b.dtype), b.detach().cpu()
    den = b.norm()
    return ((a - b).norm() / den).item() if den > 0 else a.norm().item()


def _inputs(shapes, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [3.0 * torch.randn(s, generator=g, dtype=F64) for s in shapes]
    out[0].view(-1)[:4] = torch.tensor([-30.0, -12.0, 12.0, 30.0], dtype=F64)
    return out


def _grads(fn, inputs, dtype, device, w):
    leaves = [t.to(device, dtype).requires_grad_(True) for t in inputs]
    y = fn(*leaves)
    return y.double().cpu(), torch.autograd.grad((y.double().cpu() * w).sum(), leaves)


CASES = {
    "silu": (silu_triton, silu_reference, [(3, 7, 53)]),  # 1113 elements: one full and one partial block
    "swiglu": (swiglu_triton, swiglu_reference, [(2, 5, 37), (2, 5, 37)]),
    "silu_gate": (silu_gate_triton, silu_gate_reference, [(2, 11, 3, 35), (2, 11, 105)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_triton_activation_matches_reference(triton_device, name):
    tri, ref, shapes = CASES[name]
    inputs = _inputs(shapes, seed=len(name))
    y_ref = ref(*inputs)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    y_ref, g_ref = _grads(ref, inputs, F64, "cpu", w)
    y, g = _grads(tri, inputs, torch.float32, triton_device, w)
    assert rel(y, y_ref) <= TOL
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert a.shape == b.shape and rel(a, b) <= TOL, i


def test_triton_gate_of_strided_attention_output(triton_device):
    """The attention output arrives as a transposed (non-contiguous) view; its gradient keeps its shape."""
    out, r = _inputs([(2, 3, 9, 4), (2, 9, 12)], seed=5)
    w = torch.randn(2, 9, 12, dtype=F64)
    ref = _grads(lambda o, r_: silu_gate_reference(o.transpose(1, 2), r_), [out, r], F64, "cpu", w)
    got = _grads(lambda o, r_: silu_gate_triton(o.transpose(1, 2), r_), [out, r], torch.float32, triton_device, w)
    assert rel(got[0], ref[0]) <= TOL
    assert all(rel(a, b) <= TOL for a, b in zip(got[1], ref[1], strict=True))


def test_triton_activation_errors_and_empty(triton_device):
    a = torch.zeros(2, 3, device=triton_device)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu_triton(a, a[:, :2])
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        silu_gate_triton(a.half(), a)
    assert silu_triton(a[:, :0]).shape == (2, 0)


def test_dispatch_picks_reference_on_cpu(monkeypatch):
    """auto on CPU tensors is the reference (bitwise), whatever TRITON_INTERPRET says; bad names raise."""
    monkeypatch.delenv("MEGALODON_FUSED_IMPL", raising=False)
    a, b = _inputs([(2, 3, 8), (2, 3, 8)], seed=7)
    a, b = a.float(), b.float()
    assert fused.fused_impl(a) == "reference"
    assert torch.equal(fused.silu(a), silu_reference(a))
    assert torch.equal(fused.swiglu(a, b), swiglu_reference(a, b))
    assert torch.equal(fused.silu_gate(a.view(2, 3, 2, 4), b), silu_gate_reference(a.view(2, 3, 2, 4), b))
    z = a.view(2, 3, 2, 4)
    p = torch.randn(2, 8)
    freqs, pos = rope_inverse_frequencies(4, 10000.0), torch.arange(3) % 2
    for x, y in zip(fused.qk_prep(z, p, p, 1e-5, freqs, pos, 2), qk_prep_reference(z, p, p, 1e-5, freqs, pos),
                    strict=True):
        assert torch.equal(x, y)
    monkeypatch.setenv("MEGALODON_FUSED_IMPL", "cuda")
    with pytest.raises(ValueError, match="MEGALODON_FUSED_IMPL"):
        fused.silu(a)


def test_dispatch_forced_triton(triton_device, monkeypatch):
    """MEGALODON_FUSED_IMPL=triton takes the kernels (here under the interpreter) and agrees with the reference;
    =reference takes the reference even where auto would pick Triton."""
    a, b = (t.float().to(triton_device) for t in _inputs([(2, 3, 8), (2, 3, 8)], seed=8))
    monkeypatch.setenv("MEGALODON_FUSED_IMPL", "triton")
    assert fused.fused_impl(a) == "triton"
    assert rel(fused.swiglu(a, b), swiglu_reference(a, b).double()) <= TOL
    monkeypatch.setenv("MEGALODON_FUSED_IMPL", "reference")
    assert fused.fused_impl(a) == "reference"
    assert torch.equal(fused.swiglu(a, b), swiglu_reference(a, b))


def test_torch_compile_fullgraph(triton_device):
    """torch.compile(fullgraph=True) through the custom ops (fake implementations): no graph break, same values
    and gradients as eager."""
    out, r = (t.float().to(triton_device).requires_grad_(True) for t in _inputs([(2, 5, 2, 6), (2, 5, 12)], 9))
    z = out.detach().clone().requires_grad_(True)
    p = torch.randn(2, 12, device=triton_device, requires_grad=True)
    freqs = rope_inverse_frequencies(6, 10000.0).to(triton_device)
    pos = torch.arange(5, device=triton_device) % 4

    def f(o, r_, z_, p_):
        q, k = fused.qk_prep_triton(z_, p_, p_, 1e-5, freqs, pos, 4)
        return (silu_gate_triton(o, r_) * silu_triton(r_)).sum() + (q * k).sum()

    leaves = [out, r, z, p]
    eager = f(*leaves)
    g_eager = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
    g_comp = torch.autograd.grad(compiled, leaves)
    assert rel(compiled, eager.double()) <= 1e-6
    assert all(rel(a, b.double()) <= 1e-6 for a, b in zip(g_comp, g_eager, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_activations_bf16_gpu():
    """bf16 at the FFN width of `tiny`-like layers (2 x 2048 x 1536) vs float64 on the bf16-rounded inputs:
    outputs and gradients within bf16 rounding (relative 1e-2)."""
    from megalodon_lm.ops._triton import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    for name, (tri, ref, _) in CASES.items():
        shapes = [(2, 2048, 1536)] * (1 if name == "silu" else 2)
        inputs = [t.to(torch.bfloat16).double() for t in _inputs(shapes, seed=10)]
        w = torch.randn(shapes[0], dtype=F64)
        y_ref, g_ref = _grads(ref, inputs, F64, "cpu", w)
        y, g = _grads(tri, inputs, torch.bfloat16, "cuda", w)
        assert rel(y, y_ref) <= 1e-2, name
        assert all(rel(a, b) <= 1e-2 for a, b in zip(g, g_ref, strict=True)), name
