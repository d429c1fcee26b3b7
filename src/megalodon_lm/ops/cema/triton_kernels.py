"""Triton kernels for CEMA: a fused sequential scan (forward) and its reverse scan (backward).

Imported only when the Triton path runs (see `triton.py`); importing it needs the `triton` package.

Why a sequential scan: the recurrence is elementwise per (row, channel, state component), so one program
owns a (row, block of channels) pair, keeps the (BLOCK_D, N) complex state in registers and walks the
time axis once, reading x and writing y exactly once: the minimum memory traffic of the op. A chunked
scan (docs/algorithms.md §1) would buy parallelism over time with T x T Toeplitz matmuls, which only pays
when B * D / BLOCK_D programs cannot fill the GPU; at the 7B width (D = 4096) they do.

Backward: the adjoint runs in reverse, c_t = gy_t conj(eta) + conj(q) c_{t+1}, and needs the states h_{t-1}.
Running the forward recurrence backwards (dividing by q) is unstable for strongly damped components, so
the forward stores the state entering every CK-th step (B * D * N * L / CK complex values) and the
backward recomputes each CK-step segment forward into a small per-program scratch buffer, then walks it
in reverse. All state math is float32 whatever the input dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cema_fwd_kernel(
    x_ptr, p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, h0r_ptr, h0i_ptr, len_ptr,
    y_ptr, hr_ptr, hi_ptr, ckr_ptr, cki_ptr,
    L, D, N, NC,
    CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D)). x, y: (B, L, D); coefficients (D, N); h0, h: (B, D, N); ckpt (B, NC, D, N)."""
    b = tl.program_id(0).to(tl.int64)
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
    st = b * D * N + dn
    hr = tl.load(h0r_ptr + st, mask=mask, other=0.0)
    hi = tl.load(h0i_ptr + st, mask=mask, other=0.0)
    length = tl.load(len_ptr + b)
    row = b * L * D + d
    for c in range(0, NC):
        ck = (b * NC + c) * D * N + dn
        tl.store(ckr_ptr + ck, hr, mask=mask)
        tl.store(cki_ptr + ck, hi, mask=mask)
        for i in range(0, CK):
            t = c * CK + i
            live = dmask & (d * 0 + t < L)  # (the interpreter wants a tensor mask)
            xt = tl.load(x_ptr + row + t * D, mask=live, other=0.0).to(tl.float32)
            upd = t < length  # right padding: a padded step keeps the state
            nr = p * xt[:, None] + qr * hr - qi * hi
            ni = qr * hi + qi * hr
            hr = tl.where(upd, nr, hr)
            hi = tl.where(upd, ni, hi)
            yt = tl.sum(er * hr - ei * hi, axis=1) + om * xt
            tl.store(y_ptr + row + t * D, yt.to(y_ptr.dtype.element_ty), mask=live)
    tl.store(hr_ptr + st, hr, mask=mask)
    tl.store(hi_ptr + st, hi, mask=mask)


@triton.jit
def cema_bwd_kernel(
    x_ptr, gy_ptr, p_ptr, qr_ptr, qi_ptr, er_ptr, ei_ptr, om_ptr, len_ptr, ckr_ptr, cki_ptr, ghr_ptr, ghi_ptr,
    dx_ptr, dp_ptr, dqr_ptr, dqi_ptr, der_ptr, dei_ptr, dom_ptr, dh0r_ptr, dh0i_ptr, scr_ptr, sci_ptr,
    L, D, N, NC,
    CK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B, cdiv(D, BLOCK_D)). Per-row parameter gradients (B, D, N) / (B, D), summed over B by the caller.

    scr, sci: scratch (B, n_dblocks, CK, BLOCK_D, BLOCK_N) float32 for one segment of recomputed states.
    """
    b = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
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
    st = b * D * N + dn
    # a = dL/dh_t from later steps (starts as the gradient of the final state).
    ar = tl.load(ghr_ptr + st, mask=mask, other=0.0)
    ai = tl.load(ghi_ptr + st, mask=mask, other=0.0)
    length = tl.load(len_ptr + b)
    row = b * L * D + d
    n_db = tl.num_programs(1)
    loc = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch = (b * n_db + pd) * CK * BLOCK_D * BLOCK_N + loc
    g_p = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_qr = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_qi = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_er = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_ei = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    g_om = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for cc in range(0, NC):
        c = NC - 1 - cc
        ck = (b * NC + c) * D * N + dn
        hr = tl.load(ckr_ptr + ck, mask=mask, other=0.0)
        hi = tl.load(cki_ptr + ck, mask=mask, other=0.0)
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
            live = dmask & (d * 0 + t < L)  # (the interpreter wants a tensor mask)
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
    tl.store(dh0r_ptr + st, ar, mask=mask)
    tl.store(dh0i_ptr + st, ai, mask=mask)
    tl.store(dp_ptr + st, g_p, mask=mask)
    tl.store(dqr_ptr + st, g_qr, mask=mask)
    tl.store(dqi_ptr + st, g_qi, mask=mask)
    tl.store(der_ptr + st, g_er, mask=mask)
    tl.store(dei_ptr + st, g_ei, mask=mask)
    tl.store(dom_ptr + b * D + d, g_om, mask=dmask)
