"""Pure tensor functions (no parameters): CEMA, TimestepNorm, RoPE and chunk attention.

Each op has a readable `*_naive` reference (float64-capable) beside its fast path.
"""

from .attention import chunk_attention, chunk_attention_naive
from .cema import CemaCoefficients, cema, cema_chunked, cema_coefficients, cema_fft, cema_naive
from .rope import apply_rope, rope_inverse_frequencies
from .timestep_norm import timestep_norm, timestep_norm_naive, timestep_norm_prefix

__all__ = [
    "CemaCoefficients",
    "apply_rope",
    "cema",
    "cema_chunked",
    "cema_coefficients",
    "cema_fft",
    "cema_naive",
    "chunk_attention",
    "chunk_attention_naive",
    "rope_inverse_frequencies",
    "timestep_norm",
    "timestep_norm_naive",
    "timestep_norm_prefix",
]
