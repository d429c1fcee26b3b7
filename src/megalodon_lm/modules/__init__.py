"""Modules with parameters: norms, TimestepNorm, CEMA, the MEGA sub-layer and the normalised FFN."""

from .cema import ComplexEMA
from .ffn import NormalizedFeedForwardNetwork
from .mega import MegaLayerState, MovingAverageGatedAttention, StreamInfo
from .norms import LayerNorm, RMSNorm
from .rotary import RotaryEmbedding
from .timestep_norm import TimestepNorm

__all__ = [
    "ComplexEMA",
    "LayerNorm",
    "MegaLayerState",
    "MovingAverageGatedAttention",
    "NormalizedFeedForwardNetwork",
    "RMSNorm",
    "RotaryEmbedding",
    "StreamInfo",
    "TimestepNorm",
]
