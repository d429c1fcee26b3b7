"""CEMA (complex exponential moving average) ops: coefficients, naive reference, fast paths, dispatch."""

from __future__ import annotations

import os

import torch

from .._triton import use_triton_auto
from .chunk import cema_chunked
from .chunk_fn import cema_chunked_fn
from .coefficients import CemaCoefficients, cema_coefficients
from .fft import cema_fft
from .naive import cema_naive
from .triton import cema_triton  # registers the custom ops; triton itself is imported on first call
from .varlen import cema_varlen

__all__ = ["CemaCoefficients", "cema", "cema_chunked", "cema_chunked_fn", "cema_coefficients", "cema_fft",
           "cema_naive", "cema_triton", "cema_varlen"]

IMPLS = ("auto", "naive", "chunk", "chunk_fn", "triton")

# Inputs this short run the exact step-by-step recurrence: cheaper than building block operators.
RECURRENT_MAX_LEN = 2


def cema(
    x: torch.Tensor,
    coef: CemaCoefficients,
    h0: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    need_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatching CEMA. x: (B, L, D) -> (y (B, L, D), final state (B, D, N) complex or None).

    MEGALODON_CEMA_IMPL forces a path: naive (the recurrence), chunk (`cema_chunked`, the chunked scan
    differentiated by autograd), chunk_fn (`cema_chunked_fn`, the same scan as one autograd Function with a
    hand-written backward that saves only x, the coefficients, h0 and the block states), triton.
    Default (auto): the Triton scan for float32/bf16/fp16 CUDA inputs when triton imports (decoding
    included: one launch); on other devices the recurrence for L <= 2, else chunk_fn when `lean` (the lean
    training path, modules/lean.py) and gradients are recorded (2-3x faster forward+backward, docs/cema.md),
    and chunk otherwise. Under torch.compile auto
    takes chunk: Dynamo cannot trace chunk_fn's strided in-place writes, and Inductor differentiates chunk.
    cu_seqlens: packed documents over the B*L tokens (ops/varlen.py), each from a zero state; always the
    PyTorch paths (naive when forced, else `cema_varlen`); the state is then the last document's (1, D, N).
    """
    impl = os.environ.get("MEGALODON_CEMA_IMPL", "auto")
    # Under bf16 autocast the block matmuls would run in bf16; CEMA stays in fp32 (reference §2.9).
    with torch.autocast(x.device.type, enabled=False):
        if cu_seqlens is not None:
            return _dispatch_varlen(impl, x, coef, h0, lengths, need_state, cu_seqlens)
        return _dispatch(impl, x, coef, h0, lengths, need_state, lean)


def _dispatch_varlen(
    impl: str, x: torch.Tensor, coef: CemaCoefficients, h0: torch.Tensor | None, lengths: torch.Tensor | None,
    need_state: bool, cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if h0 is not None or lengths is not None:
        raise ValueError("cema with cu_seqlens starts every document from zero: pass neither h0 nor lengths")
    if impl == "naive":
        y, h = cema_naive(x, coef, cu_seqlens=cu_seqlens)
        return y, (h if need_state else None)
    return cema_varlen(x, coef, cu_seqlens, need_state)


def _dispatch(
    impl: str, x: torch.Tensor, coef: CemaCoefficients, h0: torch.Tensor | None, lengths: torch.Tensor | None,
    need_state: bool, lean: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    L = x.shape[1]
    if impl == "triton" or (impl == "auto" and coef.p.dtype == torch.float32 and use_triton_auto(x)):
        return cema_triton(x, coef, h0, lengths, need_state)
    if impl == "naive" or (impl == "auto" and L <= RECURRENT_MAX_LEN):  # also handles L == 0
        valid = None
        if lengths is not None:
            valid = torch.arange(L, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        y, h = cema_naive(x, coef, h0, valid)
        return y, (h if need_state else None)
    if impl not in IMPLS:
        raise ValueError(f"MEGALODON_CEMA_IMPL must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl == "chunk_fn" or (impl == "auto" and lean and _records_grad(x, coef, h0)):
        return cema_chunked_fn(x, coef, h0, lengths, need_state)
    return cema_chunked(x, coef, h0, lengths, need_state)


def _records_grad(x: torch.Tensor, coef: CemaCoefficients, h0: torch.Tensor | None) -> bool:
    """Autograd will record this call (and it is not being traced by torch.compile)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return any(t is not None and t.requires_grad for t in (x, coef.p, coef.log_q, coef.eta, coef.omega, h0))
