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
# Launch shape, unmeasured first guesses (no GPU has run these kernels yet; see docs/kernels.md): a 16 x 16
# complex state per program on 2 warps (4 values per thread), and enough time slices for 16 programs per SM,
# since each step waits on a global load of x and only other resident warps hide that latency.
BLOCK_D = 16  # channels per program
NUM_WARPS = 2
MIN_SLICE_SEGMENTS = 4  # a time slice spans >= 4 checkpoint segments (128 steps) so passes 1-2 stay cheap
PROGRAMS_PER_SM = 16  # slices are added until rows x channel blocks x slices reach this many programs per SM


def _launch_dims(D: int, N: int) -> tuple[int, int]:
    import triton

    return min(BLOCK_D, triton.next_power_of_2(D)), triton.next_power_of_2(N)


def _slicing(x: Tensor, n_db: int, checkpoint: int, slice_len: int) -> tuple[int, int]:
    """(S slices, checkpoint segments per slice). slice_len > 0 fixes the slice length (rounded up to whole
    segments); 0 = one slice on CPU (the interpreter), on CUDA enough slices to fill the GPU."""
    B, L = x.shape[0], x.shape[1]
    nc = -(-L // checkpoint)
    if slice_len > 0:
        segs = -(-slice_len // checkpoint)
    elif x.is_cuda:
        target = PROGRAMS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
        want = -(-target // max(1, B * n_db))
        segs = max(MIN_SLICE_SEGMENTS, -(-nc // want))
    else:
        segs = nc
    segs = max(1, min(segs, nc))
    return max(1, -(-nc // segs)), segs


def _log_q(q_re: Tensor, q_im: Tensor) -> tuple[Tensor, Tensor]:
    """(log|q|, arg q): q^n = exp(n log q) for the slice carries."""
    return torch.log(torch.hypot(q_re, q_im)).contiguous(), torch.atan2(q_im, q_re).contiguous()


@torch.library.custom_op("megalodon_lm::cema_scan", mutates_args=())
def cema_scan(
    x: Tensor, p: Tensor, q_re: Tensor, q_im: Tensor, eta_re: Tensor, eta_im: Tensor, omega: Tensor,
    h0_re: Tensor, h0_im: Tensor, lengths: Tensor, checkpoint: int, slice_len: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (B, L, D) -> y (B, L, D), final state re/im (B, D, N), checkpoint states re/im (B, L/ck, D, N)."""
    from .triton_kernels import cema_combine_kernel, cema_fwd_kernel

    B, L, D = x.shape
    N = p.shape[1]
    nc = -(-L // checkpoint)
    y = torch.empty_like(x)
    h_re, h_im = torch.empty_like(h0_re), torch.empty_like(h0_im)
    ck_re = torch.empty(B, nc, D, N, device=x.device, dtype=torch.float32)
    ck_im = torch.empty_like(ck_re)
    if B == 0 or D == 0:
        return y, h_re.copy_(h0_re), h_im.copy_(h0_im), ck_re, ck_im
    bd, bn = _launch_dims(D, N)
    n_db = -(-D // bd)
    S, segs = _slicing(x, n_db, checkpoint, slice_len)
    coef = (p, q_re, q_im, eta_re, eta_im, omega)
    dims = dict(CK=checkpoint, BLOCK_D=bd, BLOCK_N=bn, num_warps=NUM_WARPS)
    if S == 1:
        h_in = (h0_re.view(B, 1, D, N), h0_im.view(B, 1, D, N))
        h_out = (h_re.view(B, 1, D, N), h_im.view(B, 1, D, N))
    else:
        zeros = x.new_zeros(B, S, D, N, dtype=torch.float32)
        u = (torch.empty_like(zeros), torch.empty_like(zeros))
        cema_fwd_kernel[(B, n_db, S)](x, *coef, zeros, zeros, lengths, y, *u, ck_re, ck_im,
                                      L, D, N, nc, S, segs, STORE_Y=False, **dims)
        h_in = (torch.empty_like(zeros), torch.empty_like(zeros))
        cema_combine_kernel[(B, n_db)](*u, *_log_q(q_re, q_im), lengths, h0_re, h0_im, *h_in, h_re, h_im,
                                       D, N, S, segs * checkpoint, BLOCK_D=bd, BLOCK_N=bn, REVERSE=False,
                                       num_warps=NUM_WARPS)
        h_out = u  # the slice end states again: scratch
    cema_fwd_kernel[(B, n_db, S)](x, *coef, *h_in, lengths, y, *h_out, ck_re, ck_im,
                                  L, D, N, nc, S, segs, STORE_Y=True, **dims)
    return y, h_re, h_im, ck_re, ck_im


@cema_scan.register_fake
def _(x, p, q_re, q_im, eta_re, eta_im, omega, h0_re, h0_im, lengths, checkpoint, slice_len):
    B, L, D = x.shape
    nc = -(-L // checkpoint)
    ck = x.new_empty(B, nc, D, p.shape[1], dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(h0_re), torch.empty_like(h0_im), ck, torch.empty_like(ck)


@torch.library.custom_op("megalodon_lm::cema_scan_backward", mutates_args=())
def cema_scan_backward(
    gy: Tensor, gh_re: Tensor, gh_im: Tensor, x: Tensor, p: Tensor, q_re: Tensor, q_im: Tensor, eta_re: Tensor,
    eta_im: Tensor, omega: Tensor, lengths: Tensor, ck_re: Tensor, ck_im: Tensor, checkpoint: int, slice_len: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dp, dq_re, dq_im, deta_re, deta_im, domega, dh0_re, dh0_im) of `cema_scan`."""
    from .triton_kernels import cema_adjoint_kernel, cema_bwd_kernel, cema_combine_kernel

    B, L, D = x.shape
    N = p.shape[1]
    nc = ck_re.shape[1]
    dx = torch.empty_like(x)
    if B == 0 or D == 0:
        z = [torch.zeros_like(t) for t in (p, q_re, q_im, eta_re, eta_im, omega)]
        return (dx, *z, gh_re.clone(), gh_im.clone())
    bd, bn = _launch_dims(D, N)
    n_db = -(-D // bd)
    S, segs = _slicing(x, n_db, checkpoint, slice_len)
    f32 = dict(device=x.device, dtype=torch.float32)
    dh0 = (torch.empty(B, D, N, **f32), torch.empty(B, D, N, **f32))
    if S == 1:
        a_in = (gh_re.view(B, 1, D, N), gh_im.view(B, 1, D, N))
    else:
        v = (torch.empty(B, S, D, N, **f32), torch.empty(B, S, D, N, **f32))
        cema_adjoint_kernel[(B, n_db, S)](gy, q_re, q_im, eta_re, eta_im, lengths, *v, L, D, N, S,
                                          segs * checkpoint, BLOCK_D=bd, BLOCK_N=bn, num_warps=NUM_WARPS)
        a_in = (torch.empty_like(v[0]), torch.empty_like(v[0]))
        cema_combine_kernel[(B, n_db)](*v, *_log_q(q_re, q_im), lengths, gh_re, gh_im, *a_in, *dh0,
                                       D, N, S, segs * checkpoint, BLOCK_D=bd, BLOCK_N=bn, REVERSE=True,
                                       num_warps=NUM_WARPS)
    per_slice = [torch.empty(B, S, D, N, **f32) for _ in range(7)]  # dp, dq re/im, deta re/im, a_start re/im
    d_om = torch.empty(B, S, D, **f32)
    scratch = [torch.empty(B, n_db, S, checkpoint, bd, bn, **f32) for _ in range(2)]
    cema_bwd_kernel[(B, n_db, S)](
        x, gy, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, *a_in,
        dx, *per_slice[:5], d_om, per_slice[5], per_slice[6], *scratch,
        L, D, N, nc, S, segs, CK=checkpoint, BLOCK_D=bd, BLOCK_N=bn, num_warps=NUM_WARPS,
    )
    if S == 1:
        dh0 = (per_slice[5].view(B, D, N), per_slice[6].view(B, D, N))
    dp, dq_re, dq_im, de_re, de_im = (g.sum((0, 1)) for g in per_slice[:5])
    return dx, dp, dq_re, dq_im, de_re, de_im, d_om.sum((0, 1)), *dh0


@cema_scan_backward.register_fake
def _(gy, gh_re, gh_im, x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, checkpoint, slice_len):
    dn = [torch.empty_like(t) for t in (p, q_re, q_im, eta_re, eta_im)]
    return (torch.empty_like(x), *dn, torch.empty_like(omega), torch.empty_like(gh_re), torch.empty_like(gh_im))


def _setup_context(ctx, inputs, output):
    x, p, q_re, q_im, eta_re, eta_im, omega, _h0r, _h0i, lengths, checkpoint, slice_len = inputs
    ctx.args = (checkpoint, slice_len)
    ctx.save_for_backward(x, p, q_re, q_im, eta_re, eta_im, omega, lengths, output[3], output[4])


def _backward(ctx, gy, gh_re, gh_im, _gck_re, _gck_im):
    x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im = ctx.saved_tensors
    B, D, N = x.shape[0], x.shape[2], p.shape[1]
    gy = torch.zeros_like(x) if gy is None else gy.contiguous()
    zeros = x.new_zeros(B, D, N, dtype=torch.float32)
    gh_re = zeros if gh_re is None else gh_re.contiguous()
    gh_im = zeros if gh_im is None else gh_im.contiguous()
    grads = torch.ops.megalodon_lm.cema_scan_backward(
        gy, gh_re, gh_im, x, p, q_re, q_im, eta_re, eta_im, omega, lengths, ck_re, ck_im, *ctx.args
    )
    return (*grads, None, None, None)


cema_scan.register_autograd(_backward, setup_context=_setup_context)


def cema_triton(
    x: Tensor,
    coef: CemaCoefficients,
    h0: Tensor | None = None,
    lengths: Tensor | None = None,
    need_state: bool = False,
    checkpoint: int = CHECKPOINT_EVERY,
    slice_len: int = 0,
) -> tuple[Tensor, Tensor | None]:
    """Same contract as `cema_chunked`: x (B, L, D) -> (y (B, L, D) in x's dtype, final state (B, D, N) complex64
    or None). State math in float32; fp32/bf16/fp16 inputs on CUDA (or CPU under TRITON_INTERPRET=1).

    checkpoint: steps between the states stored for the backward; slice_len: steps per time slice scanned
    in parallel (0 = chosen from the GPU size; see `triton_kernels.py`)."""
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
                                    checkpoint, slice_len)
    return y, (torch.complex(h_re, h_im) if need_state else None)
