"""TimestepNorm on Triton kernels, registered as torch custom ops (`megalodon_lm::timestep_norm_scan`, backward).

Same contract as `timestep_norm_naive`. Per-chunk totals are scanned across chunks in float64 here (tiny
(B, G, L/T) tensors); the kernels (`triton_kernels.py`, imported on first use) do every pass over the
activations. torch.compile sees one opaque op with a fake (shape-only) implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import check_triton_input

F64 = torch.float64


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _chunk_tokens(F: int, chunk: int) -> tuple[int, int]:
    """(T, BLOCK_F): a (T, F) tile of about 4K elements, T a power of two in [16, 64] unless `chunk` is given.
    Plain integer math, so that the fake implementation sizes its outputs exactly as the real one."""
    block_f = _pow2(F)
    if chunk > 0:
        return _pow2(chunk), block_f
    return max(16, min(64, 4096 // block_f)), block_f


def _exclusive(s: Tensor, c0: Tensor | None = None) -> Tensor:
    """Exclusive prefix sums of chunk totals along the last axis in float64 (+ c0 (B, G, 1)), as float32."""
    out = torch.cumsum(s.to(F64), dim=-1) - s.to(F64)
    return (out if c0 is None else out + c0).to(torch.float32).contiguous()


def _shift(x: Tensor, valid: Tensor, count: Tensor, mean: Tensor, G: int) -> Tensor:
    """K (B, G): the incoming mean, or the first real token's group mean for a fresh row."""
    B, L, D = x.shape
    first = valid.to(torch.int8).argmax(dim=1) if L > 0 else torch.zeros(B, dtype=torch.long, device=x.device)
    tok = x[torch.arange(B, device=x.device), first.clamp(max=max(L - 1, 0))] if L > 0 else x.new_zeros(B, D)
    m_first = tok.float().view(B, G, D // G).mean(-1)
    return torch.where(count.view(B, 1) > 0, mean, m_first).contiguous()


@torch.library.custom_op("megalodon_lm::timestep_norm_scan", mutates_args=())
def timestep_norm_scan(
    x: Tensor, weight: Tensor, bias: Tensor, count: Tensor, mean: Tensor, var: Tensor, w: Tensor,
    num_groups: int, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, L, D), w (B, L) float32 token weights (1 real, 0 pad), stats float32 ->
    y, count, mean, var (final), and for the backward mu_t, var_t (B, G, L), K (B, G), counts entering chunks."""
    from .triton_kernels import tsn_chunk_sums_kernel, tsn_forward_kernel

    B, L, D = x.shape
    G = num_groups
    F = D // G
    T, bf = _chunk_tokens(F, chunk)
    nc = -(-L // T)
    k = _shift(x, w > 0, count, mean, G)
    s = [torch.empty(B, G, nc, device=x.device, dtype=torch.float32) for _ in range(3)]
    grid = (B, G, nc)
    if L > 0:
        tsn_chunk_sums_kernel[grid](x, w, k, *s, L, D, F, G, nc, T=T, BLOCK_F=bf)
    c0 = count.to(F64).view(B, 1, 1)
    d0 = (mean.to(F64) - k.to(F64)).unsqueeze(-1)
    c_in = _exclusive(s[0], c0)
    s1_in = _exclusive(s[1], c0 * d0)
    s2_in = _exclusive(s[2], c0 * (var.to(F64).unsqueeze(-1) + d0 * d0))
    y = torch.empty_like(x)
    mu_t = torch.empty(B, G, L, device=x.device, dtype=torch.float32)
    var_t = torch.empty_like(mu_t)
    if L > 0:
        tsn_forward_kernel[grid](x, w, k, c_in, s1_in, s2_in, weight, bias, y, mu_t, var_t, eps, L, D, F, G, nc,
                                 T=T, BLOCK_F=bf)
    n_real = w.sum(1).round().to(torch.long)
    seen = (n_real > 0).view(B, 1)
    mean_end = torch.where(seen, mu_t[:, :, -1], mean) if L > 0 else mean.clone()
    var_end = torch.where(seen, var_t[:, :, -1], var) if L > 0 else var.clone()
    return y, count + n_real, mean_end, var_end, mu_t, var_t, k, c_in


@timestep_norm_scan.register_fake
def _(x, weight, bias, count, mean, var, w, num_groups, eps, chunk):
    B, L, D = x.shape
    nc = -(-L // _chunk_tokens(D // num_groups, chunk)[0])
    stat = mean.new_empty(B, num_groups, L)
    return (torch.empty_like(x), torch.empty_like(count), torch.empty_like(mean), torch.empty_like(var),
            stat, torch.empty_like(stat), torch.empty_like(mean), mean.new_empty(B, num_groups, nc))


@torch.library.custom_op("megalodon_lm::timestep_norm_scan_backward", mutates_args=())
def timestep_norm_scan_backward(
    gy: Tensor, g_mean: Tensor, g_var: Tensor, x: Tensor, weight: Tensor, count: Tensor, mean: Tensor, w: Tensor,
    mu_t: Tensor, var_t: Tensor, k: Tensor, c_in: Tensor, num_groups: int, eps: float, chunk: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dbias, dmean, dvar) of `timestep_norm_scan` (float32; dweight/dbias (D,))."""
    from .triton_kernels import tsn_bwd_dx_kernel, tsn_bwd_sums_kernel

    B, L, D = x.shape
    G = num_groups
    F = D // G
    T, bf = _chunk_tokens(F, chunk)
    nc = c_in.shape[-1]
    grid = (B, G, nc)
    su = torch.empty(B, G, nc, device=x.device, dtype=torch.float32)
    sv = torch.empty_like(su)
    gw = torch.empty(B, nc, D, device=x.device, dtype=torch.float32)
    gb = torch.empty_like(gw)
    if L > 0:
        tsn_bwd_sums_kernel[grid](x, gy, w, k, c_in, mu_t, var_t, weight, su, sv, gw, gb, eps, L, D, F, G, nc,
                                  T=T, BLOCK_F=bf)
    # Gradients of the final (mean, var) enter as a last U, V term at t = L - 1 (rows that saw a real token).
    n_real = w.sum(1)
    seen = (n_real > 0).view(B, 1)
    c_end = (count.to(F64) + n_real.to(F64)).clamp(min=1.0).view(B, 1)
    if L > 0:
        u_end = (g_mean.to(F64) - 2.0 * g_var.to(F64) * (mu_t[:, :, -1].to(F64) - k.to(F64))) / c_end
        v_end = g_var.to(F64) / c_end
        u_end, v_end = torch.where(seen, u_end, 0.0), torch.where(seen, v_end, 0.0)
    else:
        u_end = v_end = torch.zeros(B, G, device=x.device, dtype=F64)
    # Suffix sums over later chunks (exclusive), float64.
    su64, sv64 = su.to(F64), sv.to(F64)
    ru = su64.flip(-1).cumsum(-1).flip(-1) - su64 + u_end.unsqueeze(-1)
    rv = sv64.flip(-1).cumsum(-1).flip(-1) - sv64 + v_end.unsqueeze(-1)
    dx = torch.empty_like(x)
    if L > 0:
        tsn_bwd_dx_kernel[grid](x, gy, w, k, c_in, mu_t, var_t, weight, ru.float().contiguous(),
                                rv.float().contiguous(), dx, eps, L, D, F, G, nc, T=T, BLOCK_F=bf)
    # The prior (mean0, var0) is c0 observations at t = -1: the same rule with m = mean0, w = c0.
    r1 = su64.sum(-1) + u_end
    r2 = sv64.sum(-1) + v_end
    c0 = count.to(F64).view(B, 1)
    d_mean = torch.where(seen, c0 * (r1 + 2.0 * (mean.to(F64) - k.to(F64)) * r2), g_mean.to(F64))
    d_var = torch.where(seen, c0 * r2, g_var.to(F64))
    return dx, gw.sum((0, 1)), gb.sum((0, 1)), d_mean.float(), d_var.float()


@timestep_norm_scan_backward.register_fake
def _(gy, g_mean, g_var, x, weight, count, mean, w, mu_t, var_t, k, c_in, num_groups, eps, chunk):
    D = x.shape[-1]
    return (torch.empty_like(x), x.new_empty(D, dtype=torch.float32), x.new_empty(D, dtype=torch.float32),
            torch.empty_like(g_mean), torch.empty_like(g_var))


def _setup_context(ctx, inputs, output):
    x, weight, _bias, count, mean, _var, w, num_groups, eps, chunk = inputs
    ctx.args = (num_groups, eps, chunk)
    ctx.save_for_backward(x, weight, count, mean, w, *output[4:])
    ctx.mark_non_differentiable(output[1], *output[4:])


def _backward(ctx, gy, _g_count, g_mean, g_var, *_unused):
    x, weight, count, mean, w, mu_t, var_t, k, c_in = ctx.saved_tensors
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    g_mean = torch.zeros_like(mean) if g_mean is None else g_mean.contiguous()
    g_var = torch.zeros_like(mean) if g_var is None else g_var.contiguous()
    dx, dw, db, dm, dv = torch.ops.megalodon_lm.timestep_norm_scan_backward(
        gy, g_mean, g_var, x, weight, count, mean, w, mu_t, var_t, k, c_in, *ctx.args
    )
    return dx, dw.to(weight.dtype), db.to(weight.dtype), None, dm, dv, None, None, None, None


timestep_norm_scan.register_autograd(_backward, setup_context=_setup_context)


def timestep_norm_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    num_groups: int,
    eps: float,
    count: Tensor,
    mean: Tensor,
    var: Tensor,
    valid: Tensor | None = None,
    chunk: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same contract as `timestep_norm_naive`; statistics in float32. chunk: tokens per tile (0 = by width)."""
    check_triton_input(x, "timestep_norm")
    B, L, D = x.shape
    if D % num_groups:
        raise ValueError(f"timestep_norm: dim {D} is not divisible by num_groups {num_groups}")
    w = torch.ones(B, L, device=x.device, dtype=torch.float32) if valid is None else valid.to(torch.float32)
    f32 = torch.float32
    y, c, m, v, *_ = timestep_norm_scan(
        x.contiguous(), weight.contiguous(), bias.contiguous(), count.contiguous(),
        mean.to(f32).contiguous(), var.to(f32).contiguous(), w.contiguous(), num_groups, float(eps), chunk,
    )
    return y, c, m.to(mean.dtype), v.to(var.dtype)
