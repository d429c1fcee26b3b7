"""Normalised feed-forward network (docs/architecture.md §5) with the two-hop residual."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.fused import silu, swiglu
from .lean import lean_active, prologue_linear, with_dropout
from .norms import LayerNorm


class NormalizedFeedForwardNetwork(nn.Module):
    """out = residual + dropout(FFN(LayerNorm(y))) [* alpha]; residual is the *block input*, not y."""

    def __init__(self, cfg, layer_id: int) -> None:
        super().__init__()
        D, F_ = cfg.model_dim, cfg.ffn_hidden_dim
        self.swiglu, self.hidden_dropout, self.dropout = cfg.swiglu, cfg.hidden_dropout, cfg.dropout
        self.norm = LayerNorm(D, cfg.norm_eps, affine=cfg.norm_affine)
        self.fc1 = nn.Linear(D, F_, bias=False)
        self.fc2 = nn.Linear(F_, D, bias=False)
        self.fc3 = nn.Linear(D, F_, bias=False) if cfg.swiglu else None
        # Layer-scale 0.1 * 0.5^layer_id (reference §1.6), only with rescale_nffn.
        self.layer_id = layer_id
        self.alpha = nn.Parameter(torch.empty(D)) if cfg.rescale_nffn else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.alpha is not None:
            self.alpha.fill_(0.1 * 0.5**self.layer_id)

    def forward(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """y: (B, L, D) output of the MEGA sub-layer; residual: (B, L, D) block input.

        On the lean path (modules/lean.py) the SiLU activations before fc2 are rebuilt in the backward
        from fc1's (and fc3's) outputs instead of being stored."""
        u = self.norm(y)
        p = self.hidden_dropout if self.training else 0.0
        pre = (self.fc1(u),) if self.fc3 is None else (self.fc1(u), self.fc3(u))
        act = silu if self.fc3 is None else swiglu  # fused on CUDA (ops/fused)
        if p > 0.0:
            act = with_dropout(act, p)
        if lean_active() and type(self.fc2) is nn.Linear:  # a wrapped fc2 (PEFT LoRA) runs as a module
            out = prologue_linear(act, pre, self.fc2.weight, stochastic=p > 0.0)
        else:
            out = self.fc2(act(*pre))
        out = F.dropout(out, self.dropout, self.training)
        if self.alpha is not None:
            out = out * self.alpha
        return residual + out

