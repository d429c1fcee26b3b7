"""The MEGA sub-layer in its Megalodon form (docs/architecture.md §4.1): TimestepNorm -> CEMA -> RMSNorm,
normalised multi-head chunk attention gated by r, and h = W_h1 mx + W_h2 (O * r) added to the input.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import chunk_attention
from .cema import ComplexEMA
from .norms import RMSNorm
from .timestep_norm import NormStats, TimestepNorm


class MegaLayerState(NamedTuple):
    """Streaming state of one MEGA sub-layer."""

    norm: NormStats  # TimestepNorm count (B,), mean (B, G), var (B, G)
    cema: torch.Tensor  # (B, D, N) complex CEMA state
    attn_k: torch.Tensor  # (B, n, H, dz) rotated keys of the current partial chunk
    attn_v: torch.Tensor  # (B, n, H, dv) values of the current partial chunk


class StreamInfo(NamedTuple):
    """Per-call bookkeeping shared by all layers."""

    valid: torch.Tensor | None  # (B, L) bool, False = right padding
    lengths: torch.Tensor  # (B,) real tokens per row in this call
    offsets: torch.Tensor | None  # (B,) position of each row inside its current chunk; None = all 0
    need_state: bool
    cu_seqlens: torch.Tensor | None = None  # (n_docs + 1,) packed documents over the B*L tokens (ops/varlen.py)


class MovingAverageGatedAttention(nn.Module):
    """Parameter names as in the reference: timenorm, cema, rmsnorm, wv, wz, wr, wh1, wh2, gamma, beta."""

    def __init__(self, cfg) -> None:
        super().__init__()
        D, Z, E = cfg.model_dim, cfg.z_dim, cfg.value_dim
        self.num_heads, self.head_dim, self.value_head_dim = cfg.num_heads, cfg.head_dim, cfg.value_head_dim
        self.chunk_size, self.eps = cfg.chunk_size, cfg.norm_eps
        self.hidden_dropout, self.attention_dropout, self.dropout = (
            cfg.hidden_dropout, cfg.attention_dropout, cfg.dropout)
        self.timenorm = TimestepNorm(D, cfg.norm_num_groups, cfg.norm_eps)
        self.cema = ComplexEMA(D, cfg.cema_ndim)
        self.rmsnorm = RMSNorm(D, cfg.norm_eps, affine=cfg.norm_affine)
        self.wv = nn.Linear(D, E)
        self.wz = nn.Linear(D, Z)
        self.wr = nn.Linear(D, E)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(E, D, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, Z))  # q/k plus-one scales (row 0 = query, 1 = key)
        self.beta = nn.Parameter(torch.zeros(2, Z))  # q/k offsets

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """q/k affine offsets start at 0 (sub-modules reset themselves)."""
        self.gamma.zero_()
        self.beta.zero_()

    def forward(
        self, x: torch.Tensor, state: MegaLayerState | None, info: StreamInfo, freqs: torch.Tensor
    ) -> tuple[torch.Tensor, MegaLayerState | None]:
        """x: (B, L, D) -> (x + h, new state if info.need_state)."""
        B, L, _ = x.shape
        H, dz, dv = self.num_heads, self.head_dim, self.value_head_dim
        drop = self.training
        cu = info.cu_seqlens
        xn, norm_stats = self.timenorm(x, None if state is None else state.norm, info.valid, cu)
        if cu is None:
            mx, cema_h = self.cema(xn, None if state is None else state.cema, info.lengths, info.need_state)
        else:
            mx, cema_h = self.cema(xn, need_state=info.need_state, cu_seqlens=cu)
        mx = F.dropout(self.rmsnorm(mx), self.hidden_dropout, drop)

        z = self.wz(mx).view(B, L, H, dz)
        zf = z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
        z = (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.eps)).to(z.dtype)  # per-head RMS
        scale = ((self.gamma + 1) / math.sqrt(dz)).view(2, 1, 1, H, dz)
        offset = self.beta.view(2, 1, 1, H, dz)
        q, k = (z * scale[0] + offset[0]).to(z.dtype), (z * scale[1] + offset[1]).to(z.dtype)
        v = F.silu(self.wv(xn)).view(B, L, H, dv)
        r = F.silu(self.wr(mx))

        out, cache_k, cache_v = chunk_attention(
            q, k, v, freqs, self.chunk_size, info.offsets,
            None if state is None else state.attn_k, None if state is None else state.attn_v,
            None if info.valid is None else info.lengths, self.attention_dropout if drop else 0.0, info.need_state,
            cu_seqlens=info.cu_seqlens,
        )
        h = self.wh1(mx) + self.wh2(F.dropout(out.reshape(B, L, H * dv) * r, self.hidden_dropout, drop))
        y = x + F.dropout(h, self.dropout, drop)
        if not info.need_state:
            return y, None
        return y, MegaLayerState(norm_stats, cema_h, cache_k, cache_v)
