"""cema_chunked_fn (hand-written backward) vs autograd through cema_chunked and vs the step-by-step reference.

Outputs, final states and the gradients of a random linear functional of both w.r.t. x, h0, the coefficient
tensors (p, log q, eta, omega as leaves) and, through cema_coefficients, the raw parameters. Tolerances:
float64 1e-10 relative (observed ~1e-14), float32 1e-5. Block size 4 unless stated, so short inputs cross
several blocks; lengths at block boundaries +-1, right padding (a row with no real token too), h0, B > 1.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_cema import RAW_NAMES, _long_memory_params, coefs, rand_h0, rand_x, raw_params

from megalodon_lm.ops import cema, cema_chunked, cema_chunked_fn, cema_naive
from megalodon_lm.ops.cema import CemaCoefficients

F64 = torch.float64
T = 4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; ||a|| where b is exactly zero (the log q gradient at L = 1 without h0)."""
    den = b.abs().norm()
    return ((a - b).abs().norm() / den).item() if den > 0 else a.abs().norm().item()


def _coef_leaves(D: int, N: int, seed: int, dtype=F64) -> list[torch.Tensor]:
    """p, log q, eta, omega of a random parameter set, detached as leaves requiring grad."""
    c = coefs({k: v.to(dtype) for k, v in raw_params(D, N, seed).items()})
    return [t.detach().clone().requires_grad_(True) for t in (c.p, c.log_q, c.eta, c.omega)]


def _coef(leaves: list[torch.Tensor]) -> CemaCoefficients:
    p, log_q, eta, omega = leaves
    return CemaCoefficients(p=p, log_q=log_q, eta=eta, omega=omega, q=torch.exp(log_q))


def _run(fn, x, leaves, h0, lengths, need_state, weights, y_mask=None):
    """(y, h, gradients of <wy, y> + <wh, h> w.r.t. x, h0 and the leaves); h's weight is complex."""
    y, h = fn(x, _coef(leaves), h0, lengths, need_state)
    wy, wh = weights
    loss = (y * (wy if y_mask is None else wy * y_mask)).sum()
    if need_state:
        loss = loss + (h * wh.conj()).real.sum()
    wrt = [x] + ([h0] if h0 is not None else []) + list(leaves)
    return y, h, torch.autograd.grad(loss, wrt)


def _inputs(B, L, D, N, seed, with_h0, dtype=F64):
    x = rand_x(B, L, D, seed, dtype).requires_grad_(True)
    h0 = rand_h0(B, D, N, seed + 1).to(torch.complex128 if dtype == F64 else torch.complex64) if with_h0 else None
    if h0 is not None:
        h0.requires_grad_(True)
    g = torch.Generator().manual_seed(seed + 2)
    wy = torch.randn(B, L, D, generator=g, dtype=F64).to(dtype)
    wh = torch.complex(*torch.randn(2, B, D, N, generator=g, dtype=F64)).to(h0.dtype if h0 is not None else
                                                                             torch.complex128 if dtype == F64
                                                                             else torch.complex64)
    return x, h0, (wy, wh)


def _chunked(block):
    return lambda x, c, h0, lengths, need: cema_chunked(x, c, h0, lengths, need, block_size=block)


def _fn(block):
    return lambda x, c, h0, lengths, need: cema_chunked_fn(x, c, h0, lengths, need, block_size=block)


CASES = [  # (B, L, lengths or None, h0, need_state)
    (1, 1, None, False, True),
    (2, T - 1, None, True, True),
    (2, T, None, False, False),
    (3, T + 1, [T + 1, T, 1], True, True),
    (2, 2 * T - 1, [2 * T - 1, T - 1], False, True),
    (2, 2 * T, None, True, False),
    (3, 2 * T + 1, [2 * T + 1, 0, T], True, True),  # a row with no real token keeps (and passes) h0
    (2, 23, [23, 17], False, True),
    (2, 23, None, True, True),
]


@pytest.mark.parametrize("B,L,lengths,with_h0,need_state", CASES)
def test_matches_chunked_autograd(B, L, lengths, with_h0, need_state):
    """Every output and gradient equals autograd through cema_chunked (same block size): rel 1e-10."""
    D, N = 3, 2
    leaves = _coef_leaves(D, N, seed=L)
    x, h0, w = _inputs(B, L, D, N, seed=10 + L, with_h0=with_h0)
    lens = None if lengths is None else torch.tensor(lengths)
    y, h, g = _run(_fn(T), x, leaves, h0, lens, need_state, w)
    y_ref, h_ref, g_ref = _run(_chunked(T), x, leaves, h0, lens, need_state, w)
    assert y.dtype == F64 and rel(y, y_ref) <= 1e-10
    assert (h is None) == (not need_state)
    if need_state:
        assert h.dtype == torch.complex128 and rel(h, h_ref) <= 1e-10
    names = ["x"] + (["h0"] if with_h0 else []) + ["p", "log_q", "eta", "omega"]
    for name, a, b in zip(names, g, g_ref, strict=True):
        assert a.dtype == b.dtype and rel(a, b) <= 1e-10, name


@pytest.mark.parametrize("L,block", [(11, 4), (11, None), (40, 8)])
def test_raw_parameter_gradients_match_naive(L, block):
    """Through cema_coefficients to the raw parameters, with right padding, h0 and the final state, vs the
    recurrence (outputs compared at real tokens only: the recurrence freezes the state at pads): rel 1e-10."""
    B, D, N = 3, 2, 3
    lengths = torch.tensor([L, L - 5, 0])
    valid = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    raw = {k: v.clone().requires_grad_(True) for k, v in raw_params(D, N, seed=L).items()}
    x, h0, (wy, wh) = _inputs(B, L, D, N, seed=20 + L, with_h0=True)
    mask = valid.unsqueeze(-1).to(F64)

    def grads(run):
        y, h = run(coefs(raw))
        loss = (y * wy * mask).sum() + (h * wh.conj()).real.sum()
        return y * mask, h, torch.autograd.grad(loss, [x, h0] + [raw[n] for n in RAW_NAMES])

    y, h, g = grads(lambda c: cema_chunked_fn(x, c, h0, lengths, True, block_size=block))
    y_ref, h_ref, g_ref = grads(lambda c: cema_naive(x, c, h0, valid))
    assert rel(y, y_ref) <= 1e-10 and rel(h, h_ref) <= 1e-10
    for name, a, b in zip(["x", "h0", *RAW_NAMES], g, g_ref, strict=True):
        assert rel(a, b) <= 1e-10, name


def test_float32_matches_autograd_and_float64_reference():
    """float32 at L = 300 (default block size, long memory): outputs, state and gradients vs float32
    autograd through cema_chunked and vs float64 cema_naive on the same values: rel 1e-5."""
    B, L, D, N = 2, 300, 6, 4
    p32 = _long_memory_params(D, N, seed=30, dtype=torch.float32)
    raw = {k: v.clone().requires_grad_(True) for k, v in p32.items()}
    raw64 = {k: v.detach().to(F64).requires_grad_(True) for k, v in p32.items()}
    x, h0, (wy, wh) = _inputs(B, L, D, N, seed=31, with_h0=True, dtype=torch.float32)
    x64 = x.detach().to(F64).requires_grad_(True)
    h064 = h0.detach().to(torch.complex128).requires_grad_(True)

    def grads(run, r, xx, hh):
        y, h = run(coefs(r), xx, hh)
        loss = (y * wy.to(y.dtype)).sum() + (h * wh.to(h.dtype).conj()).real.sum()
        return [y, h, *torch.autograd.grad(loss, [xx, hh] + [r[n] for n in RAW_NAMES])]

    out = grads(lambda c, xx, hh: cema_chunked_fn(xx, c, hh, None, True), raw, x, h0)
    auto = grads(lambda c, xx, hh: cema_chunked(xx, c, hh, None, True), raw, x, h0)
    ref = grads(lambda c, xx, hh: cema_naive(xx, c, hh), raw64, x64, h064)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.complex64
    for name, a, b, c in zip(["y", "h", "x", "h0", *RAW_NAMES], out, auto, ref, strict=True):
        assert a.dtype == b.dtype, name
        assert rel(a, b) <= 1e-5, name
        assert rel(a.to(c.dtype), c) <= 1e-5, name


def test_gradcheck():
    """Finite differences (float64) w.r.t. x, h0 and the raw parameters, final state included."""
    B, L, D, N = 2, 7, 2, 2
    raw = raw_params(D, N, seed=40)
    x = rand_x(B, L, D, seed=41)
    h0r = torch.view_as_real(rand_h0(B, D, N, seed=42)).clone()
    lengths = torch.tensor([7, 5])
    inputs = tuple(t.clone().requires_grad_(True) for t in [x, h0r] + [raw[n] for n in RAW_NAMES])

    def f(x, h0r, *r):
        y, h = cema_chunked_fn(x, coefs(dict(zip(RAW_NAMES, r, strict=True))), torch.view_as_complex(h0r),
                               lengths, True, block_size=3)
        return y, torch.view_as_real(h)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_input_and_gradient_dtype():
    """bf16 x: computed in float32, y and dx in bf16, equal to the float32 computation rounded (rel 1e-2)."""
    B, L, D, N = 2, 19, 3, 2
    leaves = _coef_leaves(D, N, seed=50, dtype=torch.float32)
    x = rand_x(B, L, D, seed=51, dtype=torch.float32).to(torch.bfloat16).requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    y, _ = cema_chunked_fn(x, _coef(leaves), block_size=T)
    y32, _ = cema_chunked_fn(x32, _coef(leaves), block_size=T)
    (gx,) = torch.autograd.grad(y.float().square().sum(), [x])
    (gx32,) = torch.autograd.grad(y32.square().sum(), [x32])
    assert y.dtype == gx.dtype == torch.bfloat16
    assert rel(y.float(), y32) <= 1e-2 and rel(gx.float(), gx32) <= 1e-2


def test_saves_only_inputs_and_block_states():
    """The autograd graph keeps x, the (D, N) coefficients, h0 and B*D*2N*L/T block-state reals: nothing of
    size B*L*D beyond x itself (checked with a saved-tensor hook)."""
    B, L, D, N, block = 2, 64, 5, 3, 8
    leaves = _coef_leaves(D, N, seed=60, dtype=torch.float32)
    x = rand_x(B, L, D, seed=61, dtype=torch.float32).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    p, log_q, eta, omega = leaves
    coef = CemaCoefficients(p=p, log_q=log_q, eta=eta, omega=omega, q=log_q.detach().exp())  # q unused here
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        cema_chunked_fn(x, coef, block_size=block)
    big = [t for t in saved if t.numel() >= B * L * D]
    assert len(big) == 1 and big[0] is x
    assert sum(t.numel() for t in saved if t is not x) <= B * D * 2 * N * (L // block) + 4 * D * N


def _spy(monkeypatch):
    mod = importlib.import_module("megalodon_lm.ops.cema")
    calls = []
    for name in ("cema_naive", "cema_chunked", "cema_chunked_fn"):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize(
    "impl,grad,lean,expected",
    [(None, True, True, "cema_chunked_fn"), (None, True, False, "cema_chunked"), (None, False, True, "cema_chunked"),
     ("chunk", True, True, "cema_chunked"), ("chunk_fn", False, False, "cema_chunked_fn"),
     ("naive", True, True, "cema_naive")],
)
def test_dispatcher(monkeypatch, impl, grad, lean, expected):
    """auto takes chunk_fn on the lean training path when autograd records the call, chunk otherwise; the env
    var forces either."""
    if impl is None:
        monkeypatch.delenv("MEGALODON_CEMA_IMPL", raising=False)
    else:
        monkeypatch.setenv("MEGALODON_CEMA_IMPL", impl)
    calls = _spy(monkeypatch)
    B, L, D, N = 2, 9, 3, 2
    leaves = _coef_leaves(D, N, seed=70)
    x = rand_x(B, L, D, seed=71).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        y, h = cema(x, _coef([t.detach().requires_grad_(grad) for t in leaves]), need_state=True, lean=lean)
    assert calls == [expected]
    y_ref, h_ref = cema_naive(x.detach(), _coef([t.detach() for t in leaves]))
    assert rel(y.detach(), y_ref) <= 1e-10 and rel(h.detach(), h_ref) <= 1e-10
