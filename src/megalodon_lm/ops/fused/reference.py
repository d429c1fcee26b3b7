"""Pure-PyTorch references of the lean path's element-wise regions (plain autograd, any dtype, any device).

They are written as the regions of modules/mega.py and modules/ffn.py are, operation for operation, so
on the CPU (where `ops.fused` dispatches here) they give bitwise the numbers of the unfused path. The
Triton kernels (`triton.py`) are tested against them in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..rope import apply_rope


def qk_prep_reference(
    z: Tensor, gamma: Tensor, beta: Tensor, eps: float, freqs: Tensor | None = None,
    positions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Queries and keys from wz's output: per-head RMS normalisation, the q/k affine, interleaved RoPE.

    z: (B, L, H, dz); gamma, beta: (2, H*dz) (row 0 = query, 1 = key); freqs: (dz/2,) RoPE inverse
    frequencies; positions: (L,) or (B, L) integer chunk-local positions (None = no rotation).
    q = rope(z_hat (gamma[0] + 1) / sqrt(dz) + beta[0]), k likewise with row 1; z_hat = z / rms(z) per head
    (float32 statistics for bf16/fp16 z). Returns q, k (B, L, H, dz) in z's dtype.
    """
    B, L, H, dz = z.shape
    zf = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
    zn = (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps)).to(z.dtype)
    scale = ((gamma + 1) / math.sqrt(dz)).view(2, 1, 1, H, dz)
    offset = beta.view(2, 1, 1, H, dz)
    q, k = (zn * scale[0] + offset[0]).to(z.dtype), (zn * scale[1] + offset[1]).to(z.dtype)
    if positions is None:
        return q, k
    qk = apply_rope(torch.cat([q, k], dim=2), positions, freqs)  # one rotation for both, as chunk_attention
    return qk[:, :, :H], qk[:, :, H:]


def silu_reference(a: Tensor) -> Tensor:
    """SiLU before fc2 (plain FFN): a (B, L, F) -> silu(a)."""
    return F.silu(a)


def swiglu_reference(a: Tensor, b: Tensor) -> Tensor:
    """SwiGLU before fc2: fc1 output a, fc3 output b (B, L, F) -> silu(a) * b."""
    return F.silu(a) * b


def silu_gate_reference(out: Tensor, r_raw: Tensor) -> Tensor:
    """Attention output (B, L, H, dv) or (B, L, E) gated by silu(wr(mx)) r_raw (B, L, E) -> (B, L, E)."""
    return out.reshape(r_raw.shape) * F.silu(r_raw)
