"""Loop-free TimestepNorm: shifted prefix sums accumulated in float64 (docs/algorithms.md §2).

Per row and group, with per-token group mean m_t and population variance v_t, real-token weight w_t,
prior (c0, mu0, var0) and a shift K (a value near the data: mu0, or the first real token's mean):

    c_t   = c0 + sum_{s<=t} w_s
    mu_t  = K + [c0 (mu0 - K) + sum w_s (m_s - K)] / c_t
    var_t = [c0 (var0 + (mu0 - K)^2) + sum w_s (v_s + (m_s - K)^2)] / c_t - (mu_t - K)^2

This is the pooled mean/variance of all scalars of the group, i.e. exactly the sequential Welford
merges. Why it is stable: values are taken relative to K (no raw sum of squares of un-centred data)
and the running sums are float64, which holds ~16 digits over any realistic length. The statistics
tensors are (B, L, G), D/G times smaller than the activations, so float64 costs little.
The result does not depend on K, so K is detached.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._dtypes import compute_dtype
from ..varlen import doc_index
from .naive import check_varlen_stats

ACC = torch.float64


def timestep_norm_prefix(
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
    """Same contract as `timestep_norm_naive`: x (B, L, D) -> y, count (B,), mean (B, G), var (B, G)."""
    if cu_seqlens is not None:
        return _prefix_varlen(x, weight, bias, num_groups, eps, count, mean, var, valid, cu_seqlens)
    B, L, D = x.shape
    if L == 0:
        return x.new_zeros(B, 0, D), count, mean, var
    xg, st = prefix_statistics(x, num_groups, count, mean, var, valid)
    y = normalize(xg, st.mu, st.var_raw.clamp(min=0.0), weight, bias, eps, valid)
    return (y.to(x.dtype), *final_statistics(st, count, mean, var))


class PrefixStats(NamedTuple):
    """Running statistics of every token (ACC precision unless noted), see the module docstring."""

    m: torch.Tensor  # (B, L, G) per-token group mean, compute dtype
    w: torch.Tensor  # (B, L, 1) 1 for real tokens, 0 for padding
    shift: torch.Tensor  # (B, 1, G) K
    c: torch.Tensor  # (B, L, 1) running count c_t
    centred_mean: torch.Tensor  # (B, L, G) mu_t - K
    mu: torch.Tensor  # (B, L, G) running mean
    var_raw: torch.Tensor  # (B, L, G) running variance before clamping at 0


def prefix_statistics(
    x: torch.Tensor, num_groups: int, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
    valid: torch.Tensor | None,
) -> tuple[torch.Tensor, PrefixStats]:
    """x (B, L, D) -> (x in the compute dtype as (B, L, G, D/G), the running statistics)."""
    B, L, D = x.shape
    G = num_groups
    dt = compute_dtype(x, mean)
    xg = x.to(dt).view(B, L, G, D // G)
    # Per-token population moments, two-pass (torch.var_mean is far slower on a short last axis).
    m = xg.mean(-1)  # (B, L, G)
    v = (xg - m.unsqueeze(-1)).pow(2).mean(-1)

    c0 = count.to(ACC).view(B, 1, 1)
    mu0 = mean.to(ACC).unsqueeze(1)  # (B, 1, G)
    var0 = var.to(ACC).unsqueeze(1)
    if valid is None:
        w = torch.ones(B, L, 1, dtype=ACC, device=x.device)
        first = torch.zeros(B, dtype=torch.long, device=x.device)
    else:
        w = valid.to(ACC).unsqueeze(-1)
        first = valid.to(torch.int8).argmax(dim=1)  # first real token (0 if none)
    with torch.no_grad():
        k_first = m.detach().to(ACC).gather(1, first.view(B, 1, 1).expand(B, 1, G))
        shift = torch.where(c0 > 0, mu0, k_first)  # (B, 1, G)

    dm = m.to(ACC) - shift
    c = c0 + torch.cumsum(w, dim=1)  # (B, L, 1)
    safe = c.clamp(min=1.0)
    s1 = c0 * (mu0 - shift) + torch.cumsum(w * dm, dim=1)
    s2 = c0 * (var0 + (mu0 - shift).pow(2)) + torch.cumsum(w * (v.to(ACC) + dm.pow(2)), dim=1)
    centred_mean = s1 / safe
    var_raw = s2 / safe - centred_mean.pow(2)
    return xg, PrefixStats(m, w, shift, c, centred_mean, shift + centred_mean, var_raw)


def normalize(xg: torch.Tensor, mu: torch.Tensor, var_t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
              eps: float, valid: torch.Tensor | None) -> torch.Tensor:
    """(xg - mu) / sqrt(var + eps) * (weight + 1) + bias, zero at padding: (B, L, D) in xg's dtype."""
    B, L, G, Dg = xg.shape
    dt = xg.dtype
    y = (xg - mu.to(dt).unsqueeze(-1)) * torch.rsqrt(var_t.to(dt).unsqueeze(-1) + eps)
    y = y.reshape(B, L, G * Dg) * (weight.to(dt) + 1) + bias.to(dt)
    if valid is not None:
        y = y * valid.unsqueeze(-1).to(dt)
    return y


def final_statistics(
    st: PrefixStats, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, var) after the segment; rows without a real token keep the incoming ones."""
    B = count.shape[0]
    c_end = st.c[:, -1, 0]
    seen = (c_end > count.to(ACC).view(B)).view(B, 1)
    mu_end = torch.where(seen, st.mu[:, -1], mean.to(ACC))
    var_end = torch.where(seen, st.var_raw[:, -1].clamp(min=0.0), var.to(ACC))
    return c_end.round().to(torch.long), mu_end.to(mean.dtype), var_end.to(var.dtype)


def _prefix_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    valid: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed documents over the B*L tokens, each from the start state (count (1,), mean/var (1, G)).

    Segmented prefix sums: a running sum restarted at each document is the stream's cumulative sum minus
    its value just before the document's first token. The shift K is per document (its first token's mean
    for a zero-count start), so the sums stay centred within each document. The subtraction costs about
    eps64 * (stream sum / document sum) relative error: ~1e-10 for a 1-token document in a 1M-token stream.
    Returns y (B, L, D) and the last document's final (count (1,), mean (1, G), var (1, G)).
    """
    B, L, D = x.shape
    total = B * L
    check_varlen_stats(count, mean, var, valid, cu_seqlens, total)
    idx = doc_index(cu_seqlens, total)
    G = num_groups
    dt = compute_dtype(x, mean)
    xg = x.to(dt).reshape(1, total, G, D // G)
    m = xg.mean(-1)  # (1, total, G)
    v = (xg - m.unsqueeze(-1)).pow(2).mean(-1)

    c0 = count.to(ACC).view(1, 1, 1)
    mu0 = mean.to(ACC).unsqueeze(1)  # (1, 1, G)
    var0 = var.to(ACC).unsqueeze(1)
    with torch.no_grad():
        shift = torch.where(c0 > 0, mu0, m.detach().to(ACC)[:, idx.start])  # (1, total, G)

    def seg_cumsum(a: torch.Tensor) -> torch.Tensor:
        cs = torch.cumsum(a, dim=1)
        return cs - (cs - a)[:, idx.start]

    dm = m.to(ACC) - shift
    c = c0 + (idx.pos + 1).to(ACC).view(1, total, 1)
    s1 = c0 * (mu0 - shift) + seg_cumsum(dm)
    s2 = c0 * (var0 + (mu0 - shift).pow(2)) + seg_cumsum(v.to(ACC) + dm.pow(2))
    centred_mean = s1 / c
    mu = shift + centred_mean
    var_t = (s2 / c - centred_mean.pow(2)).clamp(min=0.0)

    y = (xg - mu.to(dt).unsqueeze(-1)) * torch.rsqrt(var_t.to(dt).unsqueeze(-1) + eps)
    y = y.reshape(B, L, D) * (weight.to(dt) + 1) + bias.to(dt)
    c_end = c[:, -1, 0].round().to(torch.long)
    return y.to(x.dtype), c_end, mu[:, -1].to(mean.dtype), var_t[:, -1].to(var.dtype)
