"""TimestepNorm with a hand-written backward that stores x and two numbers per token and group.

Autograd through `timestep_norm_prefix` keeps about ten tensors per call (x in groups, centred copies, the
float64 prefix sums, the normalised output ...). This Function keeps x, the running mean mu_t and the
running variance var_t (before clamping) per group, plus the (B, L, 1) running count, and rebuilds the rest.

Backward, per row and group, with a_t = 1 / sqrt(var_t + eps), xhat = (x - mu_t) a_t, gy' = gy (weight + 1):
    dx      <- gy' a_t                                          (direct term)
    dmu_t    = -sum_d gy' a_t,          dvar_t = -1/2 a_t^2 sum_d gy' xhat     (zero where var_t was clamped)
With mu_t = K + s1_t / c_t and var_t = s2_t / c_t - (s1_t / c_t)^2 (prefix.py), the sums s1, s2 receive
    ds1_t = (dmu_t - 2 (mu_t - K) dvar_t) / c_t,    ds2_t = dvar_t / c_t,
and, being prefix sums of w_s (m_s - K) and w_s (v_s + (m_s - K)^2), pass to every token s <= t:
    S1_s = sum_{t >= s} ds1_t,   S2_s = sum_{t >= s} ds2_t          (reverse cumulative sums, float64)
    dm_s = w_s (S1_s + 2 (m_s - K) S2_s),   dv_s = w_s S2_s
and the per-token moments m_s = mean_d x, v_s = mean_d (x - m_s)^2 give dx += dm_s / Dg + dv_s 2 (x - m_s) / Dg.
The incoming state enters s1, s2 as c0 (mu0 - K) and c0 (var0 + (mu0 - K)^2): dmu0 = c0 (S1_0 + 2 (mu0 - K) S2_0),
dvar0 = c0 S2_0. K is a constant (the result does not depend on it), as in the autograd path.
"""

from __future__ import annotations

import torch

from .._dtypes import compute_dtype
from .prefix import ACC, final_statistics, normalize, prefix_statistics


def _revcumsum(t: torch.Tensor) -> torch.Tensor:
    """sum_{t' >= t} along dim 1."""
    return t.flip(1).cumsum(1).flip(1)


class _TimestepNormPrefix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, count, valid, num_groups, eps):
        with torch.no_grad():
            xg, st = prefix_statistics(x, num_groups, count, mean, var, valid)
            y = normalize(xg, st.mu, st.var_raw.clamp(min=0.0), weight, bias, eps, valid)
            c_end, mu_end, var_end = final_statistics(st, count, mean, var)
        ctx.eps, ctx.num_groups, ctx.has_valid = eps, num_groups, valid is not None
        ctx.save_for_backward(x, weight, mean, var, count, valid, st.w, st.shift, st.c, st.mu, st.var_raw)
        ctx.mark_non_differentiable(c_end)
        return y.to(x.dtype), c_end, mu_end, var_end

    @staticmethod
    def backward(ctx, gy, _gc, g_mu_end, g_var_end):
        x, weight, mean, var, count, valid, w, shift, c, mu, var_raw = ctx.saved_tensors
        B, L, D = x.shape
        G, eps = ctx.num_groups, ctx.eps
        Dg = D // G
        dt = compute_dtype(x, mean)
        xg = x.to(dt).view(B, L, G, Dg)
        a = torch.rsqrt(var_raw.clamp(min=0.0).to(dt) + eps)  # (B, L, G)
        xc = xg - mu.to(dt).unsqueeze(-1)
        xhat = xc * a.unsqueeze(-1)
        gy = gy.to(dt)
        if ctx.has_valid:
            gy = gy * valid.unsqueeze(-1).to(dt)
        g_weight = (gy * xhat.reshape(B, L, D)).sum((0, 1)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        g_bias = gy.sum((0, 1)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        gyh = (gy * (weight.to(dt) + 1)).view(B, L, G, Dg)
        dx = gyh * a.unsqueeze(-1)
        dmu = -dx.sum(-1).to(ACC)  # (B, L, G)
        dvar = ((gyh * xhat).sum(-1) * (-0.5) * a.pow(2)).to(ACC)

        # Final statistics: rows that saw a real token read position L-1, the others pass the incoming ones.
        c0 = count.to(ACC).view(B, 1, 1)
        seen = (c[:, -1, 0] > c0.view(B)).view(B, 1)
        g_mu_end = torch.zeros_like(mean, dtype=ACC) if g_mu_end is None else g_mu_end.to(ACC)
        g_var_end = torch.zeros_like(var, dtype=ACC) if g_var_end is None else g_var_end.to(ACC)
        dmu[:, -1] += torch.where(seen, g_mu_end, 0.0)
        dvar[:, -1] += torch.where(seen, g_var_end, 0.0)
        dvar = dvar * (var_raw >= 0).to(ACC)  # clamp(min=0): no gradient where the raw variance was negative

        safe = c.clamp(min=1.0)
        centred = mu - shift
        s1 = _revcumsum((dmu - 2.0 * centred * dvar) / safe)
        s2 = _revcumsum(dvar / safe)
        m = xg.mean(-1)
        dm_k = m.to(ACC) - shift
        g_m = (w * (s1 + 2.0 * dm_k * s2)).to(dt)  # (B, L, G)
        g_v = (w * s2).to(dt)
        xm = xg - m.unsqueeze(-1)
        # v_s also depends on m_s through (x - m_s): -2 mean(x - m_s) g_v, zero up to rounding (kept: exact).
        g_m = g_m - 2.0 * xm.mean(-1) * g_v
        dx = dx + (g_m.unsqueeze(-1) + 2.0 * g_v.unsqueeze(-1) * xm) / Dg

        mu0 = mean.to(ACC).unsqueeze(1)
        g_mean = g_var = None
        if ctx.needs_input_grad[3]:
            g_mean = (c0 * (s1[:, :1] + 2.0 * (mu0 - shift) * s2[:, :1])).squeeze(1)
            g_mean = (g_mean + torch.where(seen, 0.0, g_mu_end)).to(mean.dtype)
        if ctx.needs_input_grad[4]:
            g_var = ((c0 * s2[:, :1]).squeeze(1) + torch.where(seen, 0.0, g_var_end)).to(var.dtype)
        return (dx.reshape(B, L, D).to(x.dtype), g_weight, g_bias, g_mean, g_var, None, None, None, None)


def timestep_norm_prefix_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`timestep_norm_prefix` (same contract and numbers, no cu_seqlens) storing x and (B, L, G) statistics."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape), count, mean, var
    return _TimestepNormPrefix.apply(x, weight, bias, mean, var, count, valid, num_groups, eps)
