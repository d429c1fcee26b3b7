"""Per-token norms with the reference's plus-one parameterisation: scale = (weight + 1), weight init 0."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. `affine=False` gives a parameter-free RMS normalisation."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight is not None:
            self.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * (self.weight + 1)
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with plus-one scale and a bias (both optional together)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for p in (self.weight, self.bias):
            if p is not None:
                p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight + 1
        return F.layer_norm(x, (self.dim,), weight, self.bias, self.eps)
