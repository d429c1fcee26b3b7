"""Fused element-wise regions of the lean training path (modules/lean.py): q/k preparation, the SiLU gate
before wh2, and the SiLU / SwiGLU activation before fc2.

Each has a pure-PyTorch reference (`reference.py`, the unfused expressions of modules/mega.py and
modules/ffn.py) and Triton kernels with forward and backward (`triton.py`). The functions here dispatch:
MEGALODON_FUSED_IMPL=auto (default) takes Triton for float32/bf16/fp16 CUDA inputs when triton is
installed, the reference elsewhere (so CPU numbers are those of the unfused path); `reference` or
`triton` forces a path (`triton` on CPU tensors needs TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

from torch import Tensor

from .._triton import use_triton_auto
from .reference import qk_prep_reference, silu_gate_reference, silu_reference, swiglu_reference
from .triton import qk_prep_triton, silu_gate_triton, silu_triton, swiglu_triton  # registers the custom ops

FUSED_IMPLS = ("auto", "reference", "triton")

__all__ = [
    "FUSED_IMPLS",
    "fused_impl",
    "qk_prep",
    "qk_prep_reference",
    "qk_prep_triton",
    "silu",
    "silu_gate",
    "silu_gate_reference",
    "silu_gate_triton",
    "silu_reference",
    "silu_triton",
    "swiglu",
    "swiglu_reference",
    "swiglu_triton",
]


def fused_impl(x: Tensor) -> str:
    """'triton' or 'reference': the path the functions below take for input x (MEGALODON_FUSED_IMPL)."""
    impl = os.environ.get("MEGALODON_FUSED_IMPL", "auto")
    if impl not in FUSED_IMPLS:
        raise ValueError(f"MEGALODON_FUSED_IMPL must be one of {FUSED_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if use_triton_auto(x) else "reference"
    return impl


def qk_prep(
    z: Tensor, gamma: Tensor, beta: Tensor, eps: float, freqs: Tensor | None = None,
    positions: Tensor | None = None, table_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """z (B, L, H, dz), gamma/beta (2, H*dz) -> q, k (B, L, H, dz): per-head RMS norm, q/k affine, and RoPE at
    positions (L,) or (B, L) (chunk-local, < table_size; None = no rotation) with freqs (dz/2,)."""
    if fused_impl(z) == "triton":
        return qk_prep_triton(z, gamma, beta, eps, freqs, positions, table_size)
    return qk_prep_reference(z, gamma, beta, eps, freqs, positions)


def silu(a: Tensor) -> Tensor:
    """silu(a): the activation before fc2 of the plain FFN."""
    return silu_triton(a) if fused_impl(a) == "triton" else silu_reference(a)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b: the SwiGLU activation before fc2 (a = fc1 output, b = fc3 output)."""
    return swiglu_triton(a, b) if fused_impl(a) == "triton" else swiglu_reference(a, b)


def silu_gate(out: Tensor, r_raw: Tensor) -> Tensor:
    """out (B, L, H, dv) or (B, L, E) * silu(r_raw) (B, L, E) -> (B, L, E): the gate before wh2."""
    return silu_gate_triton(out, r_raw) if fused_impl(r_raw) == "triton" else silu_gate_reference(out, r_raw)
