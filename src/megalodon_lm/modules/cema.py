"""Multi-head complex EMA module (docs/architecture.md §2): parameters, reference initialisation, forward."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.cema import CemaCoefficients, cema, cema_coefficients
from .lean import lean_active


class ComplexEMA(nn.Module):
    """Depthwise complex EMA over D channels with an N-dimensional complex state per channel.

    Parameters (reference names and shapes): alpha, delta (D, N, 1); theta (D, 1, 1);
    gamma (D, N, 2) = real/imag of eta before the sqrt(1/N) scale; omega (D, 1) skip weight.
    """

    def __init__(self, dim: int, ndim: int) -> None:
        super().__init__()
        self.dim, self.ndim = dim, ndim
        self.alpha = nn.Parameter(torch.empty(dim, ndim, 1))
        self.delta = nn.Parameter(torch.empty(dim, ndim, 1))
        self.theta = nn.Parameter(torch.empty(dim, 1, 1))
        self.gamma = nn.Parameter(torch.empty(dim, ndim, 2))
        self.omega = nn.Parameter(torch.empty(dim, 1))
        self._coef_cache: tuple[tuple, CemaCoefficients] | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference initialisation (§2.2), on any device and without torch.distributed."""
        D = self.dim
        nn.init.normal_(self.alpha, 0.0, 0.2)
        nn.init.normal_(self.delta, 0.0, 0.2)
        # Base frequencies D^(-i/D), i = 1..D, randomly permuted over channels; theta = logit(f).
        i = torch.arange(1, D + 1, dtype=torch.float64)
        freqs = torch.exp(-i * math.log(D) / D).clamp(max=1 - 1e-6)[torch.randperm(D)]
        self.theta.copy_(torch.logit(freqs).view(D, 1, 1).to(self.theta.dtype))
        nn.init.normal_(self.gamma[..., 0], 0.0, 1.0)
        self.gamma[..., 1].zero_()
        nn.init.trunc_normal_(self.omega, mean=0.0, std=0.25, a=-1.0, b=1.0)

    def coefficients(self) -> CemaCoefficients:
        """(p, log q, eta, omega). Cached while gradients are off (decoding), keyed on the parameters'
        storage and in-place version counters, so an optimizer step or a load refreshes it (the
        reference's eval-mode cache goes stale instead)."""
        params = (self.alpha, self.delta, self.theta, self.gamma, self.omega)
        if torch.is_grad_enabled():
            return cema_coefficients(*params)
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if self._coef_cache is None or self._coef_cache[0] != key:
            self._coef_cache = (key, cema_coefficients(*params))
        return self._coef_cache[1]

    def forward(
        self,
        x: torch.Tensor,
        h0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        need_state: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L, D) -> (y (B, L, D), final complex state (B, D, N) if need_state).

        cu_seqlens: packed documents over the B*L tokens, each from a zero state (ops/varlen.py)."""
        return cema(x, self.coefficients(), h0, lengths, need_state, cu_seqlens=cu_seqlens, lean=lean_active())
