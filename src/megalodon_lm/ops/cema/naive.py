"""Readable reference CEMA: the recurrence of reference-spec §2.4, one time step at a time.

    h_t = p * x_t + q * h_{t-1}          h in C^N per channel
    y_t = Re(sum_n eta_n h_{t,n}) + omega * x_t

Exact in float64; O(L) Python steps, so it is also the cheapest path for single-token decoding.
"""

from __future__ import annotations

import torch

from .._dtypes import complex_dtype
from .coefficients import CemaCoefficients


def cema_naive(
    x: torch.Tensor,
    coef: CemaCoefficients,
    h0: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, L, D) -> (y (B, L, D) in x's dtype, h_L (B, D, N) complex).

    h0: (B, D, N) complex initial state (zeros if None). valid: (B, L) bool, False = padding: a padded
    step leaves the state unchanged (its output is computed but meaningless).
    """
    B, L, D = x.shape
    dt = coef.p.dtype
    xf = x.to(dt)
    q = coef.q
    h = torch.zeros(B, D, coef.p.shape[1], dtype=complex_dtype(dt), device=x.device) if h0 is None else h0
    h = h.to(complex_dtype(dt))
    ys = []
    for t in range(L):
        xt = xf[:, t, :]
        h_new = coef.p * xt.unsqueeze(-1) + q * h
        if valid is not None:
            h_new = torch.where(valid[:, t].view(B, 1, 1), h_new, h)
        h = h_new
        ys.append((coef.eta * h).real.sum(-1) + coef.omega * xt)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(B, 0, D)
    return y.to(x.dtype), h
