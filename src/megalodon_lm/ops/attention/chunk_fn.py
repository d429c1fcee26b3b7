"""Chunk attention for the lean training path on CPU, with a hand-written backward (modules/lean.py).

`recompute` of the attention region (q/k preparation, SiLU values, chunk attention) replays the whole
forward in the backward: q k^T, the softmax and P V, then differentiates SDPA's math path. This
function keeps only the region's inputs and one log-sum-exp per query row (B * L * H floats), and its
backward rebuilds P = exp(q k^T - lse) from them (the flash-attention backward, Dao et al. 2022), so
P V, the widest product of the region (value heads are 6x wider than q/k heads in `tiny`), is never
repeated. It also skips part of the upper half of each chunk's causal square: the chunk is cut into query
blocks of at least MIN_BLOCK rows and block i multiplies only the keys up to its own end (3/4 of the full
square's work for two blocks, 5/8 for four; narrower blocks lost more to small products than they saved
on the CPU we measured).

Same expression as `chunk_attention` without a cache, padding, dropout or packed documents (the
callers check): logits q.k with no 1/sqrt(d), causal inside a chunk, softmax in float32 or better.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._dtypes import compute_dtype
from .._replay import input_grads, replay_leaves

MIN_BLOCK = 128  # rows per query block: 64-row blocks made the region slower on CPU (tiny, 1K and 2K tokens)


def query_blocks(width: int) -> list[tuple[int, int]]:
    """[start, end) of the query blocks of one chunk: quarters down to MIN_BLOCK rows, else the whole chunk."""
    n = 1
    while n < 4 and width % (2 * n) == 0 and width // (2 * n) >= MIN_BLOCK:
        n *= 2
    b = width // n
    return [(s, s + b) for s in range(0, width, b)]


def _fold(t: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, H, d) -> (B * L/width, H, width, d) contiguous, the last chunk zero-padded at its end."""
    B, L, H, d = t.shape
    nc = -(-L // width)
    if nc * width != L:
        t = torch.nn.functional.pad(t, (0, 0, 0, 0, 0, nc * width - L))
    return t.to(dtype).reshape(B * nc, width, H, d).transpose(1, 2).contiguous()


def _unfold(t: torch.Tensor, B: int, L: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of _fold: (B * nc, H, width, d) -> (B, L, H, d)."""
    N, H, W, d = t.shape
    return t.transpose(1, 2).reshape(B, (N // B) * W, H, d)[:, :L].to(dtype)


def _masked_logits(q: torch.Tensor, k: torch.Tensor, start: int) -> torch.Tensor:
    """q (N, H, b, dz) of query rows start.., k (N, H, e, dz) -> q k^T (N, H, b, e) with -inf above the diagonal."""
    s = torch.matmul(q, k.transpose(-1, -2))
    b, e = s.shape[-2:]
    future = torch.ones(b, e, dtype=torch.bool, device=s.device).triu(diagonal=start + 1)
    return s.masked_fill_(future, float("-inf"))


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded q, k (N, H, W, dz), v (N, H, W, dv) -> causal softmax(q k^T) v (N, H, W, dv), lse (N, H, W)."""
    W = q.shape[2]
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = q.new_empty(q.shape[:3])
    for s, e in query_blocks(W):
        logits = _masked_logits(q[:, :, s:e], k[:, :, :e], s)
        row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out[:, :, s:e] = torch.matmul(logits.sub_(row_lse).exp_(), v[:, :, :e])
        lse[:, :, s:e] = row_lse.squeeze(-1)
    return out, lse


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention_forward for q, k, v (folded layouts); P is rebuilt block by block from lse.

    dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(P * dP)); dQ = dS K; dK = dS^T Q. rowsum(P * dP) equals
    flash-attention's rowsum(dO * O), so the output need not be stored."""
    W = q.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for s, e in query_blocks(W):
        qb, kb, vb, gb = q[:, :, s:e], k[:, :, :e], v[:, :, :e], grad_out[:, :, s:e]
        p = _masked_logits(qb, kb, s).sub_(lse[:, :, s:e].unsqueeze(-1)).exp_()
        dv[:, :, :e] += torch.matmul(p.transpose(-1, -2), gb)
        dp = torch.matmul(gb, vb.transpose(-1, -2))
        pdp = dp.mul_(p)
        ds = pdp.sub_(p.mul_(pdp.sum(-1, keepdim=True)))
        dq[:, :, s:e] = torch.matmul(ds, kb)
        dk[:, :, :e] += torch.matmul(ds.transpose(-1, -2), qb)
    return dq, dk, dv


class _PreparedChunkAttention(torch.autograd.Function):
    """out = chunk attention of prep(*inputs), saving `inputs` and lse only (see `lean_chunk_attention`)."""

    @staticmethod
    def forward(ctx, prep, chunk_size, *inputs):
        with torch.no_grad():
            q, k, v = prep(*inputs)
        B, L = q.shape[:2]
        width = min(chunk_size, L)
        dt = compute_dtype(q)
        out, lse = attention_forward(_fold(q, width, dt), _fold(k, width, dt), _fold(v, width, dt))
        ctx.prep, ctx.width = prep, width
        ctx.save_for_backward(lse, *inputs)
        return _unfold(out, B, L, v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        lse, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        leaves = replay_leaves(inputs, needs)
        with torch.enable_grad():
            q, k, v = ctx.prep(*leaves)
        B, L = q.shape[:2]
        dt, W = lse.dtype, ctx.width
        grads_qkv = attention_backward(_fold(q.detach(), W, dt), _fold(k.detach(), W, dt), _fold(v.detach(), W, dt),
                                       lse, _fold(grad_out, W, dt))
        grads_qkv = [_unfold(g, B, L, t.dtype) for g, t in zip(grads_qkv, (q, k, v), strict=True)]
        return (None, None, *input_grads((q, k, v), leaves, needs, grads_qkv))


def lean_chunk_attention(prep: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]], chunk_size: int,
                         *inputs: torch.Tensor) -> torch.Tensor:
    """Chunk attention of (q, k, v) = prep(*inputs), storing only `inputs` and one float per query row and head.

    prep: element-wise (replayed in the backward) -> rotated q, k (B, L, H, dz) and v (B, L, H, dv), every
    row starting at a chunk boundary with no cache, padding, dropout or packed documents. Returns (B, L, H, dv).
    """
    return _PreparedChunkAttention.apply(prep, chunk_size, *inputs)
