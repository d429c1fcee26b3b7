"""Weight initialisation of the reference (docs/architecture.md §1.6) for projections and embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def init_linear(layer: nn.Linear, mode: str) -> None:
    """Initialise a projection. 'he': kaiming_normal_(a=sqrt(5), fan_in) = N(0, 1/(3 fan_in))."""
    if mode == "none":
        return
    if mode == "he":
        nn.init.kaiming_normal_(layer.weight, a=math.sqrt(5.0), mode="fan_in")
    elif mode == "bert":
        nn.init.normal_(layer.weight, 0.0, 0.02)
    elif mode == "gaussian":
        std = 1.0 / math.sqrt(layer.in_features)
        nn.init.trunc_normal_(layer.weight, 0.0, std, -3 * std, 3 * std)
    elif mode == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    else:
        raise ValueError(f"unknown init_mode {mode!r}")
    if layer.bias is not None:
        layer.bias.zero_()


@torch.no_grad()
def init_embedding(weight: torch.Tensor, dim: int) -> None:
    """Truncated normal, std 1/sqrt(D), truncated at +-3 std (embedding and output projection)."""
    std = dim**-0.5
    nn.init.trunc_normal_(weight, 0.0, std, -3 * std, 3 * std)
