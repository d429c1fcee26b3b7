"""Loop-free CEMA: a chunked scan of small matrix products (see docs/algorithms.md §1, docs/cema.md).

Time is cut into blocks of T tokens. Per channel, with H_b the complex state entering block b:

    y[bT+i]  = sum_{j<=i} k_{i-j} x[bT+j]  +  Re(sum_n eta_n q_n^{i+1} H_b,n)  +  omega x[bT+i]
    H_{b+1}  = q^T * H_b + sum_j p q^{T-1-j} x[bT+j]                     k_m = Re(sum_n eta_n p_n q_n^m)

The first two terms are one batched matmul per channel against [Toeplitz(k) | W] of shape
(T, T + 2N); the block contributions are one matmul against V (2N, T); the block states come from a
log-depth (Hillis-Steele) scan over L/T blocks. Memory is O(B*D*L + D*T*(T+2N)) plus the block states
(B*D*N*L/T complex); nothing of size D*N*L is ever built. Autograd differentiates all of it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._dtypes import complex_dtype
from .coefficients import CemaCoefficients


def default_block_size(length: int) -> int:
    """T ~ sqrt(L), a power of two in [32, 128]: balances the intra-block matmuls (cost ~ T) against the
    block scan and stored block states (~ L/T). Measured in docs/cema.md."""
    t = 1 << max(0, round(math.log2(max(1, length)) / 2))
    return min(128, max(32, t))


def _interleave(z: torch.Tensor) -> torch.Tensor:
    """Complex (..., N) -> real (..., 2N) as [re_0, im_0, re_1, im_1, ...] (a zero-copy view)."""
    return torch.view_as_real(z).flatten(-2)


def _scan_blocks(u: torch.Tensor, log_decay: torch.Tensor, reset: torch.Tensor | None = None) -> torch.Tensor:
    """Inclusive scan S_b = sum_{b' <= b} a^(b-b') U_b' along axis 2 (Hillis-Steele).

    u: (D, B, nb, N) complex; log_decay: (D, N) complex, log a. log2(nb) elementwise steps.
    reset: (B, nb) bool, True where a new segment starts: the sum then runs only over b' >= that block.
    """
    D, B, nb, N = u.shape
    s = u
    # cut[b]: a segment starts inside the window (b - step, b] that s[b] already covers, so s[b - step]
    # belongs to an earlier segment and must not be added.
    cut = reset
    step = 1
    while step < nb:
        a_step = torch.exp(log_decay * step).unsqueeze(1).unsqueeze(1)  # (D, 1, 1, N)
        shifted = a_step * s[:, :, : nb - step]
        if cut is not None:
            shifted = shifted * (~cut[:, step:]).to(u.real.dtype).view(1, B, nb - step, 1)
            cut = torch.cat([cut[:, :step], cut[:, step:] | cut[:, : nb - step]], dim=1)
        s = torch.cat([s[:, :, :step], s[:, :, step:] + shifted], dim=2)
        step *= 2
    return s


def cema_chunked(
    x: torch.Tensor,
    coef: CemaCoefficients,
    h0: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    need_state: bool = False,
    block_size: int | None = None,
    block_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: (B, L, D) -> (y (B, L, D) in x's dtype, final state (B, D, N) complex or None).

    h0: (B, D, N) complex state entering the segment (zeros if None).
    lengths: (B,) number of real tokens per row (right padding); the final state is taken after
    each row's last real token. Outputs at padded positions are meaningless. None = all L.
    need_state: compute and return the final state (skipped otherwise: it is only for streaming).
    block_size: tokens per block T (default `default_block_size(L)`).
    block_start: (B, ceil(L/T)) bool, True where a block starts a fresh segment (zero entering state; used
    by the packed variable-length path, see `cema/varlen.py`). Not combinable with h0.
    """
    B, L, D = x.shape
    dt = coef.p.dtype
    N = coef.p.shape[1]
    T = max(1, min(block_size or default_block_size(L), L))
    nb = -(-L // T)
    if block_start is not None and (h0 is not None or tuple(block_start.shape) != (B, nb)):
        raise ValueError(f"block_start must be (B, n_blocks) = {(B, nb)} and comes without h0")
    pad = nb * T - L
    xf = x.to(dt)
    # Channels lead so that they are the batch of every matmul: (D, B*nb, T).
    xb = F.pad(xf, (0, 0, 0, pad)).view(B * nb, T, D).permute(2, 0, 1).contiguous()

    idx = torch.arange(T + 1, device=x.device)
    qpow = coef.powers(idx)  # (D, N, T+1): q^0 .. q^T
    kvec = (coef.eta.unsqueeze(-1) * coef.p.unsqueeze(-1) * qpow[..., :T]).real.sum(1)  # (D, T): k_m
    # K^T[j, i] = k_(i-j) (0 for j > i) = kpad[T-1 + i - j]: sliding windows of the zero-padded k, rows
    # reversed. Its backward is a strided sum; a gather by a lag index would backprop through a serial
    # index_put (measured 2x slower).
    toeplitz_t = F.pad(kvec, (T - 1, 0)).unfold(-1, T, 1).flip(1)  # (D, T_j, T_i)

    # Block contributions U_b = sum_j p q^(T-1-j) x_j, interleaved re/im: (D, B*nb, 2N).
    v_blk = coef.p.unsqueeze(-1) * qpow[..., :T].flip(-1)  # (D, N, T)
    u = torch.bmm(xb, _interleave(v_blk.transpose(1, 2)))
    u = torch.view_as_complex(u.view(D, B, nb, N, 2))
    log_decay = coef.log_q * T
    if nb > 1:
        reset = None if block_start is None else block_start[:, :-1]
        s = _scan_blocks(u[:, :, :-1], log_decay, reset)
        h_in = torch.cat([torch.zeros_like(u[:, :, :1]), s], dim=2)  # state entering each block
        if block_start is not None:
            h_in = h_in * (~block_start).to(dt).view(1, B, nb, 1)
    else:
        h_in = torch.zeros_like(u)
    if h0 is not None:
        blocks = torch.arange(nb, device=x.device, dtype=dt)
        carry = torch.exp(log_decay.unsqueeze(1) * blocks.view(nb, 1))  # (D, nb, N)
        h_in = h_in + carry.unsqueeze(1) * h0.to(h_in.dtype).transpose(0, 1).unsqueeze(2)

    # y = x K^T + Re(H W^T), with [H_re, H_im] interleaved against [W_re^T; -W_im^T]. Two matmuls
    # rather than one on concatenated operands: autograd then keeps xb once, not a second copy.
    w_out = coef.eta.unsqueeze(-1) * qpow[..., 1:]  # (D, N, T): eta q^(i+1)
    w_rows = torch.stack([w_out.real, -w_out.imag], dim=2).flatten(1, 2)  # (D, 2N, T) interleaved
    y = torch.baddbmm(torch.bmm(xb, toeplitz_t), _interleave(h_in).reshape(D, B * nb, 2 * N), w_rows)
    y = y.view(D, B, nb * T).permute(1, 2, 0)[:, :L]
    # x-shaped operand first: the sum takes its contiguous (B, L, D) layout rather than y's permuted one, like
    # chunk_fn's output (a later dropout draws its mask in memory order, so layouts must agree).
    y = (coef.omega * xf + y).to(x.dtype)

    if not need_state:
        return y, None
    return y, _final_state(xf, coef, h_in, h0, lengths, T)


def _final_state(
    xf: torch.Tensor,
    coef: CemaCoefficients,
    h_in: torch.Tensor,
    h0: torch.Tensor | None,
    lengths: torch.Tensor | None,
    T: int,
) -> torch.Tensor:
    """State after each row's last real token: q^(i+1) H_blk + sum_{j<=i} p q^(i-j) x[blk*T + j]."""
    B, L, D = xf.shape
    cdt = complex_dtype(xf.dtype)
    if lengths is None:
        lengths = torch.full((B,), L, device=xf.device, dtype=torch.long)
    last = (lengths - 1).clamp(min=0)
    blk = last // T  # (B,)
    i = last - blk * T  # (B,) index of the last real token inside its block
    # Entering state of that block, per row: (B, D, N).
    h_blk = h_in.permute(1, 2, 0, 3)[torch.arange(B, device=xf.device), blk]
    j = torch.arange(T, device=xf.device)
    pos = (blk * T).unsqueeze(1) + j  # (B, T) absolute positions of the block's tokens
    xs = xf.gather(1, pos.clamp(max=L - 1).unsqueeze(-1).expand(B, T, D))  # (B, T, D)
    expo = i.unsqueeze(1) - j  # (B, T): i - j, negative beyond the last token
    keep = (expo >= 0).to(xf.dtype)
    # p q^(i-j) for every row: (B, D, N, T), tiny (T tokens). The powers q^0 .. q^(T-1) are computed once and
    # gathered per row (the same values as exponentiating per row, B times fewer complex exps).
    powers = coef.powers(j)  # (D, N, T)
    w = coef.p.unsqueeze(-1) * powers[:, :, expo.clamp(min=0)].permute(2, 0, 1, 3)
    w = w * keep.view(B, 1, 1, T)
    h = torch.einsum("bdnt,btd->bdn", w, xs.to(cdt))
    h = h + torch.exp(coef.log_q.unsqueeze(0) * (i + 1).view(B, 1, 1).to(xf.dtype)) * h_blk
    if h0 is not None:
        # Rows with no real token keep their incoming state.
        h = torch.where((lengths > 0).view(B, 1, 1), h, h0.to(cdt))
    else:
        h = torch.where((lengths > 0).view(B, 1, 1), h, torch.zeros_like(h))
    return h
