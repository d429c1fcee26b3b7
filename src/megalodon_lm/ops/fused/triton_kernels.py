"""Triton kernels for the lean path's element-wise regions (forward and backward).

Imported only when the Triton path runs (see `triton.py`); importing it needs the `triton` package.
All arithmetic is float32 whatever the storage dtype; each kernel reads its inputs once and writes its
outputs once.

SiLU / SwiGLU / gate (flat, contiguous, N elements; one program per BLOCK elements), s = sigmoid(a):

    y = a s [* b],   dy/da = s (1 + a (1 - s)) [* b],   dy/db = a s

The gate before wh2 is out * silu(r_raw), i.e. SwiGLU with a = r_raw and b = out.

q/k preparation: one program owns T tokens of one head, a (T, dz) tile held as its even and odd
features (the real and imaginary parts of the interleaved RoPE pairs). Per token, r = rsqrt(mean z^2 +
eps), z^ = z r; per row i of (gamma, beta) (0 = query, 1 = key), y_i = z^ (gamma_i + 1)/sqrt(dz) + beta_i,
rotated by the angle of the token's position (cos/sin looked up in a (positions, dz/2) table).
Backward: g_i^ = R^T g_i (rotation by minus the angle), dgamma_i += g_i^ z^ / sqrt(dz), dbeta_i += g_i^,
G = sum_i g_i^ (gamma_i + 1)/sqrt(dz), dz = r (G - z^ mean(G z^)). The parameter gradients are summed
over each program's tokens in registers (a grid-stride loop over token tiles) and written as one partial
row per program, summed by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def swiglu_fwd_kernel(a_ptr, b_ptr, y_ptr, N, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """y = silu(a) (* b): flat (N,) tensors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a)
    if HAS_B:
        y = y * tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, N, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    """da (and db) from the output gradient g; silu is recomputed from a."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    if HAS_B:
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(db_ptr + offs, (g * a * s).to(db_ptr.dtype.element_ty), mask=mask)
        g = g * b
    tl.store(da_ptr + offs, (g * s * (1.0 + a * (1.0 - s))).to(da_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_tile(z_ptr, cos_ptr, sin_ptr, pos_ptr, tile, h, n_tok, L, H, DZ, pos_stride, eps,
             ROPE: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr):
    """Token tile `tile` of head h: offsets of the even features, masks, normalised z^ (even, odd), r, cos, sin."""
    n = tile * T + tl.arange(0, T).to(tl.int64)  # int64: B*L*H*dz may pass 2^31
    j = tl.arange(0, BLOCK_P)
    nmask = n < n_tok
    me = nmask[:, None] & (2 * j < DZ)[None, :]
    mo = nmask[:, None] & (2 * j + 1 < DZ)[None, :]
    offs = ((n * H + h) * DZ)[:, None] + 2 * j[None, :]
    ze = tl.load(z_ptr + offs, mask=me, other=0.0).to(tl.float32)
    zo = tl.load(z_ptr + offs + 1, mask=mo, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt((tl.sum(ze * ze, axis=1) + tl.sum(zo * zo, axis=1)) / DZ + eps)
    ze = ze * r[:, None]
    zo = zo * r[:, None]
    if ROPE:
        pos = tl.load(pos_ptr + (n // L) * pos_stride + n % L, mask=nmask, other=0)
        tab = pos[:, None] * (DZ // 2) + j[None, :]
        c = tl.load(cos_ptr + tab, mask=me, other=1.0)
        s = tl.load(sin_ptr + tab, mask=me, other=0.0)
    else:
        c = tl.zeros((T, BLOCK_P), dtype=tl.float32) + 1.0
        s = tl.zeros((T, BLOCK_P), dtype=tl.float32)
    return offs, me, mo, ze, zo, r, c, s


@triton.jit
def _affine(par_ptr, row, h, Z, DZ, BLOCK_P: tl.constexpr):
    """Row `row` of a (2, Z) parameter at head h: (even, odd) features (BLOCK_P,) as float32."""
    j = tl.arange(0, BLOCK_P)
    base = row * Z + h * DZ + 2 * j
    pe = tl.load(par_ptr + base, mask=2 * j < DZ, other=0.0).to(tl.float32)
    po = tl.load(par_ptr + base + 1, mask=2 * j + 1 < DZ, other=0.0).to(tl.float32)
    return pe, po


@triton.jit
def _qk_out(out_ptr, gamma_ptr, beta_ptr, row, h, offs, me, mo, ze, zo, c, s, Z, DZ, inv_sqrt_dz,
            BLOCK_P: tl.constexpr):
    """Store rope(z^ (gamma_row + 1)/sqrt(dz) + beta_row) for one tile into out (even and odd features)."""
    ge, go = _affine(gamma_ptr, row, h, Z, DZ, BLOCK_P)
    be, bo = _affine(beta_ptr, row, h, Z, DZ, BLOCK_P)
    ye = ze * ((ge + 1.0) * inv_sqrt_dz)[None, :] + be[None, :]
    yo = zo * ((go + 1.0) * inv_sqrt_dz)[None, :] + bo[None, :]
    tl.store(out_ptr + offs, (ye * c - yo * s).to(out_ptr.dtype.element_ty), mask=me)
    tl.store(out_ptr + offs + 1, (ye * s + yo * c).to(out_ptr.dtype.element_ty), mask=mo)


@triton.jit
def qk_prep_fwd_kernel(
    z_ptr, gamma_ptr, beta_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr,
    n_tok, L, H, DZ, pos_stride, eps, inv_sqrt_dz,
    ROPE: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (token tiles, H): q, k (B*L, H, dz) from z (B*L, H, dz)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    offs, me, mo, ze, zo, r, c, s = _qk_tile(z_ptr, cos_ptr, sin_ptr, pos_ptr, tile, h, n_tok, L, H, DZ,
                                             pos_stride, eps, ROPE, T, BLOCK_P)
    _qk_out(q_ptr, gamma_ptr, beta_ptr, 0, h, offs, me, mo, ze, zo, c, s, H * DZ, DZ, inv_sqrt_dz, BLOCK_P)
    _qk_out(k_ptr, gamma_ptr, beta_ptr, 1, h, offs, me, mo, ze, zo, c, s, H * DZ, DZ, inv_sqrt_dz, BLOCK_P)


@triton.jit
def qk_prep_bwd_kernel(
    gq_ptr, gk_ptr, z_ptr, gamma_ptr, cos_ptr, sin_ptr, pos_ptr, dz_ptr, dgamma_ptr, dbeta_ptr,
    n_tok, L, H, DZ, pos_stride, eps, inv_sqrt_dz, n_tiles, n_prog,
    ROPE: tl.constexpr, T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Grid (n_prog, H): dz (B*L, H, dz) and partial dgamma, dbeta (n_prog, 2, H*dz) over tiles p, p + n_prog, ..."""
    prog = tl.program_id(0)
    h = tl.program_id(1)
    Z = H * DZ
    j = tl.arange(0, BLOCK_P)
    g0e, g0o = _affine(gamma_ptr, 0, h, Z, DZ, BLOCK_P)
    g1e, g1o = _affine(gamma_ptr, 1, h, Z, DZ, BLOCK_P)
    s0e, s0o = (g0e + 1.0) * inv_sqrt_dz, (g0o + 1.0) * inv_sqrt_dz
    s1e, s1o = (g1e + 1.0) * inv_sqrt_dz, (g1o + 1.0) * inv_sqrt_dz
    zero = tl.zeros((BLOCK_P,), dtype=tl.float32)
    dg0e, dg0o, dg1e, dg1o = zero, zero, zero, zero
    db0e, db0o, db1e, db1o = zero, zero, zero, zero
    for tile in range(prog, n_tiles, n_prog):
        offs, me, mo, ze, zo, r, c, s = _qk_tile(z_ptr, cos_ptr, sin_ptr, pos_ptr, tile, h, n_tok, L, H, DZ,
                                                 pos_stride, eps, ROPE, T, BLOCK_P)
        # Un-rotate the incoming gradients (R^T: rotation by minus the angle).
        ae = tl.load(gq_ptr + offs, mask=me, other=0.0).to(tl.float32)
        ao = tl.load(gq_ptr + offs + 1, mask=mo, other=0.0).to(tl.float32)
        qe, qo = ae * c + ao * s, ao * c - ae * s
        ae = tl.load(gk_ptr + offs, mask=me, other=0.0).to(tl.float32)
        ao = tl.load(gk_ptr + offs + 1, mask=mo, other=0.0).to(tl.float32)
        ke, ko = ae * c + ao * s, ao * c - ae * s
        dg0e += tl.sum(qe * ze, axis=0)
        dg0o += tl.sum(qo * zo, axis=0)
        dg1e += tl.sum(ke * ze, axis=0)
        dg1o += tl.sum(ko * zo, axis=0)
        db0e += tl.sum(qe, axis=0)
        db0o += tl.sum(qo, axis=0)
        db1e += tl.sum(ke, axis=0)
        db1o += tl.sum(ko, axis=0)
        ge = qe * s0e[None, :] + ke * s1e[None, :]
        go = qo * s0o[None, :] + ko * s1o[None, :]
        dot = (tl.sum(ge * ze, axis=1) + tl.sum(go * zo, axis=1)) / DZ
        tl.store(dz_ptr + offs, (r[:, None] * (ge - ze * dot[:, None])).to(dz_ptr.dtype.element_ty), mask=me)
        tl.store(dz_ptr + offs + 1, (r[:, None] * (go - zo * dot[:, None])).to(dz_ptr.dtype.element_ty), mask=mo)
    me = 2 * j < DZ
    mo = 2 * j + 1 < DZ
    part = prog.to(tl.int64) * 2 * Z + h * DZ + 2 * j
    tl.store(dgamma_ptr + part, dg0e * inv_sqrt_dz, mask=me)
    tl.store(dgamma_ptr + part + 1, dg0o * inv_sqrt_dz, mask=mo)
    tl.store(dgamma_ptr + part + Z, dg1e * inv_sqrt_dz, mask=me)
    tl.store(dgamma_ptr + part + Z + 1, dg1o * inv_sqrt_dz, mask=mo)
    tl.store(dbeta_ptr + part, db0e, mask=me)
    tl.store(dbeta_ptr + part + 1, db0o, mask=mo)
    tl.store(dbeta_ptr + part + Z, db1e, mask=me)
    tl.store(dbeta_ptr + part + Z + 1, db1o, mask=mo)
