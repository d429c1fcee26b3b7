"""The lean path's element-wise regions on Triton kernels, registered as torch custom ops.

`megalodon_lm::fused_qk_prep`, `fused_silu`, `fused_swiglu` and their `*_backward` ops, each with a fake
(shape-only) implementation and `register_autograd`, so torch.compile sees opaque ops and no graph
break. The backward ops take the forward's inputs (nothing else is stored) and recompute the cheap
element-wise values. Same contracts as `reference.py`; float32 arithmetic for every storage dtype, one
rounding to the output dtype. The kernels (`triton_kernels.py`) are imported on first use only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._triton import check_triton_input

# Launch shapes, unmeasured first guesses (no GPU has run these kernels yet; see docs/kernels.md).
BLOCK = 1024  # elements per program of the flat SiLU/SwiGLU kernels
TILE_ELEMENTS = 4096  # q/k tile: tokens x dz of one head (T a power of two in [16, 64])
MAX_TOKEN_PROGRAMS = 256  # q/k backward: token programs per head, each writes one partial dgamma/dbeta row


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _qk_dims(n_tok: int, dz: int) -> tuple[int, int, int]:
    """(T tokens per tile, BLOCK_P feature pairs, number of token tiles)."""
    block_p = _pow2(-(-dz // 2))
    T = max(16, min(64, TILE_ELEMENTS // (2 * block_p)))
    return T, block_p, -(-n_tok // T)


def _pos_stride(positions: Tensor | None) -> int:
    """Stride between rows of the positions: 0 for one (L,) vector shared by all rows."""
    return 0 if positions is None or positions.dim() == 1 else positions.shape[1]


@torch.library.custom_op("megalodon_lm::fused_qk_prep", mutates_args=())
def fused_qk_prep(
    z: Tensor, gamma: Tensor, beta: Tensor, cos: Tensor | None, sin: Tensor | None, positions: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """z (B, L, H, dz) contiguous, gamma/beta (2, H*dz), cos/sin (P, dz/2) float32 tables, positions (L,) or
    (B, L) int64 in [0, P) (all three None: no rotation) -> q, k (B, L, H, dz) in z's dtype."""
    from .triton_kernels import qk_prep_fwd_kernel

    B, L, H, dz = z.shape
    q, k = torch.empty_like(z), torch.empty_like(z)
    n_tok = B * L
    T, block_p, n_tiles = _qk_dims(n_tok, dz)
    if n_tok == 0 or H == 0:
        return q, k
    rope = positions is not None
    qk_prep_fwd_kernel[(n_tiles, H)](
        z, gamma, beta, cos if rope else z, sin if rope else z, positions if rope else z, q, k,
        n_tok, L, H, dz, _pos_stride(positions), eps, 1.0 / math.sqrt(dz), ROPE=rope, T=T, BLOCK_P=block_p,
    )
    return q, k


@fused_qk_prep.register_fake
def _(z, gamma, beta, cos, sin, positions, eps):
    return torch.empty_like(z), torch.empty_like(z)


@torch.library.custom_op("megalodon_lm::fused_qk_prep_backward", mutates_args=())
def fused_qk_prep_backward(
    gq: Tensor, gk: Tensor, z: Tensor, gamma: Tensor, cos: Tensor | None, sin: Tensor | None,
    positions: Tensor | None, eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dz in z's dtype, dgamma, dbeta float32 (2, H*dz)) of `fused_qk_prep`."""
    from .triton_kernels import qk_prep_bwd_kernel

    B, L, H, dz = z.shape
    n_tok = B * L
    T, block_p, n_tiles = _qk_dims(n_tok, dz)
    n_prog = max(1, min(n_tiles, MAX_TOKEN_PROGRAMS))
    d_z = torch.empty_like(z)
    part_g = torch.zeros(n_prog, 2, H * dz, device=z.device, dtype=torch.float32)
    part_b = torch.zeros_like(part_g)
    if n_tok > 0 and H > 0:
        rope = positions is not None
        qk_prep_bwd_kernel[(n_prog, H)](
            gq, gk, z, gamma, cos if rope else z, sin if rope else z, positions if rope else z, d_z, part_g,
            part_b, n_tok, L, H, dz, _pos_stride(positions), eps, 1.0 / math.sqrt(dz), n_tiles, n_prog,
            ROPE=rope, T=T, BLOCK_P=block_p,
        )
    return d_z, part_g.sum(0), part_b.sum(0)


@fused_qk_prep_backward.register_fake
def _(gq, gk, z, gamma, cos, sin, positions, eps):
    return torch.empty_like(z), gamma.new_empty(gamma.shape, dtype=torch.float32), \
        gamma.new_empty(gamma.shape, dtype=torch.float32)


def _qk_setup_context(ctx, inputs, output):
    z, gamma, beta, cos, sin, positions, eps = inputs
    ctx.eps = eps
    ctx.dtypes = (gamma.dtype, beta.dtype)
    ctx.save_for_backward(z, gamma, cos, sin, positions)


def _qk_backward(ctx, gq, gk):
    z, gamma, cos, sin, positions = ctx.saved_tensors
    gq = torch.zeros_like(z) if gq is None else gq.contiguous()
    gk = torch.zeros_like(z) if gk is None else gk.contiguous()
    d_z, d_gamma, d_beta = torch.ops.megalodon_lm.fused_qk_prep_backward(gq, gk, z, gamma, cos, sin, positions,
                                                                         ctx.eps)
    return d_z, d_gamma.to(ctx.dtypes[0]), d_beta.to(ctx.dtypes[1]), None, None, None, None


fused_qk_prep.register_autograd(_qk_backward, setup_context=_qk_setup_context)


def _flat_grid(n: int) -> tuple[int]:
    return (-(-n // BLOCK),)


@torch.library.custom_op("megalodon_lm::fused_silu", mutates_args=())
def fused_silu(a: Tensor) -> Tensor:
    """silu(a), a contiguous."""
    from .triton_kernels import swiglu_fwd_kernel

    y = torch.empty_like(a)
    if a.numel():
        swiglu_fwd_kernel[_flat_grid(a.numel())](a, a, y, a.numel(), HAS_B=False, BLOCK=BLOCK)
    return y


@fused_silu.register_fake
def _(a):
    return torch.empty_like(a)


@torch.library.custom_op("megalodon_lm::fused_silu_backward", mutates_args=())
def fused_silu_backward(g: Tensor, a: Tensor) -> Tensor:
    """Gradient of `fused_silu` with respect to a."""
    from .triton_kernels import swiglu_bwd_kernel

    da = torch.empty_like(a)
    if a.numel():
        swiglu_bwd_kernel[_flat_grid(a.numel())](g, a, a, da, da, a.numel(), HAS_B=False, BLOCK=BLOCK)
    return da


@fused_silu_backward.register_fake
def _(g, a):
    return torch.empty_like(a)


def _silu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _silu_backward(ctx, g):
    (a,) = ctx.saved_tensors
    return torch.ops.megalodon_lm.fused_silu_backward(g.contiguous(), a)


fused_silu.register_autograd(_silu_backward, setup_context=_silu_setup_context)


@torch.library.custom_op("megalodon_lm::fused_swiglu", mutates_args=())
def fused_swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, a and b contiguous of one shape and dtype."""
    from .triton_kernels import swiglu_fwd_kernel

    y = torch.empty_like(a)
    if a.numel():
        swiglu_fwd_kernel[_flat_grid(a.numel())](a, b, y, a.numel(), HAS_B=True, BLOCK=BLOCK)
    return y


@fused_swiglu.register_fake
def _(a, b):
    return torch.empty_like(a)


@torch.library.custom_op("megalodon_lm::fused_swiglu_backward", mutates_args=())
def fused_swiglu_backward(g: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients (da, db) of `fused_swiglu`."""
    from .triton_kernels import swiglu_bwd_kernel

    da, db = torch.empty_like(a), torch.empty_like(b)
    if a.numel():
        swiglu_bwd_kernel[_flat_grid(a.numel())](g, a, b, da, db, a.numel(), HAS_B=True, BLOCK=BLOCK)
    return da, db


@fused_swiglu_backward.register_fake
def _(g, a, b):
    return torch.empty_like(a), torch.empty_like(b)


def _swiglu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, g):
    a, b = ctx.saved_tensors
    return torch.ops.megalodon_lm.fused_swiglu_backward(g.contiguous(), a, b)


fused_swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup_context)


def rope_table(freqs: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """cos, sin (size, dz/2) float32 of the angles p * freqs, p = 0 .. size-1 (float32 products, as apply_rope)."""
    angles = torch.arange(size, device=freqs.device, dtype=torch.float32).unsqueeze(-1) * freqs.float()
    return torch.cos(angles).contiguous(), torch.sin(angles).contiguous()


def qk_prep_triton(
    z: Tensor, gamma: Tensor, beta: Tensor, eps: float, freqs: Tensor | None = None,
    positions: Tensor | None = None, table_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `qk_prep_reference`; fp32/bf16/fp16 z on CUDA (or CPU under TRITON_INTERPRET=1).

    table_size: a bound on the positions (the chunk size); None = positions.max() + 1 (one device sync).
    Positions outside [0, table_size) are a caller error the kernel does not check."""
    check_triton_input(z, "qk_prep")
    if z.dim() != 4:
        raise ValueError(f"qk_prep: z must be (B, L, H, dz), got shape {tuple(z.shape)}")
    B, L, H, dz = z.shape
    if gamma.shape != (2, H * dz) or beta.shape != (2, H * dz):
        raise ValueError(f"qk_prep: gamma and beta must be (2, {H * dz}), got {tuple(gamma.shape)}, "
                         f"{tuple(beta.shape)}")
    cos = sin = pos = None
    if positions is not None:
        if freqs is None or dz % 2 or freqs.shape != (dz // 2,):
            raise ValueError(f"qk_prep: rotation needs an even head width and freqs of shape ({dz // 2},)")
        if positions.shape not in ((L,), (B, L)):
            raise ValueError(f"qk_prep: positions must be ({L},) or ({B}, {L}), got {tuple(positions.shape)}")
        pos = positions.to(torch.int64).contiguous()
        if table_size is None:
            lo, hi = pos.aminmax() if pos.numel() else (torch.tensor(0), torch.tensor(-1))
            if int(lo) < 0:
                raise ValueError("qk_prep: positions must be non-negative")
            table_size = int(hi) + 1
        cos, sin = rope_table(freqs, max(1, table_size))
    return fused_qk_prep(z.contiguous(), gamma.contiguous(), beta.contiguous(), cos, sin, pos, float(eps))


def _same(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{what}: both inputs need one shape, dtype and device, got {tuple(a.shape)} {a.dtype} "
                         f"{a.device} and {tuple(b.shape)} {b.dtype} {b.device}")


def silu_triton(a: Tensor) -> Tensor:
    """silu(a), any shape; fp32/bf16/fp16 on CUDA (or CPU under TRITON_INTERPRET=1)."""
    check_triton_input(a, "silu")
    return fused_silu(a.contiguous())


def swiglu_triton(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b, a and b of one shape and dtype."""
    check_triton_input(a, "swiglu")
    _same(a, b, "swiglu")
    return fused_swiglu(a.contiguous(), b.contiguous())


def silu_gate_triton(out: Tensor, r_raw: Tensor) -> Tensor:
    """out.reshape(r_raw.shape) * silu(r_raw): the gate before wh2 (SwiGLU with the arguments swapped)."""
    check_triton_input(r_raw, "silu_gate")
    gate = out.reshape(r_raw.shape)
    _same(r_raw, gate, "silu_gate")
    return fused_swiglu(r_raw.contiguous(), gate.contiguous())
