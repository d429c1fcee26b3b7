"""Pure tensor functions (no parameters): CEMA, TimestepNorm, RoPE and chunk attention.

Each op has a readable `*_naive` reference (float64-capable) beside its fast paths (PyTorch, and Triton
kernels for CEMA and TimestepNorm on CUDA).
"""

from .attention import chunk_attention, chunk_attention_naive
from .cema import (
    CemaCoefficients,
    cema,
    cema_chunked,
    cema_chunked_fn,
    cema_coefficients,
    cema_fft,
    cema_naive,
    cema_triton,
)
from .rope import apply_rope, rope_inverse_frequencies
from .timestep_norm import timestep_norm, timestep_norm_naive, timestep_norm_prefix, timestep_norm_triton

__all__ = [
    "CemaCoefficients",
    "apply_rope",
    "cema",
    "cema_chunked",
    "cema_chunked_fn",
    "cema_coefficients",
    "cema_fft",
    "cema_naive",
    "cema_triton",
    "chunk_attention",
    "chunk_attention_naive",
    "rope_inverse_frequencies",
    "timestep_norm",
    "timestep_norm_naive",
    "timestep_norm_prefix",
    "timestep_norm_triton",
]
