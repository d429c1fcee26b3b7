"""CEMA by FFT convolution, the reference's training path (docs/architecture.md §2.5-2.6), no D*N*L tensors.

    y = k * x (causal, length L)  +  Re(sum_n eta_n q_n^(t+1) h0_n)  +  omega x
    k_{aT+b} = Re(sum_n (eta p q^b)_n (q^(aT))_n)     built as one (L/T, 2N) x (2N, T) matmul per channel

Kept as a measured alternative to the chunked scan (docs/cema.md); it returns no final state.
"""

from __future__ import annotations

import torch

from .coefficients import CemaCoefficients

_BLOCK = 64


def _blockwise_powers_product(coef_lhs: torch.Tensor, coef: CemaCoefficients, L: int) -> torch.Tensor:
    """Re(sum_n c_n q_n^(t)) for t = 0..L-1 where c: (..., D, N) -> (..., D, L), via q^(aT+b) = q^(aT) q^b."""
    T = min(_BLOCK, L)
    nb = -(-L // T)
    dt = coef.p.dtype
    outer = coef.powers(torch.arange(nb, device=coef.p.device, dtype=dt) * T)  # (D, N, nb)
    inner = coef.powers(torch.arange(T, device=coef.p.device, dtype=dt))  # (D, N, T)
    lhs = coef_lhs.unsqueeze(-2) * outer.transpose(-1, -2)  # (..., D, nb, N)
    lhs = torch.cat([lhs.real, -lhs.imag], dim=-1)  # (..., D, nb, 2N)
    rhs = torch.cat([inner.real, inner.imag], dim=-2)  # (D, 2N, T)
    out = torch.matmul(lhs, rhs)  # (..., D, nb, T)
    return out.flatten(-2)[..., :L]


def cema_fft(x: torch.Tensor, coef: CemaCoefficients, h0: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, L, D) -> y (B, L, D) in x's dtype. h0: optional (B, D, N) complex incoming state."""
    B, L, D = x.shape
    dt = coef.p.dtype
    xf = x.to(dt).transpose(1, 2)  # (B, D, L)
    k = _blockwise_powers_product(coef.eta * coef.p, coef, L)  # (D, L)
    n_fft = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(xf, n=n_fft) * torch.fft.rfft(k, n=n_fft), n=n_fft)[..., :L]
    if h0 is not None:
        # bias_t = Re(sum_n eta q^(t+1) h0): same blockwise product with c = eta q h0.
        c = coef.eta * torch.exp(coef.log_q) * h0.to(coef.eta.dtype)  # (B, D, N)
        y = y + _blockwise_powers_product(c, coef, L)
    y = y + coef.omega.unsqueeze(-1) * xf
    return y.transpose(1, 2).to(x.dtype)
