"""CEMA on Triton kernels, registered as torch custom ops (`megalodon_lm::cema_scan` and its backward).

torch.compile sees one opaque op with a fake (shape-only) implementation, so a compiled model has no graph
break here. Gradients come from the reverse-scan kernel for x, p, q, eta, omega and h0; the autograd graph
from the raw parameters to (p, q, eta, omega) stays in PyTorch (`cema_coefficients`).
The kernels (`triton_kernels.py`) are imported on first use only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._triton import check_triton_input
from .coefficients import CemaCoefficients

CHECKPOINT_EVERY = 32  # steps between stored states: memory B*D*N*L/32 complex vs segment recompute
BLOCK_D = 16  # channels per program: enough programs to fill a GPU at D >= 2048 with B = 1


def _launch_dims(D: int, N: int) -> tuple[int, int]:
    import triton

    return min(BLOCK_D, triton.next_power_of_2(D)), triton.next_power_of_2(N)


@torch.library.custom_op("megalodon_lm::cema_scan", mutates_args=())
def cema_scan(
    x: Tensor, p: Tensor, q_re: Tensor, q_im: Tensor, eta_re: Tensor, eta_im: Tensor, omega: Tensor,
    h0_re: Tensor, h0_im: Tensor, lengths: Tensor, checkpoint: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, L, D) -> y (B, L, D), final state re/im (B, D, N), checkpoint states re/im (B, L/ck, D, N)."""
    import triton

    from .triton_kernels import cema_fwd_kernel

    B, L, D = x.shape
    N = p.shape[1]
    nc = triton.cdiv(L, checkpoint)
    y = torch.empty_like(x)
    h_re, h_im = torch.empty_like(h0_re), torch.empty_like(h0_im)
    ck_re = torch.empty(B, nc, D, N, device=x.device, dtype=torch.float32)
    ck_im = torch.empty_like(ck_re)
    bd, bn = _launch_dims(D, N)
    if B > 0 and D > 0:
        cema_fwd_kernel[(B, triton.cdiv(D, bd))](
            x, p, q_re, q_im, eta_re, eta_im, omega, h0_re, h0_im, lengths, y, h_re, h_im, ck_re, ck_im,
            L, D, N, nc, CK=checkpoint, BLOCK_D=bd, BLOCK_N=bn,
        )
    return y, h_re, h_im, ck_re, ck_im


@cema_scan.register_fake
def _(x, p, q_re, q_im, eta_re, eta_im, omega, h0_re, h0_im, lengths, checkpoint):
    B, L, D = x.shape
    nc = -(-L // checkpoint)
    ck = x.new_empty(B, nc, D, p.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(h0_re), torch.empty_like(h0_im), ck, torch.empty_like(ck)


@torch.library.custom_op("megalodon_lm::cema_scan_backward", mutates_args=())
def cema_scan_backward(
    gy: Tensor, gh_re: Tensor, gh_im: Tensor, x: Tensor, p: Tensor, q_re: Tensor, q_im: Tensor, eta_re: Tensor,
    eta_im: Tensor, omega: Tensor, lengths: Tensor, ck_re: Tensor, ck_im: Tensor, checkpoint: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dp, dq_re, dq_im, deta_re, deta_im, domega, dh0_re, dh0_im) of `cema_scan`."""
    import triton

    from .triton_kernels import cema_bwd_kernel

    B, L, D = x.shape
    N = p.shape[1]
    nc = ck_re.shape[1]
    bd, bn = _launch_dims(D, N)
    n_db = triton.cdiv(D, bd)
    dx = torch.empty_like(x)
    per_row = [torch.empty(B, D, N, device=x.device, dtype=torch.float32) for _ in range(7)]
    d_om = torch.empty(B, D, device=x.device, dtype=torch.float32)
    scratch = [torch.empty(B, n_db, checkpoint, bd, bn, device=x.device, dtype=torch.float32) for _ in range(2)]
    if B > 0 and D > 0:
        cema_bwd_kernel[(B, n_db)](
            x, gy, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, gh_re, gh_im,
            dx, *per_row[:5], d_om, per_row[5], per_row[6], *scratch,
            L, D, N, nc, CK=checkpoint, BLOCK_D=bd, BLOCK_N=bn,
        )
    dp, dq_re, dq_im, de_re, de_im = (g.sum(0) for g in per_row[:5])
    return dx, dp, dq_re, dq_im, de_re, de_im, d_om.sum(0), per_row[5], per_row[6]


@cema_scan_backward.register_fake
def _(gy, gh_re, gh_im, x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, checkpoint):
    dn = [torch.empty_like(t) for t in (p, q_re, q_im, eta_re, eta_im)]
    return (torch.empty_like(x), *dn, torch.empty_like(omega), torch.empty_like(gh_re), torch.empty_like(gh_im))


def _setup_context(ctx, inputs, output):
    x, p, q_re, q_im, eta_re, eta_im, omega, _h0r, _h0i, lengths, checkpoint = inputs
    ctx.checkpoint = checkpoint
    ctx.save_for_backward(x, p, q_re, q_im, eta_re, eta_im, omega, lengths, output[3], output[4])


def _backward(ctx, gy, gh_re, gh_im, _gck_re, _gck_im):
    x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im = ctx.saved_tensors
    B, D, N = x.shape[0], x.shape[2], p.shape[1]
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    zeros = x.new_zeros(B, D, N, dtype=torch.float32)
    gh_re = zeros if gh_re is None else gh_re.contiguous()
    gh_im = zeros if gh_im is None else gh_im.contiguous()
    grads = torch.ops.megalodon_lm.cema_scan_backward(
        gy, gh_re, gh_im, x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, ctx.checkpoint
    )
    return (*grads, None, None)


cema_scan.register_autograd(_backward, setup_context=_setup_context)


def cema_triton(
    x: Tensor,
    coef: CemaCoefficients,
    h0: Tensor | None = None,
    lengths: Tensor | None = None,
    need_state: bool = False,
    checkpoint: int = CHECKPOINT_EVERY,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `cema_chunked`: x (B, L, D) -> (y (B, L, D) in x's dtype, final state (B, D, N) complex64
    or None). State math in float32; fp32/bf16/fp16 inputs on CUDA (or CPU under TRITON_INTERPRET=1)."""
    check_triton_input(x, "cema")
    B, L, D = x.shape
    N = coef.p.shape[1]
    f32 = torch.float32
    if h0 is None:
        h0_re = h0_im = x.new_zeros(B, D, N, dtype=f32)
    else:
        if h0.shape != (B, D, N):
            raise ValueError(f"cema: h0 must have shape {(B, D, N)}, got {tuple(h0.shape)}")
        h0_re, h0_im = h0.real.to(f32).contiguous(), h0.imag.to(f32).contiguous()
    if lengths is None:
        lengths = torch.full((B,), L, device=x.device, dtype=torch.int32)
    params = [t.to(f32).contiguous() for t in (coef.p, coef.q.real, coef.q.imag, coef.eta.real, coef.eta.imag,
                                              coef.omega)]
    y, h_re, h_im, _, _ = cema_scan(x.contiguous(), *params, h0_re, h0_im, lengths.to(torch.int32).contiguous(),
                                    checkpoint)
    return y, (torch.complex(h_re, h_im) if need_state else None)
