"""TimestepNorm module: parameters and prior buffers around the `ops.timestep_norm` functions."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops._dtypes import compute_dtype
from ..ops.timestep_norm import timestep_norm
from .lean import lean_active

NormStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count (B,), mean (B, G), var (B, G)


class TimestepNorm(nn.Module):
    """Causal grouped normalisation with running (count, mean, var) carried across segments.

    Parameters `weight` (plus-one scale) and `bias` of shape (D,); buffers `prior_count` (scalar),
    `prior_mean` and `prior_logv` (G,) as in the reference, giving the state of a fresh stream.
    """

    def __init__(self, dim: int, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.num_groups, self.eps = dim, num_groups, eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("prior_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("prior_mean", torch.zeros(num_groups))
        self.register_buffer("prior_logv", torch.zeros(num_groups))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Plus-one scale offset and bias start at 0 (the priors are buffers and stay as they are)."""
        self.weight.zero_()
        self.bias.zero_()

    def initial_stats(self, batch_size: int) -> NormStats:
        """The prior as a per-row state; statistics in float32 (float64 for a float64 module)."""
        dt = compute_dtype(self.weight)
        count = self.prior_count.expand(batch_size).clone()
        mean = self.prior_mean.to(dt).expand(batch_size, -1).clone()
        var = self.prior_logv.to(dt).exp().expand(batch_size, -1).clone()
        return count, mean, var

    def forward(
        self, x: torch.Tensor, stats: NormStats | None = None, valid: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, NormStats]:
        """x: (B, L, D); stats from the previous segment or None; valid (B, L) bool -> (y, new stats).

        cu_seqlens: packed documents over the B*L tokens (ops/varlen.py), each starting from the prior;
        stats must then be None and the returned statistics are the last document's (batch dim 1)."""
        if cu_seqlens is not None and stats is not None:
            raise ValueError("TimestepNorm with cu_seqlens starts every document from the prior: pass stats=None")
        count, mean, var = self.initial_stats(1 if cu_seqlens is not None else x.shape[0]) if stats is None else stats
        y, count, mean, var = timestep_norm(
            x, self.weight, self.bias, self.num_groups, self.eps, count, mean, var, valid, cu_seqlens,
            lean=lean_active(),
        )
        return y, (count, mean, var)
