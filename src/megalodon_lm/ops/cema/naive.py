"""Readable reference CEMA: the recurrence of docs/architecture.md §2.4, one time step at a time.

    h_t = p * x_t + q * h_{t-1}          h in C^N per channel
    y_t = Re(sum_n eta_n h_{t,n}) + omega * x_t

Exact in float64; O(L) Python steps, so it is also the cheapest path for single-token decoding.
"""

from __future__ import annotations

import torch

from .._dtypes import complex_dtype
from ..varlen import check_cu_seqlens
from .coefficients import CemaCoefficients


def cema_naive(
    x: torch.Tensor,
    coef: CemaCoefficients,
    h0: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, L, D) -> (y (B, L, D) in x's dtype, h_L (B, D, N) complex).

    h0: (B, D, N) complex initial state (zeros if None). valid: (B, L) bool, False = padding: a padded
    step leaves the state unchanged (its output is computed but meaningless).
    cu_seqlens: packed documents over the B*L tokens (ops/varlen.py): each runs alone from a zero state;
    the returned state (1, D, N) is the last document's. Not combinable with h0 or valid.
    """
    B, L, D = x.shape
    if cu_seqlens is not None:
        if h0 is not None or valid is not None:
            raise ValueError("cema with cu_seqlens starts every document from zero: pass neither h0 nor valid")
        check_cu_seqlens(cu_seqlens, B * L)
        stream = x.reshape(1, B * L, D)
        bounds = cu_seqlens.tolist()
        parts = [cema_naive(stream[:, a:b], coef) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return torch.cat([y for y, _ in parts], dim=1).view(B, L, D), parts[-1][1]
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
