"""Dtype policy shared by the ops: what precision the sequence operators compute in."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (testing), else float32.

    Low-precision activations (bf16/fp16) and parameters are upcast: CEMA coefficients, TimestepNorm
    statistics and RoPE angles always run in at least float32, as the reference does.
    """
    if any(t is not None and t.dtype in (torch.float64, torch.complex128) for t in tensors):
        return torch.float64
    return torch.float32


def complex_dtype(real: torch.dtype) -> torch.dtype:
    """complex128 for float64, complex64 otherwise."""
    return torch.complex128 if real == torch.float64 else torch.complex64
