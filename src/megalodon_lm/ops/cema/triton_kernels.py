"""Triton kernels for CEMA: a time-sliced sequential scan (forward) and its reverse scan (backward).

Imported only when the Triton path runs (see `triton.py`); importing it needs the `triton` package.

Design. The recurrence h_t = p x_t + q h_{t-1} is elementwise per (row, channel, state component), so one
program owns (row, block of BLOCK_D channels, time slice), keeps the (BLOCK_D, N) complex state in registers
and walks its slice step by step. Parallelism over (row, channels) alone is too little at batch 1 (the 7B
width gives D / BLOCK_D = 256 programs, each with a 32K-step dependency chain), so time is cut into S slices:

  1. each slice is scanned from a zero state, giving its end state U_s (outputs not written);
  2. `cema_combine_kernel` walks the S slices: H_{s+1} = q^{n_s} H_s + U_s (n_s real steps in slice s);
  3. each slice is scanned again from its true entering state H_s, writing y.

S = 1 skips 1-2 (one pass: the least memory traffic) and is the choice when rows x channel blocks already
fill the GPU. The alternative, a chunked scan of T x T Toeplitz matmuls (docs/algorithms.md §1), does
O(T) more arithmetic per element; it is not implemented here.

Backward. The adjoint runs in reverse, c_t = gy_t conj(eta) + conj(q) c_{t+1} (identity over padded steps),
sliced the same way (the adjoint alone needs no states). Gradients of q need the states h_{t-1}; running the
recurrence backwards (dividing by q) is unstable for strongly damped components, so the forward stores the
state entering every CK-th step and the backward recomputes each CK-step segment into a per-program scratch
buffer, then walks it in reverse. All state math is float32 whatever the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _params(p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, D, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < D
    mask = dmask[:, None] & (n[None, :] < N)
    dn = d[:, None] * N + n[None, :]
    p = tl.load(p_ptr + dn, mask=mask, other=0.0)
    qr = tl.load(qr_ptr + dn, mask=mask, other=0.0)
    qi = tl.load(qi_ptr + dn, mask=mask, other=0.0)
    er = tl.load(er_ptr + dn, mask=mask, other=0.0)
    ei = tl.load(ei_ptr + dn, mask=mask, other=0.0)
    om = tl.load(om_ptr + d, mask=dmask, other=0.0)
    return d, n, dmask, mask, dn, p, qr, qi, er, ei, om


@triton.jit
def cema_fwd_kernel(
    x_ptr, p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, hin_r_ptr, hin_i_ptr, len_ptr,
    y_ptr, hout_r_ptr, hout_i_ptr, ckr_ptr, cki_ptr,
    L, D, N, NC, S, SEGS,
    CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STORE_Y: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D), S); slice s covers steps [s SEGS CK, (s + 1) SEGS CK).

    x, y: (B, L, D); coefficients (D, N); hin (state entering each slice), hout (state leaving it): (B, S, D, N);
    ckpt: (B, NC, D, N) state entering every CK-th step. STORE_Y=False: pass 1 (only hout).
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)  # so that step indices t and t * D are int64
    d, n, dmask, mask, dn, p, qr, qi, er, ei, om = _params(
        p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, D, N, BLOCK_D, BLOCK_N)
    st = (b * S + s) * D * N + dn
    hr = tl.load(hin_r_ptr + st, mask=mask, other=0.0)
    hi = tl.load(hin_i_ptr + st, mask=mask, other=0.0)
    length = tl.load(len_ptr + b)
    row = b * L * D + d
    for j in range(0, SEGS):
        c = s * SEGS + j
        if STORE_Y:
            ck = (b * NC + c) * D * N + dn
            cmask = mask & (dn * 0 + c < NC)  # (the interpreter wants tensor masks)
            tl.store(ckr_ptr + ck, hr, mask=cmask)
            tl.store(cki_ptr + ck, hi, mask=cmask)
        for i in range(0, CK):
            t = c * CK + i
            live = dmask & (d * 0 + t < L)
            xt = tl.load(x_ptr + row + t * D, mask=live, other=0.0).to(tl.float32)
            upd = t < length  # right padding: a padded step keeps the state
            nr = p * xt[:, None] + qr * hr - qi * hi
            ni = qr * hi + qi * hr
            hr = tl.where(upd, nr, hr)
            hi = tl.where(upd, ni, hi)
            if STORE_Y:
                yt = tl.sum(er * hr - ei * hi, axis=1) + om * xt
                tl.store(y_ptr + row + t * D, yt.to(y_ptr.dtype.element_ty), mask=live)
    tl.store(hout_r_ptr + st, hr, mask=mask)
    tl.store(hout_i_ptr + st, hi, mask=mask)


@triton.jit
def cema_combine_kernel(
    u_r_ptr, u_i_ptr, lqr_ptr, lqi_ptr, len_ptr, init_r_ptr, init_i_ptr, out_r_ptr, out_i_ptr, fin_r_ptr,
    fin_i_ptr, D, N, S, TS, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, REVERSE: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D)). Carry across slices: out[s] = carry entering slice s, then
    carry = a^{n_s} carry + u[s] with a = q (forward) or conj(q) (REVERSE: slices last to first);
    n_s = real steps in slice s. fin = the carry after all slices. u, out: (B, S, D, N); init, fin: (B, D, N)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask = (d < D)[:, None] & (n[None, :] < N)
    dn = d[:, None] * N + n[None, :]
    lr = tl.load(lqr_ptr + dn, mask=mask, other=0.0)  # log|q|
    li = tl.load(lqi_ptr + dn, mask=mask, other=0.0)  # arg q
    if REVERSE:
        li = -li
    length = tl.load(len_ptr + b)
    cr = tl.load(init_r_ptr + b * D * N + dn, mask=mask, other=0.0)
    ci = tl.load(init_i_ptr + b * D * N + dn, mask=mask, other=0.0)
    for k in range(0, S):
        s = k
        if REVERSE:
            s = S - 1 - k
        st = (b * S + s) * D * N + dn
        tl.store(out_r_ptr + st, cr, mask=mask)
        tl.store(out_i_ptr + st, ci, mask=mask)
        steps = tl.minimum(tl.maximum(length - s * TS, 0), TS).to(tl.float32)
        mag = tl.exp(steps * lr)
        ar = mag * tl.cos(steps * li)
        ai = mag * tl.sin(steps * li)
        ur = tl.load(u_r_ptr + st, mask=mask, other=0.0)
        ui = tl.load(u_i_ptr + st, mask=mask, other=0.0)
        cr, ci = ar * cr - ai * ci + ur, ar * ci + ai * cr + ui
    tl.store(fin_r_ptr + b * D * N + dn, cr, mask=mask)
    tl.store(fin_i_ptr + b * D * N + dn, ci, mask=mask)


@triton.jit
def cema_adjoint_kernel(
    gy_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, len_ptr, v_r_ptr, v_i_ptr, L, D, N, S, TS,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D), S): backward pass 1, the adjoint of each slice from a zero carry, walked to the
    slice's first step: v[b, s] = dL/dh_{start - 1} through the slice's own outputs. v: (B, S, D, N)."""
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)  # so that step indices t and t * D are int64
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dmask = d < D
    mask = dmask[:, None] & (n[None, :] < N)
    dn = d[:, None] * N + n[None, :]
    qr = tl.load(qr_ptr + dn, mask=mask, other=0.0)
    qi = tl.load(qi_ptr + dn, mask=mask, other=0.0)
    er = tl.load(er_ptr + dn, mask=mask, other=0.0)
    ei = tl.load(ei_ptr + dn, mask=mask, other=0.0)
    length = tl.load(len_ptr + b)
    row = b * L * D + d
    ar = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    ai = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for k in range(0, TS):
        t = s * TS + TS - 1 - k
        gyt = tl.load(gy_ptr + row + t * D, mask=dmask & (d * 0 + t < L), other=0.0).to(tl.float32)
        cr = ar + gyt[:, None] * er
        ci = ai - gyt[:, None] * ei
        upd = t < length
        ar = tl.where(upd, qr * cr + qi * ci, cr)
        ai = tl.where(upd, qr * ci - qi * cr, ci)
    st = (b * S + s) * D * N + dn
    tl.store(v_r_ptr + st, ar, mask=mask)
    tl.store(v_i_ptr + st, ai, mask=mask)


@triton.jit
def cema_bwd_kernel(
    x_ptr, gy_ptr, p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, len_ptr, ckr_ptr, cki_ptr, ain_r_ptr, ain_i_ptr,
    dx_ptr, dp_ptr, dqr_ptr, dqi_ptr, der_ptr, dei_ptr, dom_ptr, astart_r_ptr, astart_i_ptr, scr_ptr, sci_ptr,
    L, D, N, NC, S, SEGS,
    CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D), S). ain: (B, S, D, N) dL/dh at the end of each slice from later steps.

    Writes dx, per-(row, slice) parameter gradients (B, S, D, N) / (B, S, D) for the caller to sum, and
    astart (B, S, D, N) = dL/dh just before the slice (dL/dh0 for S = 1).
    scr, sci: scratch (B, n_dblocks, S, CK, BLOCK_D, BLOCK_N) float32 for one segment of recomputed states.
    """
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(2).to(tl.int64)  # so that step indices t and t * D are int64
    d, n, dmask, mask, dn, p, qr, qi, er, ei, om = _params(
        p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, D, N, BLOCK_D, BLOCK_N)
    st = (b * S + s) * D * N + dn
    ar = tl.load(ain_r_ptr + st, mask=mask, other=0.0)
    ai = tl.load(ain_i_ptr + st, mask=mask, other=0.0)
    length = tl.load(len_ptr + b)
    row = b * L * D + d
    loc = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    prog = (b * tl.num_programs(1) + tl.program_id(1)) * S + s
    scratch = prog * CK * BLOCK_D * BLOCK_N + loc
    g_p = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_qr = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_qi = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_er = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_ei = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_om = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for jj in range(0, SEGS):
        c = s * SEGS + SEGS - 1 - jj
        ck = (b * NC + c) * D * N + dn
        cmask = mask & (dn * 0 + c < NC)  # segments past the end: zero state, no real steps
        hr = tl.load(ckr_ptr + ck, mask=cmask, other=0.0)
        hi = tl.load(cki_ptr + ck, mask=cmask, other=0.0)
        # Recompute the segment forward, keeping the state entering each step.
        for i in range(0, CK):
            t = c * CK + i
            tl.store(scr_ptr + scratch + i * BLOCK_D * BLOCK_N, hr)
            tl.store(sci_ptr + scratch + i * BLOCK_D * BLOCK_N, hi)
            xt = tl.load(x_ptr + row + t * D, mask=dmask & (d * 0 + t < L), other=0.0).to(tl.float32)
            upd = t < length
            nr = p * xt[:, None] + qr * hr - qi * hi
            ni = qr * hi + qi * hr
            hr = tl.where(upd, nr, hr)
            hi = tl.where(upd, ni, hi)
        tl.debug_barrier()
        for ii in range(0, CK):
            i = CK - 1 - ii
            t = c * CK + i
            live = dmask & (d * 0 + t < L)
            hpr = tl.load(scr_ptr + scratch + i * BLOCK_D * BLOCK_N)
            hpi = tl.load(sci_ptr + scratch + i * BLOCK_D * BLOCK_N)
            xt = tl.load(x_ptr + row + t * D, mask=live, other=0.0).to(tl.float32)
            gyt = tl.load(gy_ptr + row + t * D, mask=live, other=0.0).to(tl.float32)
            upd = t < length
            updf = upd.to(tl.float32)
            htr = tl.where(upd, p * xt[:, None] + qr * hpr - qi * hpi, hpr)
            hti = tl.where(upd, qr * hpi + qi * hpr, hpi)
            # y_t = Re(sum eta h_t) + omega x_t, so dL/dh_t = a + gy_t conj(eta).
            cr = ar + gyt[:, None] * er
            ci = ai - gyt[:, None] * ei
            g_er += gyt[:, None] * htr
            g_ei -= gyt[:, None] * hti
            g_om += gyt * xt
            # h_t = p x_t + q h_{t-1} on real steps: dx, dp from Re(c), dq = c conj(h_{t-1}).
            dxt = om * gyt + updf * tl.sum(p * cr, axis=1)
            tl.store(dx_ptr + row + t * D, dxt.to(dx_ptr.dtype.element_ty), mask=live)
            g_p += updf * xt[:, None] * cr
            g_qr += updf * (cr * hpr + ci * hpi)
            g_qi += updf * (ci * hpr - cr * hpi)
            ar = tl.where(upd, qr * cr + qi * ci, cr)  # conj(q) c on real steps, identity on padding
            ai = tl.where(upd, qr * ci - qi * cr, ci)
        tl.debug_barrier()  # the next segment overwrites the scratch
    tl.store(astart_r_ptr + st, ar, mask=mask)
    tl.store(astart_i_ptr + st, ai, mask=mask)
    tl.store(dp_ptr + st, g_p, mask=mask)
    tl.store(dqr_ptr + st, g_qr, mask=mask)
    tl.store(dqi_ptr + st, g_qi, mask=mask)
    tl.store(der_ptr + st, g_er, mask=mask)
    tl.store(dei_ptr + st, g_ei, mask=mask)
    tl.store(dom_ptr + (b * S + s) * D + d, g_om, mask=dmask)
