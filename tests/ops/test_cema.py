"""CEMA ops: golden vectors, chunked scan / FFT vs the step-by-step reference, gradients, dtypes, dispatch.

Tolerances (stated per test): float64 paths agree to 1e-10..1e-12 relative (they are exact algorithms,
differing only in rounding); float32 fast path vs float64 reference to 1e-5 relative; bf16 inputs
to bf16 rounding of the float32 result.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from megalodon_lm.ops import cema, cema_chunked, cema_coefficients, cema_fft, cema_naive

F64 = torch.float64
RAW_NAMES = ("alpha", "delta", "theta", "gamma", "omega")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (complex tensors allowed)."""
    return ((a - b).abs().norm() / b.abs().norm()).item()


def raw_params(D: int, N: int, seed: int, dtype=F64) -> dict[str, torch.Tensor]:
    """Random raw CEMA parameters with the reference shapes (docs/architecture.md §2.1), a spread of decay rates."""
    g = torch.Generator().manual_seed(seed)
    return {
        "alpha": (torch.randn(D, N, 1, generator=g, dtype=F64) * 1.0).to(dtype),
        "delta": (torch.randn(D, N, 1, generator=g, dtype=F64) * 1.0).to(dtype),
        "theta": torch.randn(D, 1, 1, generator=g, dtype=F64).to(dtype),
        "gamma": torch.randn(D, N, 2, generator=g, dtype=F64).to(dtype),
        "omega": (torch.randn(D, 1, generator=g, dtype=F64) * 0.25).to(dtype),
    }


def coefs(p: dict[str, torch.Tensor]):
    return cema_coefficients(*(p[n] for n in RAW_NAMES))


def rand_x(B: int, L: int, D: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g, dtype=F64).to(dtype)


def rand_h0(B: int, D: int, N: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    re, im = torch.randn(2, B, D, N, generator=g, dtype=F64)
    return torch.complex(re, im)


# ----------------------------------------------------------------------------------------------------
# Coefficients
# ----------------------------------------------------------------------------------------------------


def test_coefficients_match_spec_formulas():
    """p = sigmoid(alpha); q = (1 - p sigmoid(delta)) e^{i n phi}; eta = (g_re + i g_im)/sqrt(N). 1e-14."""
    D, N = 3, 4
    p = raw_params(D, N, seed=1)
    c = coefs(p)
    alpha, delta, theta, gamma = p["alpha"][..., 0], p["delta"][..., 0], p["theta"].view(D, 1), p["gamma"]
    phi = torch.sigmoid(theta) * 2 * torch.pi / N
    n = torch.arange(1, N + 1, dtype=F64)
    q_ref = (1 - torch.sigmoid(alpha) * torch.sigmoid(delta)) * torch.exp(1j * n * phi)
    eta_ref = torch.complex(gamma[..., 0], gamma[..., 1]) / N**0.5
    assert c.p.dtype == F64 and c.log_q.dtype == torch.complex128
    assert rel(c.p, torch.sigmoid(alpha)) <= 1e-14
    assert rel(c.q, q_ref) <= 1e-14
    assert rel(c.eta, eta_ref) <= 1e-14
    assert rel(c.omega, p["omega"].view(D)) <= 1e-14
    assert bool((c.q.abs() < 1).all())
    # powers(m) = q^m
    m = torch.tensor([0.0, 1.0, 7.0], dtype=F64)
    assert rel(c.powers(m), q_ref.unsqueeze(-1) ** m.to(torch.complex128)) <= 1e-13


def test_coefficients_low_precision_params_computed_in_float32():
    """bf16 raw parameters are upcast: coefficients in float32 / complex64 (docs/architecture.md §2.3)."""
    p = raw_params(4, 2, seed=2, dtype=torch.bfloat16)
    c = coefs(p)
    assert c.p.dtype == torch.float32
    assert c.log_q.dtype == torch.complex64
    assert c.eta.dtype == torch.complex64
    assert c.omega.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Golden vectors (independent float64 implementation)
# ----------------------------------------------------------------------------------------------------


GOLDEN_IMPLS = ["naive", "chunk1", "chunk5", "chunk8", "chunk64", "chunk_default", "fft"]


@pytest.mark.parametrize("impl", GOLDEN_IMPLS)
def test_golden_op_cema(golden_dir, impl):
    """Each path reproduces op_cema.safetensors `y` (zero initial state) to rel 1e-12 in float64."""
    d = load_file(str(golden_dir / "op_cema.safetensors"))
    coef = cema_coefficients(d["alpha"], d["delta"], d["theta"], d["gamma"], d["omega"])
    x = d["x"]
    if impl == "naive":
        y, _ = cema_naive(x, coef)
    elif impl == "fft":
        y = cema_fft(x, coef)
    elif impl == "chunk_default":
        y, _ = cema_chunked(x, coef)
    else:
        y, _ = cema_chunked(x, coef, block_size=int(impl[len("chunk"):]))
    assert y.dtype == F64 and y.shape == d["y"].shape
    assert rel(y, d["y"]) <= 1e-12


# ----------------------------------------------------------------------------------------------------
# Chunked scan vs naive, float64
# ----------------------------------------------------------------------------------------------------

SMALL_BLOCK = 4
# block-1, block, block+1, 2*block+1, plus odd lengths crossing many blocks (multi-step scan).
CHUNK_LENGTHS = [1, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 2 * SMALL_BLOCK + 1, 7, 23, 37]


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("L", CHUNK_LENGTHS)
def test_chunked_matches_naive(L, with_h0):
    """Outputs and final states agree to rel 1e-10 (float64), small block size."""
    B, D, N = 3, 4, 3
    coef = coefs(raw_params(D, N, seed=10 + L))
    x = rand_x(B, L, D, seed=L)
    h0 = rand_h0(B, D, N, seed=100 + L) if with_h0 else None
    y_ref, h_ref = cema_naive(x, coef, h0)
    y, h = cema_chunked(x, coef, h0, need_state=True, block_size=SMALL_BLOCK)
    assert y.shape == (B, L, D) and h.shape == (B, D, N)
    assert h.dtype == torch.complex128
    assert rel(y, y_ref) <= 1e-10
    assert rel(h, h_ref) <= 1e-10


@pytest.mark.parametrize("block", [1, 5, 64])
def test_chunked_default_and_other_blocks(block):
    """Several block sizes incl. the default on a length that is not a multiple of any: rel 1e-10."""
    B, D, N, L = 2, 3, 4, 150
    coef = coefs(raw_params(D, N, seed=3))
    x = rand_x(B, L, D, seed=4)
    h0 = rand_h0(B, D, N, seed=5)
    y_ref, h_ref = cema_naive(x, coef, h0)
    y, h = cema_chunked(x, coef, h0, need_state=True, block_size=block)
    assert rel(y, y_ref) <= 1e-10
    assert rel(h, h_ref) <= 1e-10


def test_chunked_need_state_false_returns_none():
    coef = coefs(raw_params(2, 2, seed=0))
    y, h = cema_chunked(rand_x(1, 6, 2, seed=0), coef)
    assert h is None and y.shape == (1, 6, 2)


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("L", [SMALL_BLOCK + 1, 2 * SMALL_BLOCK + 1, 13])
def test_chunked_lengths_right_padding(L, with_h0):
    """Right padding: outputs at real positions and the final state equal naive on the unpadded row.

    Includes a row of length 0 (state = h0, or zero without h0), a full row and lengths at/around block
    boundaries. Padded inputs are large garbage, so any leak shows. Tol rel 1e-10.
    """
    D, N, T = 3, 2, SMALL_BLOCK
    lengths = torch.tensor([L, 0, 1, T, T + 1, L - 2])
    B = lengths.numel()
    coef = coefs(raw_params(D, N, seed=20 + L))
    x = rand_x(B, L, D, seed=21 + L)
    pad_mask = torch.arange(L).unsqueeze(0) >= lengths.unsqueeze(1)
    x = torch.where(pad_mask.unsqueeze(-1), 1e3 * torch.ones_like(x), x)
    h0 = rand_h0(B, D, N, seed=22 + L) if with_h0 else None
    y, h = cema_chunked(x, coef, h0, lengths=lengths, need_state=True, block_size=T)
    for b in range(B):
        n = int(lengths[b])
        h0_b = None if h0 is None else h0[b : b + 1]
        y_ref, h_ref = cema_naive(x[b : b + 1, :n], coef, h0_b)
        if n > 0:
            assert rel(y[b : b + 1, :n], y_ref) <= 1e-10, f"row {b} (length {n}) output"
        if n == 0:
            expected = torch.zeros(1, D, N, dtype=torch.complex128) if h0 is None else h0_b
            assert torch.equal(h[b : b + 1], expected), "row of length 0 must keep its incoming state"
        else:
            assert rel(h[b : b + 1], h_ref) <= 1e-10, f"row {b} (length {n}) state"


def test_naive_valid_mask_keeps_state():
    """cema_naive's valid mask (False = pad) leaves the state unchanged at padded steps. Tol 1e-12."""
    D, N, L = 2, 3, 6
    coef = coefs(raw_params(D, N, seed=7))
    x = rand_x(2, L, D, seed=8)
    h0 = rand_h0(2, D, N, seed=9)
    valid = torch.tensor([[True] * 4 + [False] * 2, [False] * L])
    _, h = cema_naive(x, coef, h0, valid)
    _, h_ref = cema_naive(x[:1, :4], coef, h0[:1])
    assert rel(h[:1], h_ref) <= 1e-12
    assert torch.equal(h[1:], h0[1:])


# ----------------------------------------------------------------------------------------------------
# Gradients, float64
# ----------------------------------------------------------------------------------------------------


def _leaves(B, L, D, N, seed):
    p = {k: v.clone().requires_grad_(True) for k, v in raw_params(D, N, seed).items()}
    x = rand_x(B, L, D, seed + 1).requires_grad_(True)
    h0r = torch.view_as_real(rand_h0(B, D, N, seed + 2)).clone().requires_grad_(True)
    return p, x, h0r


def _functional_weights(B, L, D, N, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, L, D, generator=g, dtype=F64),
        torch.randn(B, D, N, generator=g, dtype=F64),
        torch.randn(B, D, N, generator=g, dtype=F64),
    )


def _grads(run, p, x, h0r, weights, y_mask=None):
    """Gradients of <Wy, y> + <Wr, Re h> + <Wi, Im h> w.r.t. x, h0 (real view) and the raw parameters."""
    coef = coefs(p)  # inside the autograd graph
    y, h = run(x, coef, torch.view_as_complex(h0r))
    wy, wr, wi = weights
    if y_mask is not None:
        wy = wy * y_mask
    loss = (y * wy).sum()
    if h is not None:
        loss = loss + (h.real * wr).sum() + (h.imag * wi).sum()
    leaves = [x, h0r] + [p[n] for n in RAW_NAMES]
    return torch.autograd.grad(loss, leaves)


GRAD_NAMES = ["x", "h0"] + list(RAW_NAMES)


@pytest.mark.parametrize("L", [2 * SMALL_BLOCK + 1, 12])
def test_chunked_gradients_match_naive(L):
    """d(linear functional of y and final state)/d(x, h0, alpha, delta, theta, gamma, omega): rel 1e-9."""
    B, D, N = 2, 3, 2
    p, x, h0r = _leaves(B, L, D, N, seed=30 + L)
    w = _functional_weights(B, L, D, N, seed=31)
    g_ref = _grads(lambda x, c, h0: cema_naive(x, c, h0), p, x, h0r, w)
    g = _grads(lambda x, c, h0: cema_chunked(x, c, h0, need_state=True, block_size=SMALL_BLOCK), p, x, h0r, w)
    for name, a, b in zip(GRAD_NAMES, g, g_ref, strict=True):
        assert rel(a, b) <= 1e-9, name


def test_chunked_gradients_with_lengths_match_naive():
    """Same with right padding (functional ignores outputs at padded positions): rel 1e-9."""
    B, D, N, L = 3, 2, 2, 11
    lengths = torch.tensor([11, 6, 0])
    valid = torch.arange(L).unsqueeze(0) < lengths.unsqueeze(1)
    p, x, h0r = _leaves(B, L, D, N, seed=40)
    w = _functional_weights(B, L, D, N, seed=41)
    mask = valid.unsqueeze(-1).to(F64)
    g_ref = _grads(lambda x, c, h0: cema_naive(x, c, h0, valid), p, x, h0r, w, mask)
    g = _grads(
        lambda x, c, h0: cema_chunked(x, c, h0, lengths=lengths, need_state=True, block_size=SMALL_BLOCK),
        p, x, h0r, w, mask,
    )
    for name, a, b in zip(GRAD_NAMES, g, g_ref, strict=True):
        assert rel(a, b) <= 1e-9, name


# ----------------------------------------------------------------------------------------------------
# FFT path vs naive, float64 (has h0, no final state)
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_h0", [False, True], ids=["zero_state", "h0"])
@pytest.mark.parametrize("L", [1, 2, 9, 70])
def test_fft_matches_naive(L, with_h0):
    """Outputs rel 1e-10 (L=70 crosses the FFT path's 64-token power block)."""
    B, D, N = 2, 3, 3
    coef = coefs(raw_params(D, N, seed=50 + L))
    x = rand_x(B, L, D, seed=51 + L)
    h0 = rand_h0(B, D, N, seed=52) if with_h0 else None
    y_ref, _ = cema_naive(x, coef, h0)
    y = cema_fft(x, coef, h0)
    assert y.shape == (B, L, D) and y.dtype == F64
    assert rel(y, y_ref) <= 1e-10


@pytest.mark.parametrize("L", [9, 70])
def test_fft_gradients_match_naive(L):
    """Gradients of <Wy, y> w.r.t. x, h0 and the raw parameters: rel 1e-9."""
    B, D, N = 2, 2, 2
    p, x, h0r = _leaves(B, L, D, N, seed=60 + L)
    w = _functional_weights(B, L, D, N, seed=61)
    g_ref = _grads(lambda x, c, h0: (cema_naive(x, c, h0)[0], None), p, x, h0r, w)
    g = _grads(lambda x, c, h0: (cema_fft(x, c, h0), None), p, x, h0r, w)
    for name, a, b in zip(GRAD_NAMES, g, g_ref, strict=True):
        assert rel(a, b) <= 1e-9, name


# ----------------------------------------------------------------------------------------------------
# gradcheck (finite differences), float64
# ----------------------------------------------------------------------------------------------------


def test_chunked_gradcheck():
    """torch.autograd.gradcheck on B=1, L=5, D=2, N=2, block 2 w.r.t. x, h0 and the raw parameters."""
    B, L, D, N = 1, 5, 2, 2
    p = raw_params(D, N, seed=70)
    x = rand_x(B, L, D, seed=71)
    h0r = torch.view_as_real(rand_h0(B, D, N, seed=72)).clone()
    inputs = tuple(t.clone().requires_grad_(True) for t in [x, h0r] + [p[n] for n in RAW_NAMES])

    def f(x, h0r, *raw):
        h0 = torch.view_as_complex(h0r)
        y, h = cema_chunked(x, cema_coefficients(*raw), h0, need_state=True, block_size=2)
        return y, torch.view_as_real(h)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Float32 fast path, bf16 inputs
# ----------------------------------------------------------------------------------------------------


def _long_memory_params(D, N, seed, dtype):
    """Parameters with a spread of decays, including slow ones (|q| close to 1, long memory)."""
    p = raw_params(D, N, seed, dtype=F64)
    p["alpha"] = torch.linspace(-4.0, 2.0, D * N, dtype=F64).view(D, N, 1)
    p["delta"] = torch.linspace(-3.0, 1.0, D * N, dtype=F64).flip(0).view(D, N, 1)
    return {k: v.to(dtype) for k, v in p.items()}


def test_float32_fast_path_vs_float64_reference(monkeypatch):
    """float32 chunked scan (default block), FFT path and the default dispatcher at L=1000 vs float64
    naive on the same float32 values: rel 1e-5 (outputs and final state)."""
    B, L, D, N = 2, 1000, 8, 4
    p32 = _long_memory_params(D, N, seed=80, dtype=torch.float32)
    x32 = rand_x(B, L, D, seed=81, dtype=torch.float32)
    h0 = rand_h0(B, D, N, seed=82).to(torch.complex64)
    c32 = coefs(p32)
    assert c32.p.dtype == torch.float32
    c64 = coefs({k: v.to(F64) for k, v in p32.items()})
    y_ref, h_ref = cema_naive(x32.to(F64), c64, h0.to(torch.complex128))
    y, h = cema_chunked(x32, c32, h0, need_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.complex64
    assert rel(y.to(F64), y_ref) <= 1e-5
    assert rel(h.to(torch.complex128), h_ref) <= 1e-5
    monkeypatch.delenv("MEGALODON_CEMA_IMPL", raising=False)
    y_d, h_d = cema(x32, c32, h0, need_state=True)
    assert y_d.dtype == torch.float32
    assert rel(y_d.to(F64), y_ref) <= 1e-5
    assert rel(h_d.to(torch.complex128), h_ref) <= 1e-5
    y_fft = cema_fft(x32, c32, h0)
    assert y_fft.dtype == torch.float32
    assert rel(y_fft.to(F64), y_ref) <= 1e-5


def test_bf16_input_computed_in_float32():
    """bf16 x: output bf16, equal to the float32 computation rounded to bf16 (elementwise <= 2^-8 rel),
    and close to the float32 result on the un-rounded input (rel 1e-2)."""
    B, L, D, N = 2, 40, 4, 3
    p = raw_params(D, N, seed=90, dtype=torch.float32)
    c = coefs(p)
    x32 = rand_x(B, L, D, seed=91, dtype=torch.float32)
    xb = x32.to(torch.bfloat16)
    for name, run in [
        ("chunk", lambda x: cema_chunked(x, c, block_size=8)[0]),
        ("naive", lambda x: cema_naive(x, c)[0]),
        ("fft", lambda x: cema_fft(x, c)),
    ]:
        yb = run(xb)
        assert yb.dtype == torch.bfloat16, name
        y_same_input = run(xb.float())
        err = (yb.float() - y_same_input).abs()
        assert bool((err <= 2.0**-8 * y_same_input.abs() + 1e-30).all()), name
        assert rel(yb.float(), run(x32)) <= 1e-2, name


# ----------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------


def _cema_module():
    # `megalodon_lm.ops.cema` as an attribute is the function (re-exported); the package is in sys.modules.
    return importlib.import_module("megalodon_lm.ops.cema")


def _spy(monkeypatch):
    mod = _cema_module()
    calls = []
    real_naive, real_chunked = mod.cema_naive, mod.cema_chunked

    def naive(*a, **k):
        calls.append("naive")
        return real_naive(*a, **k)

    def chunked(*a, **k):
        calls.append("chunk")
        return real_chunked(*a, **k)

    monkeypatch.setattr(mod, "cema_naive", naive)
    monkeypatch.setattr(mod, "cema_chunked", chunked)
    return calls


@pytest.mark.parametrize(
    "impl,L,expected",
    [("naive", 9, "naive"), ("chunk", 9, "chunk"), ("chunk", 1, "chunk"), ("naive", 1, "naive"),
     (None, 1, "naive"), (None, 9, "chunk"), ("auto", 9, "chunk")],
)
def test_dispatcher_honours_env(monkeypatch, impl, L, expected):
    """MEGALODON_CEMA_IMPL forces the path; results equal naive (rel 1e-10) with lengths and h0."""
    if impl is None:
        monkeypatch.delenv("MEGALODON_CEMA_IMPL", raising=False)
    else:
        monkeypatch.setenv("MEGALODON_CEMA_IMPL", impl)
    calls = _spy(monkeypatch)
    B, D, N = 2, 3, 2
    coef = coefs(raw_params(D, N, seed=100))
    x = rand_x(B, L, D, seed=101)
    h0 = rand_h0(B, D, N, seed=102)
    lengths = torch.tensor([L, L - 1])
    y, h = cema(x, coef, h0, lengths=lengths, need_state=True)
    assert calls == [expected]
    y_ref, h_ref = cema_naive(x[:1], coef, h0[:1])
    assert rel(y[:1], y_ref) <= 1e-10
    assert rel(h[:1], h_ref) <= 1e-10
    _, h_ref1 = cema_naive(x[1:, : L - 1], coef, h0[1:])
    if L - 1 == 0:
        assert torch.equal(h[1:], h0[1:])
    else:
        assert rel(h[1:], h_ref1) <= 1e-10
    # need_state=False: no state, whatever the path.
    calls.clear()
    _, h_none = cema(x, coef, h0)
    assert h_none is None and calls == [expected]


def test_dispatcher_rejects_unknown_impl(monkeypatch):
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "bogus")
    coef = coefs(raw_params(2, 2, seed=0))
    for L in (1, 9):
        with pytest.raises(ValueError):
            cema(rand_x(1, L, 2, seed=0), coef)
