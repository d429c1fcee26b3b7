"""CEMA coefficients (docs/architecture.md §2.3) from the raw parameters.

    p  = sigmoid(alpha)                                   (D, N) real
    q  = (1 - p * sigmoid(delta)) * exp(i * n * phi_d)    (D, N) complex, |q| < 1
         phi_d = sigmoid(theta_d) * 2*pi / N,  n = 1..N
    eta = (gamma_re + i * gamma_im) * sqrt(1 / N)         (D, N) complex

We return log(q) instead of q: powers q^m are formed as exp(m * log q), which is accurate for large m.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._dtypes import complex_dtype, compute_dtype


class CemaCoefficients(NamedTuple):
    p: torch.Tensor  # (D, N) real: input weight
    log_q: torch.Tensor  # (D, N) complex: log of the per-step decay/rotation
    eta: torch.Tensor  # (D, N) complex: output projection
    omega: torch.Tensor  # (D,) real: skip weight
    q: torch.Tensor  # (D, N) complex: exp(log_q), for the step-by-step recurrence

    def powers(self, exponents: torch.Tensor) -> torch.Tensor:
        """q ** exponents for a 1-D real tensor of exponents -> (D, N, len(exponents)) complex."""
        return torch.exp(self.log_q.unsqueeze(-1) * exponents.to(self.p.dtype))


def cema_coefficients(
    alpha: torch.Tensor,
    delta: torch.Tensor,
    theta: torch.Tensor,
    gamma: torch.Tensor,
    omega: torch.Tensor,
) -> CemaCoefficients:
    """Raw parameters with reference shapes -> coefficients in float32/complex64 (float64 if params are).

    alpha, delta: (D, N, 1); theta: (D, 1, 1); gamma: (D, N, 2); omega: (D, 1).
    """
    dt = compute_dtype(alpha)
    D, N = alpha.shape[0], alpha.shape[1]
    p = torch.sigmoid(alpha.to(dt)).view(D, N)
    d = torch.sigmoid(delta.to(dt)).view(D, N)
    phi = torch.sigmoid(theta.to(dt)).view(D, 1) * (2.0 * math.pi / N)
    harmonics = torch.arange(1, N + 1, device=alpha.device, dtype=dt)
    angle = phi * harmonics  # (D, N)
    magnitude = 1.0 - p * d
    log_q = torch.complex(torch.log(magnitude), angle)
    g = gamma.to(dt)
    eta = torch.complex(g[..., 0], g[..., 1]).to(complex_dtype(dt)) * math.sqrt(1.0 / N)
    return CemaCoefficients(p=p, log_q=log_q, eta=eta, omega=omega.to(dt).view(D), q=torch.exp(log_q))
