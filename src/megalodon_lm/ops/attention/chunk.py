"""Fast chunk attention with a streaming cache, on `scaled_dot_product_attention`.

Training/prefill: (B, L) is folded into (B * L/C, C) chunks (the last one padded at its end; padding
follows every real query, so causality hides it) and one SDPA call with is_causal=True runs them all.

Streaming (docs/algorithms.md §3): a row whose stream is at offset o inside a chunk (o = position mod C)
holds the rotated keys/values of the o tokens of that chunk. A new piece is cut at the chunk boundary:
its first C - o tokens attend to [cache; themselves] with a causal mask aligned bottom-right (query i
sees keys 0 .. o + i; SDPA's is_causal would align top-left), the rest is ordinary chunk attention,
and the tokens of the last, partial chunk become the new cache. Chunks never interact, exactly as in a
whole-sequence forward, so every split gives the same result. Rows at different offsets are processed
in groups of equal offset.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..rope import apply_rope

VALUE_SPLIT_MODES = ("auto", "heads", "loop", "off")


def value_split_mode(device: torch.device) -> str:
    """MEGALODON_ATTN_VALUE_SPLIT: how value heads wider than the query heads reach SDPA.

    heads: one call with the q/k heads repeated once per query-width slice of v, so SDPA's fused (flash)
    kernels apply; loop: one fused call per slice (q k^T recomputed per slice, no repeated q/k);
    off: one call with the wide v, which SDPA serves with its math path (C x C weights stored).
    auto (default): heads on CUDA, where the math path's C x C weights cost hundreds of MB at the 7B shape;
    off on CPU, where the math path computes q k^T once and was measured 10-14% faster per training step
    for `tiny` (64-wide q/k, 384-wide v; docs/performance.md).
    """
    mode = os.environ.get("MEGALODON_ATTN_VALUE_SPLIT", "auto")
    if mode not in VALUE_SPLIT_MODES:
        raise ValueError(f"MEGALODON_ATTN_VALUE_SPLIT must be one of {VALUE_SPLIT_MODES}, got {mode!r}")
    if mode == "auto":
        return "heads" if device.type == "cuda" else "off"
    return mode


def _sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, **kw) -> torch.Tensor:
    """(N, H, L, d) layout; no 1/sqrt(d) scaling (it is folded into the q/k affine)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=1.0, **kw)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, **kw) -> torch.Tensor:
    """(N, L, H, d) layout in and out. SDPA's fused (flash) kernels need v as wide as q (Megalodon's value
    heads are several times wider: 384 vs 64 in `tiny`, 2048 vs 256 at 7B); split modes cut v into
    query-width slices (the last one zero-padded) that share the attention weights: exact, since
    softmax(qk^T) v is linear in v column by column. Dropout would draw different masks per slice, so it
    keeps one call."""
    dz, dv = q.shape[-1], v.shape[-1]
    mode = value_split_mode(q.device) if dv > dz and dropout_p == 0.0 else "off"
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if mode == "off":
        return _sdpa_call(qt, kt, vt, dropout_p, **kw).transpose(1, 2)
    r = -(-dv // dz)
    if r * dz != dv:
        vt = F.pad(vt, (0, r * dz - dv))
    if mode == "loop":
        out = torch.cat([_sdpa_call(qt, kt, vs, 0.0, **kw) for vs in vt.split(dz, dim=-1)], dim=-1)
        return out[..., :dv].transpose(1, 2)
    N, H, Lq, _ = qt.shape
    # (N, H, L, r*dz) -> (N, H*r, L, dz): head h's slices become heads h*r .. h*r+r-1.
    vh = vt.unflatten(-1, (r, dz)).transpose(2, 3).reshape(N, H * r, vt.shape[2], dz)
    out = _sdpa_call(qt.repeat_interleave(r, dim=1), kt.repeat_interleave(r, dim=1), vh, 0.0, **kw)
    out = out.view(N, H, r, Lq, dz).transpose(2, 3).reshape(N, H, Lq, r * dz)[..., :dv]
    return out.transpose(1, 2)


def _attend_from_offset(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor | None,
    cache_v: torch.Tensor | None,
    offset: int,
    chunk_size: int,
    dropout_p: float,
) -> torch.Tensor:
    """Rotated q, k and v (B, L, H, .) of a piece that starts `offset` tokens into a chunk."""
    B, L, H, _ = q.shape
    C = chunk_size
    outs = []
    if offset > 0 and L > 0:
        m = min(L, C - offset)
        n = 0 if cache_k is None else cache_k.shape[1]
        kh = k[:, :m] if n == 0 else torch.cat([cache_k, k[:, :m]], dim=1)
        vh = v[:, :m] if n == 0 else torch.cat([cache_v, v[:, :m]], dim=1)
        if m == 1:  # a single query sees every cached key: no mask needed
            outs.append(_sdpa(q[:, :1], kh, vh, dropout_p))
        else:
            mask = torch.ones(m, n + m, dtype=torch.bool, device=q.device).tril(diagonal=n)
            outs.append(_sdpa(q[:, :m], kh, vh, dropout_p, attn_mask=mask))
        q, k, v = q[:, m:], k[:, m:], v[:, m:]
    Lb = q.shape[1]
    if Lb > 0:
        if Lb <= C:
            outs.append(_sdpa(q, k, v, dropout_p, is_causal=True))
        else:
            nc = -(-Lb // C)
            pad = nc * C - Lb

            def fold(t: torch.Tensor) -> torch.Tensor:
                if pad:  # only a partial last chunk needs a padded copy; otherwise this is a view
                    t = F.pad(t, (0, 0, 0, 0, 0, pad))
                return t.reshape(B * nc, C, H, t.shape[-1])

            o = _sdpa(fold(q), fold(k), fold(v), dropout_p, is_causal=True)
            outs.append(o.reshape(B, nc * C, H, -1)[:, :Lb])
    return torch.cat(outs, dim=1) if len(outs) != 1 else outs[0]


def _tail_cache(
    cache: torch.Tensor | None, new: torch.Tensor, offset: int, lengths: torch.Tensor | None, chunk_size: int
) -> torch.Tensor:
    """Keys or values of each row's last, partial chunk after this piece: (B, r_max, H, d).

    Row b ends at chunk-relative position offset + lengths[b]; it keeps the r_b = end mod C tokens
    before that (zero-filled beyond r_b). Padding after a row's real tokens is never kept.
    """
    B, L, H, d = new.shape
    n = 0 if cache is None else cache.shape[1]
    full = new if n == 0 else torch.cat([cache, new], dim=1)
    base = offset - n  # chunk-relative position of full[:, 0]
    if lengths is None:  # no padding: a plain slice
        return full[:, max(0, full.shape[1] - (offset + L) % chunk_size) :]
    ends = offset + lengths
    starts = torch.maximum((ends // chunk_size) * chunk_size, torch.full_like(ends, base))
    r = ends - starts
    r_max = int(r.max()) if B > 0 else 0
    if r_max == 0:
        return new.new_zeros(B, 0, H, d)
    j = torch.arange(r_max, device=new.device)
    idx = (starts - base).unsqueeze(1) + j  # (B, r_max)
    keep = j.unsqueeze(0) < r.unsqueeze(1)
    idx = torch.where(keep, idx, torch.zeros_like(idx)).clamp(max=full.shape[1] - 1)
    out = full.gather(1, idx.view(B, r_max, 1, 1).expand(B, r_max, H, d))
    return out * keep.view(B, r_max, 1, 1).to(out.dtype)


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    freqs: torch.Tensor,
    chunk_size: int,
    offsets: torch.Tensor | None = None,
    cache_k: torch.Tensor | None = None,
    cache_v: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    need_cache: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Block-diagonal causal attention with chunk-local RoPE and an optional streaming cache.

    q, k: (B, L, H, dz) un-rotated; v: (B, L, H, dv); freqs: (dz/2,) RoPE inverse frequencies.
    offsets: (B,) int64 position of each row inside its current chunk (zeros if None).
    cache_k/cache_v: (B, n, H, dz|dv) rotated keys/values of each row's current chunk; row b uses the
    first offsets[b] of them. lengths: (B,) real tokens per row in this piece (right padding; None =
    no padding).
    cu_seqlens: packed documents over the B*L tokens (ops/varlen.py), each with its own chunk grid and
    RoPE origin; training/prefill only (no offsets, cache, lengths or need_cache).
    Returns out (B, L, H, dv) and, if need_cache, the new cache (B, r, H, .) for the next piece.
    """
    B, L = q.shape[:2]
    C = chunk_size
    if cu_seqlens is not None:
        streaming = cache_k is not None or cache_v is not None or lengths is not None or need_cache
        if streaming or (offsets is not None and bool((offsets != 0).any())):
            raise ValueError("chunk_attention with cu_seqlens takes no offsets, cache, lengths or need_cache")
        from .varlen import chunk_attention_varlen  # varlen imports this module

        return chunk_attention_varlen(q, k, v, freqs, C, cu_seqlens, dropout_p), None, None
    if L == 0:
        return v.new_zeros(B, 0, *v.shape[2:]), cache_k, cache_v
    if offsets is None:
        groups: list[tuple[int, torch.Tensor | None]] = [(0, None)]
    elif B == 1 or bool((offsets == offsets[0]).all()):
        groups = [(int(offsets[0]), None)]
    else:
        groups = [(int(o), (offsets == o).nonzero().view(-1)) for o in torch.unique(offsets).tolist()]
    out = None if len(groups) == 1 else q.new_empty(B, L, v.shape[2], v.shape[3])
    tails: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    Hq = q.shape[2]
    for o, rows in groups:
        def sel(t: torch.Tensor | None, rows=rows) -> torch.Tensor | None:
            return t if (t is None or rows is None) else t[rows]

        pos = (o + torch.arange(L, device=q.device)) % C
        qk = apply_rope(torch.cat([sel(q), sel(k)], dim=2), pos, freqs)  # one rotation for q and k
        qr, kr = qk[:, :, :Hq], qk[:, :, Hq:]
        ck = None if (cache_k is None or o == 0) else sel(cache_k)[:, :o]
        cv = None if (cache_v is None or o == 0) else sel(cache_v)[:, :o]
        og = _attend_from_offset(qr, kr, sel(v), ck, cv, o, C, dropout_p)
        if rows is None:
            out = og
        else:
            out = out.index_copy(0, rows, og)
        if need_cache:
            ln = sel(lengths)
            tails.append((rows, _tail_cache(ck, kr, o, ln, C), _tail_cache(cv, sel(v), o, ln, C)))
    if not need_cache:
        return out, None, None
    if len(tails) == 1:
        return out, tails[0][1], tails[0][2]
    r_max = max(t[1].shape[1] for t in tails)
    new_k = q.new_zeros(B, r_max, k.shape[2], k.shape[3])
    new_v = q.new_zeros(B, r_max, v.shape[2], v.shape[3])
    for rows, tk, tv in tails:
        new_k = new_k.index_copy(0, rows, F.pad(tk, (0, 0, 0, 0, 0, r_max - tk.shape[1])))
        new_v = new_v.index_copy(0, rows, F.pad(tv, (0, 0, 0, 0, 0, r_max - tv.shape[1])))
    return out, new_k, new_v
