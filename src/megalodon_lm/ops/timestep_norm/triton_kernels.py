"""Triton kernels for grouped TimestepNorm: a chunked scan of shifted moment sums (docs/algorithms.md §2).

Imported only when the Triton path runs (see `triton.py`); importing it needs the `triton` package.

Each program owns one (row, group, chunk of T tokens) tile of x, (T, F) with F = D / G features. Per token it
forms the group mean m_t and population variance v_t; relative to a per-(row, group) shift K (the incoming
mean, or the first real token's mean) the running statistics are

    c_t = c0 + sum w_s,   s1_t = c0 (mu0 - K) + sum w_s (m_s - K)
    s2_t = c0 (var0 + (mu0 - K)^2) + sum w_s (v_s + (m_s - K)^2)
    mu_t = K + s1_t / c_t,   var_t = s2_t / c_t - (s1_t / c_t)^2

(the pooled mean/variance, i.e. the Welford merges of the naive path). The sums carried between chunks are
per-chunk totals scanned in float64 by the caller (B * G * L / T values); inside a chunk they are tl.cumsum in
float32 over T tokens. Taking values relative to K avoids the cancellation of raw sums of squares.

Backward, with gx^_t = gy_t (weight + 1) w_t, A_t = dL/dmu_t = -r_t sum_f gx^, B_t = dL/dvar_t =
-r_t^2 / 2 sum_f gx^ x^ (r = rsqrt(var + eps)), U_t = (A_t - 2 B_t (mu_t - K)) / c_t and V_t = B_t / c_t:

    dL/dm_s = w_s (sum_{t>=s} U_t + 2 (m_s - K) sum_{t>=s} V_t),   dL/dv_s = w_s sum_{t>=s} V_t

so the backward is the same chunked scan run in reverse (suffix sums of U and V).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(x_ptr, w_ptr, b, g, c, L, D, F, T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Load a (T, BLOCK_F) tile of x (float32), the tokens' weights w (T,) and per-token moments m, v (T,)."""
    t = c * T + tl.arange(0, T)
    f = tl.arange(0, BLOCK_F)
    tmask = t < L
    mask = tmask[:, None] & (f[None, :] < F)
    offs = (b * L + t[:, None]) * D + g * F + f[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + b * L + t, mask=tmask, other=0.0)
    m = tl.sum(x, axis=1) / F
    dev = tl.where(mask, x - m[:, None], 0.0)
    v = tl.sum(dev * dev, axis=1) / F
    return x, w, m, v, t, f, tmask, mask, offs


@triton.jit
def tsn_chunk_sums_kernel(
    x_ptr, w_ptr, k_ptr, s0_ptr, s1_ptr, s2_ptr, L, D, F, G, NC, T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (B, G, NC): chunk totals of w, w (m - K), w (v + (m - K)^2) -> (B, G, NC) each."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.program_id(2)
    x, w, m, v, t, f, tmask, mask, offs = _tile(x_ptr, w_ptr, b, g, c, L, D, F, T, BLOCK_F)
    dm = m - tl.load(k_ptr + b * G + g)
    out = (b * G + g) * NC + c
    tl.store(s0_ptr + out, tl.sum(w, axis=0))
    tl.store(s1_ptr + out, tl.sum(w * dm, axis=0))
    tl.store(s2_ptr + out, tl.sum(w * (v + dm * dm), axis=0))


@triton.jit
def tsn_forward_kernel(
    x_ptr, w_ptr, k_ptr, c_in_ptr, s1_in_ptr, s2_in_ptr, wt_ptr, bias_ptr, y_ptr, mu_ptr, var_ptr,
    eps, L, D, F, G, NC, T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (B, G, NC): y (B, L, D) and the per-token statistics mu, var (B, G, L)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.program_id(2)
    x, w, m, v, t, f, tmask, mask, offs = _tile(x_ptr, w_ptr, b, g, c, L, D, F, T, BLOCK_F)
    k = tl.load(k_ptr + b * G + g)
    dm = m - k
    chunk = (b * G + g) * NC + c
    cnt = tl.load(c_in_ptr + chunk) + tl.cumsum(w, axis=0)
    s1 = tl.load(s1_in_ptr + chunk) + tl.cumsum(w * dm, axis=0)
    s2 = tl.load(s2_in_ptr + chunk) + tl.cumsum(w * (v + dm * dm), axis=0)
    safe = tl.maximum(cnt, 1.0)
    cm = s1 / safe
    mu = k + cm
    var = tl.maximum(s2 / safe - cm * cm, 0.0)
    r = 1.0 / tl.sqrt(var + eps)
    fmask = f < F
    scale = tl.load(wt_ptr + g * F + f, mask=fmask, other=0.0).to(tl.float32) + 1.0
    shift = tl.load(bias_ptr + g * F + f, mask=fmask, other=0.0).to(tl.float32)
    y = ((x - mu[:, None]) * r[:, None] * scale[None, :] + shift[None, :]) * w[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    stat = (b * G + g) * L + t
    tl.store(mu_ptr + stat, mu, mask=tmask)
    tl.store(var_ptr + stat, var, mask=tmask)


@triton.jit
def _adjoints(x_ptr, gy_ptr, w_ptr, k_ptr, c_in_ptr, mu_ptr, var_ptr, wt_ptr, eps, b, g, c, L, D, F, G, NC,
              T: tl.constexpr, BLOCK_F: tl.constexpr):
    """Shared by both backward kernels: the tile, gx^ r, and the per-token U, V of the module docstring."""
    x, w, m, v, t, f, tmask, mask, offs = _tile(x_ptr, w_ptr, b, g, c, L, D, F, T, BLOCK_F)
    k = tl.load(k_ptr + b * G + g)
    cnt = tl.load(c_in_ptr + (b * G + g) * NC + c) + tl.cumsum(w, axis=0)
    stat = (b * G + g) * L + t
    mu = tl.load(mu_ptr + stat, mask=tmask, other=0.0)
    var = tl.load(var_ptr + stat, mask=tmask, other=1.0)
    r = 1.0 / tl.sqrt(var + eps)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(wt_ptr + g * F + f, mask=f < F, other=0.0).to(tl.float32) + 1.0
    gxh = gy * scale[None, :] * w[:, None]
    xhat = tl.where(mask, (x - mu[:, None]) * r[:, None], 0.0)
    a = -r * tl.sum(gxh, axis=1)
    bv = -0.5 * r * r * tl.sum(gxh * xhat, axis=1)
    safe = tl.maximum(cnt, 1.0)
    u = (a - 2.0 * bv * (mu - k)) / safe
    vv = bv / safe
    return x, w, m, k, r, gy, gxh, xhat, u, vv, f, mask, offs


@triton.jit
def tsn_bwd_sums_kernel(
    x_ptr, gy_ptr, w_ptr, k_ptr, c_in_ptr, mu_ptr, var_ptr, wt_ptr, su_ptr, sv_ptr, gw_ptr, gb_ptr,
    eps, L, D, F, G, NC, T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (B, G, NC): chunk totals of U and V (B, G, NC), and partial weight/bias gradients (B, NC, D)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.program_id(2)
    x, w, m, k, r, gy, gxh, xhat, u, vv, f, mask, offs = _adjoints(
        x_ptr, gy_ptr, w_ptr, k_ptr, c_in_ptr, mu_ptr, var_ptr, wt_ptr, eps, b, g, c, L, D, F, G, NC, T, BLOCK_F)
    out = (b * G + g) * NC + c
    tl.store(su_ptr + out, tl.sum(u, axis=0))
    tl.store(sv_ptr + out, tl.sum(vv, axis=0))
    gyw = gy * w[:, None]
    part = (b * NC + c) * D + g * F + f
    tl.store(gw_ptr + part, tl.sum(gyw * xhat, axis=0), mask=f < F)
    tl.store(gb_ptr + part, tl.sum(gyw, axis=0), mask=f < F)


@triton.jit
def tsn_bwd_dx_kernel(
    x_ptr, gy_ptr, w_ptr, k_ptr, c_in_ptr, mu_ptr, var_ptr, wt_ptr, ru_ptr, rv_ptr, dx_ptr,
    eps, L, D, F, G, NC, T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Grid (B, G, NC): dx. ru, rv: (B, G, NC) sums of U, V over all later tokens (and the final-state terms)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.program_id(2)
    x, w, m, k, r, gy, gxh, xhat, u, vv, f, mask, offs = _adjoints(
        x_ptr, gy_ptr, w_ptr, k_ptr, c_in_ptr, mu_ptr, var_ptr, wt_ptr, eps, b, g, c, L, D, F, G, NC, T, BLOCK_F)
    chunk = (b * G + g) * NC + c
    # Inclusive suffix sums inside the chunk: total - prefix + own term.
    r1 = tl.load(ru_ptr + chunk) + tl.sum(u, axis=0) - tl.cumsum(u, axis=0) + u
    r2 = tl.load(rv_ptr + chunk) + tl.sum(vv, axis=0) - tl.cumsum(vv, axis=0) + vv
    gm = w * (r1 + 2.0 * (m - k) * r2)
    gv = w * r2
    dx = gxh * r[:, None] + gm[:, None] / F + gv[:, None] * 2.0 * (x - m[:, None]) / F
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
