"""Readable reference TimestepNorm (docs/architecture.md §3.1): Welford merges, one token at a time.

Per row and group, each real token is one observation carrying its group mean m_t and population
variance v_t. With running (c, mu, var) and c' = c + 1:
    mu'  = (c/c') mu + (1/c') m_t
    var' = (c/c') var + (1/c') v_t + (c/c')(1/c')(m_t - mu)^2
Statistics are inclusive of token t; y = (x - mu_t) / sqrt(var_t + eps) * (weight + 1) + bias.
Padded tokens output zeros and leave the statistics untouched.
"""

from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from ..varlen import check_cu_seqlens


def check_varlen_stats(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, valid: torch.Tensor | None,
                       cu_seqlens: torch.Tensor, total: int) -> None:
    """With cu_seqlens: one start state (count (1,), mean/var (1, G)) shared by all documents, no padding."""
    check_cu_seqlens(cu_seqlens, total)
    if valid is not None:
        raise ValueError("timestep_norm with cu_seqlens takes no padding mask (every token is real)")
    if count.shape != (1,) or mean.shape[0] != 1 or var.shape[0] != 1:
        raise ValueError("timestep_norm with cu_seqlens needs one start state: count (1,), mean and var (1, G)")


def timestep_norm_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (B, L, D); count (B,) int64; mean, var (B, G); valid (B, L) bool (False = pad).

    Returns y (B, L, D) in x's dtype and the final (count, mean, var).
    cu_seqlens: packed documents over the B*L tokens (ops/varlen.py); count (1,), mean/var (1, G) are then
    the state every document starts from, and the returned statistics are the last document's.
    """
    B, L, D = x.shape
    if cu_seqlens is not None:
        check_varlen_stats(count, mean, var, valid, cu_seqlens, B * L)
        stream = x.reshape(1, B * L, D)
        bounds = cu_seqlens.tolist()
        parts = [timestep_norm_naive(stream[:, a:b], weight, bias, num_groups, eps, count, mean, var)
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return (torch.cat([p[0] for p in parts], dim=1).view(B, L, D), *parts[-1][1:])
    G = num_groups
    dt = compute_dtype(x, mean)
    xg = x.to(dt).view(B, L, G, D // G)
    c = count.to(dt).view(B, 1)
    mu = mean.to(dt)
    v = var.to(dt)
    ys = []
    for t in range(L):
        v_t, m_t = torch.var_mean(xg[:, t], dim=-1, correction=0)  # (B, G) population moments
        w = torch.ones(B, 1, dtype=dt, device=x.device) if valid is None else valid[:, t].to(dt).view(B, 1)
        c_new = c + w
        safe = c_new.clamp(min=1)
        keep, add = c / safe, w / safe
        mu_new = keep * mu + add * m_t
        v_new = keep * v + add * v_t + keep * add * (m_t - mu).pow(2)
        is_real = w > 0
        c, mu, v = c_new, torch.where(is_real, mu_new, mu), torch.where(is_real, v_new, v)
        y_t = (xg[:, t] - mu.unsqueeze(-1)) * torch.rsqrt(v.unsqueeze(-1) + eps)
        ys.append(y_t.reshape(B, D) * w)
    y = torch.stack(ys, 1) if ys else x.new_zeros(B, 0, D).to(dt)
    y = (y * (weight.to(dt) + 1) + bias.to(dt))
    if valid is not None:
        y = y * valid.unsqueeze(-1).to(dt)
    return y.to(x.dtype), c.view(B).round().to(torch.long), mu.to(mean.dtype), v.to(var.dtype)
