"""The chunked CEMA scan (chunk.py) as one autograd Function with a hand-written backward.

Same algorithm and numbers as `cema_chunked` (to rounding), but the forward runs without autograd and
saves only x (B, L, D), the (D, N) coefficients, h0 and the block states (B*D*2N*L/T reals); the backward
rebuilds the small (D, N, T) operators and runs the same block matmuls and block scan on the gradient.
Arithmetic is real wherever tensors are large: x, y, their gradients and every matmul operand are real,
complex states are interleaved (re, im) columns, and powers of q are exp(m Re log q) times
cos/sin(m Im log q) (PyTorch's complex exp is not vectorised on CPU: in `cema_chunked` it cost more than
the matmuls). Complex views appear only for the block scan's multiply-add (one op per block; four real
ones measured 2-3x slower) and for (D, N)-sized sums.

Forward, per channel and mode (n implicit), blocks of T tokens, P_m = q^m, c block, i, j in [0, T):
    U_c = sum_j p P_(T-1-j) x_cj                         (block input; one matmul against V)
    H_0 = h0,  H_(c+1) = a H_c + U_c,  a = P_T          (block scan, sequential over blocks)
    y_ci = sum_(j<=i) k_(i-j) x_cj + Re sum_n w_i H_c   (Toeplitz matmul + one against W)
    k_m = Re sum_n eta p P_m + omega [m = 0],  w_i = eta P_(i+1)
    final state (row's last token at block c*, offset i*): h = P_(i*+1) H_c* + sum_(j<=i*) p P_(i*-j) x_c*j

Backward (PyTorch's convention: the gradient of a complex z is dL/dRe z + i dL/dIm z, so z = s u gives
grad u = conj(s) grad z, and a real r multiplying z gets Re(conj(z) grad)). g = dL/dy, G = grad of h:
    direct:   gH_c = sum_i g_ci conj(w_i)  (+ G conj(P_(i*+1)) at c*)
    adjoint:  Lam_c = gH_c + conj(a) Lam_(c+1)   -- the same block scan, time-reversed, decay conj(a)
              grad h0 = Lam_0,  grad U_c = Lam_(c+1) (0 for the last block),  grad a = sum Lam_(c+1) conj(H_c)
    x:        grad x_cj = sum_(i>=j) k_(i-j) g_ci + Re sum_n conj(p P_(T-1-j)) Lam_(c+1)  (+ final-state term)
              -- the filter's adjoint is the same filter run backwards in time (transposed Toeplitz)
    operators (sums over rows and blocks, i.e. x/adjoint products with the block states):
              dk_m = sum_(i-j=m) g_ci x_cj,  dV_j = sum x_cj Lam_(c+1),  dw_i = sum g_ci conj(H_c)
    coefficients, collecting per power m the gradient of P_m:
              Y_m = dk_m conj(eta) + dV_(T-1-m) (+ G x_c*j at m = i*-j)     gradient of p P_m
              E_m = dk_m p + dw_(m-1)                                        gradient of eta through P_m
              Z_m = p Y_m + conj(eta) dw_(m-1) + [m = T] grad a (+ G conj(H_c*) at m = i*+1)
              grad log q = sum_m m conj(P_m) Z_m,  grad p = Re sum_m conj(P_m) Y_m,
              grad eta = sum_m conj(P_m) E_m,      grad omega = dk_0
    (`_coefficient_grads` evaluates these as sums over m of conj(P_m) times dk, dV and dw, plain and
    m-weighted, then combines (D, N) terms.)
Verified against autograd through `cema_chunked` and against `cema_naive` in tests/ops/test_cema_fn.py.
No double backward (the backward is not itself differentiable).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dtypes import complex_dtype
from .chunk import cema_chunked
from .coefficients import CemaCoefficients


def block_size_fn(tokens: int) -> int:
    """T ~ sqrt(B*L)/2 for B*L tokens, a power of two in [16, 128] (16 up to 1K tokens, 32 at 2K-4K, 64 at
    8K-16K). Smaller than `default_block_size`: the (D, N, T) operators and coefficient gradients are a
    larger share of the work here, while the block scan's cost grows with B*L/T. Measured in docs/cema.md."""
    t = 1 << max(0, math.floor(math.log2(max(1, tokens)) / 2 - 0.5))
    return min(128, max(16, t))


def _powers(log_q: torch.Tensor, T: int) -> torch.Tensor:
    """q^m for m = 0..T as one real tensor (D, 2, N, T+1): [:, 0] real parts, [:, 1] imaginary parts."""
    D, N = log_q.shape
    m = torch.arange(T + 1, device=log_q.device, dtype=log_q.real.dtype)
    ang = log_q.imag.unsqueeze(-1) * m
    out = torch.empty(D, 2, N, T + 1, device=log_q.device, dtype=ang.dtype)
    torch.cos(ang, out=out[:, 0])
    torch.sin(ang, out=out[:, 1])
    return out.mul_(torch.exp(log_q.real.unsqueeze(-1) * m).unsqueeze(1))


def _upper_toeplitz(k: torch.Tensor) -> torch.Tensor:
    """k (D, T) -> (D, T, T) with [j, i] = k[i - j] for i >= j, else 0, in one strided write.

    Rows are T+1 apart in a buffer of T*T + T per channel, so that writing k[m] at (j, m), m <= T, of a
    (T, T+1) view lands on row j, column j + m of the (T, T) view when j + m < T and on the lower
    triangle otherwise (masked to 0; every lower entry is hit once). The view has row stride T."""
    D, T = k.shape
    buf = k.new_empty(D, T * T + T)
    j = torch.arange(T, device=k.device)
    upper = ((j.unsqueeze(1) + torch.arange(T + 1, device=k.device)) < T).to(k.dtype)  # (T, T+1): j + m < T
    torch.mul(F.pad(k, (0, 1)).unsqueeze(1), upper, out=buf.as_strided((D, T, T + 1), (T * T + T, T + 1, 1)))
    return buf.as_strided((D, T, T), (T * T + T, T, 1))


def _diagonal_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a, b (D, R, T) -> (D, T): out[:, s] = sum_j (a^T b)[:, j, j + s] (the adjoint of `_upper_toeplitz`).

    a^T b is written into a buffer with T spare entries and read with row stride T+1, so (j, s) is
    (j, j + s) while j + s < T; the rest is masked (the spare entries are zeroed: no NaN from garbage)."""
    D, _, T = a.shape
    buf = a.new_empty(D * T * T + T)
    buf[D * T * T:].zero_()
    torch.bmm(a.transpose(1, 2), b, out=buf[: D * T * T].view(D, T, T))
    j = torch.arange(T, device=a.device)
    upper = ((j.unsqueeze(1) + j) < T).to(a.dtype)  # a float mask: bool operands take a slow casting path
    return (buf.as_strided((D, T, T), (T * T, T + 1, 1)) * upper).sum(1)


def _to_blocks(t: torch.Tensor, dtype: torch.dtype, T: int, nb: int) -> torch.Tensor:
    """(B, L, D) -> (D, B*nb, T) in `dtype`, zero past L: channels batch the matmuls.

    As one 2-D transpose of (B*nb*T, D), which PyTorch copies cache-blocked (a 3-D permuted copy, or one
    per row into a strided destination, measured 1.5-5x slower)."""
    B, L, D = t.shape
    src = t.to(dtype)
    if nb * T != L:
        src = F.pad(src, (0, 0, 0, nb * T - L))
    return src.reshape(B * nb * T, D).t().contiguous().view(D, B * nb, T)


def _from_blocks(t: torch.Tensor, B: int, L: int, dtype: torch.dtype) -> torch.Tensor:
    """(D, B*nb, T) -> (B, L, D) contiguous in `dtype` (one 2-D transpose, plus a copy when padded)."""
    D = t.shape[0]
    out = t.view(D, -1).t().contiguous().view(B, -1, D)
    if out.shape[1] != L:
        out = out[:, :L].contiguous()
    return out.to(dtype)


class _Operators:
    """The small operators of one block size, rebuilt from the coefficients in the forward and the backward.

    State columns are interleaved (re_0, im_0, re_1, ...), so a (.., 2N) real tensor views as (.., N) complex."""

    def __init__(self, p: torch.Tensor, log_q: torch.Tensor, eta: torch.Tensor, omega: torch.Tensor,
                 T: int) -> None:
        D, N = p.shape
        self.T, self.N = T, N
        self.pw = _powers(log_q, T)  # (D, 2, N, T+1)
        # k_m = Re sum_n eta p P_m = [p Re eta, -p Im eta] . [Re P_m; Im P_m], one matmul; omega on k_0.
        row = torch.cat([p * eta.real, -p * eta.imag], 1).unsqueeze(1)  # (D, 1, 2N)
        k = torch.bmm(row, self.pw.view(D, 2 * N, T + 1)[..., :T]).view(D, T)
        k[:, 0] += omega
        self.toeplitz = _upper_toeplitz(k)  # (D, T_j, T_i)
        # V^T (D, 2N, T): interleaved rows (Re, Im) of p P_(T-1-j): U = xb @ V.
        v = self.pw[..., :T].flip(-1) * p.view(D, 1, N, 1)  # (D, 2, N, T)
        self.v_t = v.transpose(1, 2).reshape(D, 2 * N, T)
        # W (D, 2N, T): interleaved rows (Re w_i, -Im w_i), w_i = eta P_(i+1): Re(w H) = [H_re, H_im] . rows.
        pr, pi = self.pw[:, 0, :, 1:], self.pw[:, 1, :, 1:]
        er, ei = eta.real.unsqueeze(-1), eta.imag.unsqueeze(-1)
        w = torch.empty(D, N, 2, T, device=p.device, dtype=p.dtype)
        torch.mul(er, pr, out=w[:, :, 0]).addcmul_(ei, pi, value=-1.0)
        torch.mul(er, pi, out=w[:, :, 1]).addcmul_(ei, pr).neg_()
        self.w_rows = w.view(D, 2 * N, T)

    def at(self, exps: torch.Tensor) -> torch.Tensor:
        """Complex q^e for integer exponents e in [0, T] of any shape -> (D, N, *e.shape)."""
        return torch.complex(self.pw[:, 0, :, exps], self.pw[:, 1, :, exps])


def _as_complex(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """Interleaved real (..., 2N) -> complex view of the given shape (last dim N)."""
    return torch.view_as_complex(t.view(*shape, 2))


def _scan_(hc: torch.Tensor, a: torch.Tensor, reverse: bool) -> None:
    """In place along the block axis of hc (D, B, nb, N) complex, a (D, 1, N):
    forward  h_c += a h_(c-1) (c = 1 .. nb-1);  reverse  h_c += conj(a) h_(c+1) (c = nb-2 .. 0).

    A sequential loop of one complex multiply-add per block. Measured on CPU: a log-depth (Hillis-Steele)
    scan does log2(nb) passes over all block states and is 6-10x slower; four real multiply-adds on
    (re, im) planes instead of the one complex one, about 2x slower."""
    nb = hc.shape[2]
    if reverse:
        a = a.conj().resolve_conj()
        for c in range(nb - 2, -1, -1):
            hc[:, :, c].addcmul_(a, hc[:, :, c + 1])
    else:
        for c in range(1, nb):
            hc[:, :, c].addcmul_(a, hc[:, :, c - 1])


def _decay(ops: _Operators, log_q: torch.Tensor) -> torch.Tensor:
    """a = q^T (D, 1, N) complex: the decay of a state across one block."""
    return ops.at(torch.tensor(ops.T, device=log_q.device)).unsqueeze(1)


class _FinalIndex:
    """Per row: block c* and offset i* of the last real token, with the (B, T) exponents i* - j."""

    def __init__(self, lengths: torch.Tensor | None, B: int, L: int, T: int, device: torch.device) -> None:
        if lengths is None:
            lengths = torch.full((B,), L, device=device, dtype=torch.long)
        self.nonempty = lengths > 0  # rows without a real token keep h0
        last = (lengths - 1).clamp(min=0)
        self.blk = last // T
        self.i = last - self.blk * T
        e = self.i.unsqueeze(1) - torch.arange(T, device=device)
        self.keep = e >= 0
        self.e = e.clamp(min=0)
        self.rows = torch.arange(B, device=device)

    def block_x(self, xb: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """The last block's inputs per row, zero past i*: (D, B, T)."""
        return xb.view(xb.shape[0], B, -1, T)[:, self.rows, self.blk] * self.keep

    def block_h(self, hc: torch.Tensor) -> torch.Tensor:
        """The state entering the last block, per row: (D, B, N) complex."""
        return hc[:, self.rows, self.blk]


def _final_state(ops: _Operators, p: torch.Tensor, xb: torch.Tensor, hc: torch.Tensor, h0: torch.Tensor | None,
                 fin: _FinalIndex, B: int) -> torch.Tensor:
    """h = P_(i*+1) H_c* + p sum_(j<=i*) P_(i*-j) x_c*j per row -> complex (B, D, N)."""
    xs = fin.block_x(xb, B, ops.T).to(hc.dtype)  # (D, B, T)
    inner = (ops.at(fin.e) * xs.unsqueeze(1)).sum(-1)  # (D, N, B)
    h = ops.at(fin.i + 1).permute(0, 2, 1) * fin.block_h(hc) + p.unsqueeze(1) * inner.permute(0, 2, 1)
    h = h.transpose(0, 1)  # (B, D, N)
    fallback = torch.zeros_like(h) if h0 is None else h0.to(h.dtype)
    return torch.where(fin.nonempty.view(B, 1, 1), h, fallback)


class _CemaChunkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, log_q, eta, omega, h0, lengths, need_state: bool, T: int):
        B, L, D = x.shape
        dt, N = p.dtype, p.shape[1]
        nb = -(-L // T)
        ops = _Operators(p, log_q, eta, omega, T)
        xb = _to_blocks(x, dt, T, nb)  # (D, B*nb, T)
        u = torch.bmm(xb, ops.v_t.transpose(1, 2)).view(D, B, nb, 2 * N)
        # Entering states: [h0, U_0, .., U_(nb-2)] scanned with decay a gives H_c = a H_(c-1) + U_(c-1).
        hs = torch.empty(D, B, nb, 2 * N, device=x.device, dtype=dt)
        if h0 is None:
            hs[:, :, 0].zero_()
        else:
            hs[:, :, 0] = torch.view_as_real(h0.to(complex_dtype(dt))).transpose(0, 1).reshape(D, B, 2 * N)
        hs[:, :, 1:] = u[:, :, :-1]
        hc = _as_complex(hs, D, B, nb, N)
        _scan_(hc, _decay(ops, log_q), reverse=False)
        hs = hs.view(D, B * nb, 2 * N)
        y = _from_blocks(torch.baddbmm(torch.bmm(xb, ops.toeplitz), hs, ops.w_rows), B, L, x.dtype)
        ctx.save_for_backward(x, p, log_q, eta, omega, h0, lengths, hs)
        ctx.T = T
        ctx.set_materialize_grads(False)
        if not need_state:
            return y
        return y, _final_state(ops, p, xb, hc, h0, _FinalIndex(lengths, B, L, T, x.device), B)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh=None):
        x, p, log_q, eta, omega, h0, lengths, hs = ctx.saved_tensors
        T = ctx.T
        B, L, D = x.shape
        dt, N = p.dtype, p.shape[1]
        nb = -(-L // T)
        ops = _Operators(p, log_q, eta, omega, T)
        xb = _to_blocks(x, dt, T, nb)
        gb = torch.zeros_like(xb) if gy is None else _to_blocks(gy, dt, T, nb)
        hc = _as_complex(hs, D, B, nb, N)

        g_h = torch.bmm(gb, ops.w_rows.transpose(1, 2))  # (D, B*nb, 2N): sum_i g conj(w_i)
        lam = _as_complex(g_h, D, B, nb, N)
        fin = g_fin = None
        if gh is not None:
            fin = _FinalIndex(lengths, B, L, T, x.device)
            g_fin = (gh.to(hc.dtype) * fin.nonempty.view(B, 1, 1)).transpose(0, 1)  # (D, B, N); empty rows: h0
            lam[:, fin.rows, fin.blk] += g_fin * ops.at(fin.i + 1).conj().permute(0, 2, 1)
        _scan_(lam, _decay(ops, log_q), reverse=True)  # lam_c = gH_c + conj(a) lam_(c+1)
        g_u = torch.zeros_like(g_h).view(D, B, nb, 2 * N)
        g_u[:, :, :-1] = g_h.view(D, B, nb, 2 * N)[:, :, 1:]  # grad U_c = lam_(c+1)
        g_u = g_u.view(D, B * nb, 2 * N)

        grad_x = grad_h0 = None
        if ctx.needs_input_grad[0]:
            gxb = torch.baddbmm(torch.bmm(gb, ops.toeplitz.transpose(1, 2)), g_u, ops.v_t)
            if fin is not None:
                # d/dx_c*j of Re sum_n conj(G) p P_(i*-j) x_c*j, j <= i*
                t = (ops.at(fin.e).conj() * g_fin.transpose(1, 2).unsqueeze(-1)).real  # (D, N, B, T)
                gxb.view(D, B, nb, T)[:, fin.rows, fin.blk] += (p.view(D, N, 1, 1) * t).sum(1) * fin.keep
            grad_x = _from_blocks(gxb, B, L, x.dtype)
        if h0 is not None and ctx.needs_input_grad[5]:
            grad_h0 = lam[:, :, 0].transpose(0, 1)
            if gh is not None:  # a row without a real token returns h0 itself as its final state
                grad_h0 = grad_h0 + gh.to(grad_h0.dtype) * (~fin.nonempty).view(B, 1, 1)
            grad_h0 = grad_h0.to(h0.dtype)

        grads = [None, None, None, None]
        if any(ctx.needs_input_grad[1:5]):
            grads = _coefficient_grads(ops, p, eta, xb, gb, hs, g_u, fin, g_fin, B)
        return (grad_x, *grads, grad_h0, None, None, None)


def _row_sums(xr: torch.Tensor, xi: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex (xr + i xi) (D, N, T) summed over T with each of the (T, 2) weight columns -> two (D, N)."""
    s = torch.complex(xr @ weights, xi @ weights)  # (D, N, 2)
    return s[..., 0], s[..., 1]


def _conj_dot(pr: torch.Tensor, pi: torch.Tensor, ar: torch.Tensor, ai: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_m w_m conj(P_m) A_m for two weight columns w (T, 2); planes (D, N, T) -> two complex (D, N)."""
    xr = torch.mul(pr, ar).addcmul_(pi, ai)
    xi = torch.mul(pr, ai).addcmul_(pi, ar, value=-1.0)
    return _row_sums(xr, xi, weights)


def _coefficient_grads(ops: _Operators, p: torch.Tensor, eta: torch.Tensor, xb: torch.Tensor, gb: torch.Tensor,
                       hs: torch.Tensor, g_u: torch.Tensor, fin: _FinalIndex | None, g_fin: torch.Tensor | None,
                       B: int) -> list[torch.Tensor]:
    """Gradients of p, log q, eta, omega (see the module docstring: K, V, W below are the sums over m of
    conj(P_m) times dk_m, dV_(T-1-m) and dw_(m-1), plain and weighted by m)."""
    D, N, T = p.shape[0], ops.N, ops.T
    pw, dt = ops.pw, p.dtype
    dk = _diagonal_sums(xb, gb)  # (D, T)
    m = torch.arange(T + 1, device=p.device, dtype=dt)
    one_m = torch.stack([torch.ones_like(m), m], 1)  # (T+1, 2): plain and m-weighted sums
    # K = sum_m conj(P_m) dk_m (and m-weighted): one matmul against the power table.
    kk = torch.bmm(pw.view(D, 2 * N, T + 1)[..., :T], dk.unsqueeze(-1) * one_m[:T])  # (D, 2N, 2)
    k0 = torch.complex(kk[:, :N, 0], -kk[:, N:, 0])
    k1 = torch.complex(kk[:, :N, 1], -kk[:, N:, 1])
    # V = sum_j conj(P_(T-1-j)) dV_j, dV_j = sum_c x_cj grad U_c; weights T-1-j.
    dv = torch.bmm(g_u.transpose(1, 2), xb).view(D, N, 2, T)  # (D, N, (re, im), T_j)
    pf = pw[..., :T].flip(-1)
    v0, v1 = _conj_dot(pf[:, 0], pf[:, 1], dv[:, :, 0], dv[:, :, 1], one_m[:T].flip(0))
    # W = sum_i conj(P_(i+1)) dw_i, dw_i = sum_c g_ci conj(H_c); weights i+1.
    dw = torch.bmm(hs.transpose(1, 2), gb).view(D, N, 2, T)  # rows (sum g H_re, sum g H_im)
    w0, w1 = _conj_dot(pw[:, 0, :, 1:], pw[:, 1, :, 1:], dw[:, :, 0], -dw[:, :, 1], one_m[1:])
    # grad a = sum_(b,c) grad U_c conj(H_c)
    g_a = (_as_complex(g_u, D, -1, N) * _as_complex(hs, D, -1, N).conj()).sum(1)
    s0 = eta.conj() * k0 + v0  # sum_m conj(P_m) Y_m
    s1 = eta.conj() * k1 + v1  # sum_m m conj(P_m) Y_m
    g_lq = eta.conj() * w1 + T * ops.at(torch.tensor(T, device=p.device)).conj() * g_a
    if fin is not None:
        gf = g_fin.transpose(1, 2)  # (D, N, B)
        xs = fin.block_x(xb, B, T).to(gf.dtype).unsqueeze(1)  # (D, 1, B, T)
        pe = ops.at(fin.e)  # (D, N, B, T)
        ew = fin.e.to(dt)
        s0 = s0 + (gf * (pe * xs).sum(-1).conj()).sum(-1)
        s1 = s1 + (gf * (pe * xs * ew).sum(-1).conj()).sum(-1)
        i1 = (fin.i + 1).to(dt)
        h_sel = fin.block_h(_as_complex(hs, D, B, -1, N)).transpose(1, 2)  # (D, N, B)
        g_lq = g_lq + (i1 * ops.at(fin.i + 1).conj() * gf * h_sel.conj()).sum(-1)
    grad_p = s0.real
    grad_lq = p * s1 + g_lq
    grad_eta = p * k0 + w0
    return [grad_p, grad_lq, grad_eta.to(eta.dtype), dk[:, 0]]


def cema_chunked_fn(
    x: torch.Tensor,
    coef: CemaCoefficients,
    h0: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    need_state: bool = False,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`cema_chunked` with a hand-written backward: same arguments and results (see chunk.py).

    x: (B, L, D); h0: (B, D, N) complex or None; lengths: (B,) right padding (outputs at pads are
    meaningless; the final state is taken after each row's last real token). Gradients flow to x, h0,
    coef.p, coef.log_q, coef.eta and coef.omega (not coef.q, which the chunked scan does not use), from y
    and from the final state. Saves x, the coefficients, h0 and the block states (B, D, 2N, L/T).
    block_size: tokens per block T (default `block_size_fn(B * L)`).
    """
    B, L, D = x.shape
    if L == 0:  # nothing to save
        return cema_chunked(x, coef, h0, lengths, need_state)
    T = max(1, min(block_size or block_size_fn(B * L), L))
    out = _CemaChunkFn.apply(x, coef.p, coef.log_q, coef.eta, coef.omega, h0, lengths, need_state, T)
    if need_state:
        return out
    return out, None
