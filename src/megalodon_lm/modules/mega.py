"""The MEGA sub-layer in its Megalodon form (docs/architecture.md §4.1): TimestepNorm -> CEMA -> RMSNorm,
normalised multi-head chunk attention gated by r, and h = W_h1 mx + W_h2 (O * r) added to the input.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import chunk_attention
from ..ops.attention.chunk_fn import lean_chunk_attention
from ..ops.fused import qk_prep, silu, silu_gate
from .cema import ComplexEMA
from .lean import lean_active, prologue_linear, recompute, with_dropout
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
        """x: (B, L, D) -> (x + h, new state if info.need_state).

        With gradients recorded (and MEGALODON_TRAIN_PATH=lean, the default) each region stores only its
        inputs (modules/lean.py): same numbers, 2.3-2.6x fewer saved bytes (docs/performance.md)."""
        lean = lean_active()
        drop = self.training
        run = recompute if lean else (lambda fn, *args: fn(*args))

        def timenorm(t: torch.Tensor):
            return self.timenorm(t, None if state is None else state.norm, info.valid, info.cu_seqlens)

        # Without packed documents the lean TimestepNorm has its own backward (stores x and statistics).
        xn, norm_stats = timenorm(x) if info.cu_seqlens is None else run(timenorm, x)
        if lean and info.cu_seqlens is None:
            # The lean CEMA has its own backward (ops/cema/chunk_fn.py: stores xn and block states).
            c, cema_h = self._cema(xn, state, info)
            mx = recompute(self._rmsnorm_dropout, c)
        else:
            mx, cema_h = run(lambda t: self._cema_rmsnorm(t, state, info), xn)
        z_raw, v_raw, r_raw = self.wz(mx), self.wv(xn), self.wr(mx)
        if lean and self._plain_chunks(x, state, info):
            # Own backward (ops/attention/chunk_fn.py): stores z_raw, v_raw and one lse per row and head.
            out, cache_k, cache_v = self._lean_attention(z_raw, v_raw, freqs), None, None
        else:
            out, cache_k, cache_v = run(lambda z, v: self._attention(z, v, state, info, freqs), z_raw, v_raw)
        p = self.hidden_dropout if drop else 0.0
        gate = silu_gate if p == 0.0 else with_dropout(silu_gate, p)
        # A wrapped projection (PEFT LoRA, quantisation) must run as a module: it is more than its .weight.
        if lean and type(self.wh2) is nn.Linear:
            gated = prologue_linear(gate, (out, r_raw), self.wh2.weight, stochastic=p > 0.0)
        else:
            gated = self.wh2(gate(out, r_raw))
        y = x + F.dropout(self.wh1(mx) + gated, self.dropout, drop)
        if not info.need_state:
            return y, None
        return y, MegaLayerState(norm_stats, cema_h, cache_k, cache_v)

    def _cema(
        self, xn: torch.Tensor, state: MegaLayerState | None, info: StreamInfo
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xn (B, L, D) -> (CEMA(xn) (B, L, D), final CEMA state or None)."""
        if info.cu_seqlens is None:
            return self.cema(xn, None if state is None else state.cema, info.lengths, info.need_state)
        return self.cema(xn, need_state=info.need_state, cu_seqlens=info.cu_seqlens)

    def _rmsnorm_dropout(self, c: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.rmsnorm(c), self.hidden_dropout, self.training)

    def _cema_rmsnorm(
        self, xn: torch.Tensor, state: MegaLayerState | None, info: StreamInfo
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """xn (B, L, D) -> (dropout(RMSNorm(CEMA(xn))) (B, L, D), final CEMA state or None)."""
        c, cema_h = self._cema(xn, state, info)
        return self._rmsnorm_dropout(c), cema_h

    def _plain_chunks(self, x: torch.Tensor, state: MegaLayerState | None, info: StreamInfo) -> bool:
        """True when attention is over whole chunks from position 0 with nothing else to handle (the usual
        training step on CPU): no cache, offsets, padding, packed documents, attention dropout or state to
        return. On CUDA SDPA's fused kernels win; under autocast the plain expressions keep its casts."""
        return (x.device.type == "cpu" and state is None and info.offsets is None and info.valid is None
                and info.cu_seqlens is None and not info.need_state
                and not (self.training and self.attention_dropout > 0.0) and not torch.is_autocast_enabled("cpu"))

    def _lean_attention(self, z_raw: torch.Tensor, v_raw: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """wz(mx) (B, L, Z), wv(xn) (B, L, E) -> attention output (B, L, H, dv), as `_attention` computes it."""
        B, L, _ = z_raw.shape
        H, dz, dv, C = self.num_heads, self.head_dim, self.value_head_dim, self.chunk_size
        positions = torch.arange(L, device=z_raw.device) % C

        def prep(z: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
            q, k = qk_prep(z.view(B, L, H, dz), gamma, beta, self.eps, freqs, positions)
            return q, k, silu(v).view(B, L, H, dv)

        return lean_chunk_attention(prep, C, z_raw, v_raw, self.gamma, self.beta)

    def _attention(
        self, z_raw: torch.Tensor, v_raw: torch.Tensor, state: MegaLayerState | None, info: StreamInfo,
        freqs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """wz(mx) (B, L, Z), wv(xn) (B, L, E) -> attention output (B, L, H, dv) and the new key/value cache:
        per-head RMS-normalised q/k with their affine, SiLU values, chunk attention."""
        B, L, _ = z_raw.shape
        H, dz, dv = self.num_heads, self.head_dim, self.value_head_dim
        q, k = qk_prep(z_raw.view(B, L, H, dz), self.gamma, self.beta, self.eps)  # fused on CUDA (ops/fused)
        v = silu(v_raw).view(B, L, H, dv)
        return chunk_attention(
            q, k, v, freqs, self.chunk_size, info.offsets,
            None if state is None else state.attn_k, None if state is None else state.attn_v,
            None if info.valid is None else info.lengths, self.attention_dropout if self.training else 0.0,
            info.need_state, cu_seqlens=info.cu_seqlens,
        )
