"""Index bookkeeping for packed variable-length input (`cu_seqlens`, the FlashAttention varlen convention).

A (B, L) batch with `cu_seqlens` is read as one stream of B*L tokens (row-major); `cu_seqlens` (n_docs + 1,)
holds the cumulative document lengths over that stream: document i is tokens [cu[i], cu[i+1]). A document
may continue from the end of one row into the next (rows are just a reshape of the stream); callers that want
documents inside rows put every row start b*L in `cu_seqlens`. Every document is processed as if alone.

The ops that need a per-document grid (CEMA blocks, attention chunks) scatter the stream into a padded
layout where each document starts at a multiple of `block` and occupies ceil(len/block) whole blocks; the
padding (< block per document) sits after the document's last token, so causal operators never see it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """ValueError unless cu_seqlens is a 1-D int32/int64 tensor 0 = c_0 < c_1 < ... < c_n = total, n >= 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with n_docs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the token count {total}, got {first} .. {last}")
    if not bool((cu_seqlens[1:] > cu_seqlens[:-1]).all()):
        raise ValueError("cu_seqlens must be strictly increasing (every document has at least one token)")


class DocIndex(NamedTuple):
    """Per-token document bookkeeping of a stream of `total` tokens."""

    doc: torch.Tensor  # (total,) long: document of each token
    start: torch.Tensor  # (total,) long: stream index of the first token of that document
    pos: torch.Tensor  # (total,) long: position inside the document (0 at its first token)


def doc_index(cu_seqlens: torch.Tensor, total: int) -> DocIndex:
    """Validated per-token document ids, document starts and in-document positions."""
    check_cu_seqlens(cu_seqlens, total)
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    doc = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=total)
    start = cu[:-1][doc]
    return DocIndex(doc, start, torch.arange(total, device=cu.device) - start)


class PaddedLayout(NamedTuple):
    """Where each stream token lives in the block-aligned padded layout of `padded_len` slots."""

    slot: torch.Tensor  # (total,) long: padded index of each token
    padded_len: int  # P = sum over documents of ceil(len / block) * block
    block: int
    block_start: torch.Tensor  # (P / block,) bool: the block is a document's first block
    last_slot: int  # padded index of the stream's last token (the end of the last document)


def padded_layout(cu_seqlens: torch.Tensor, total: int, block: int) -> PaddedLayout:
    """Each document padded at its end to whole blocks of `block` tokens; one host sync (for P)."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    idx = doc_index(cu_seqlens, total)
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    nblk = (lens + block - 1) // block  # blocks per document
    blk_end = torch.cumsum(nblk, 0)
    n_blocks = int(blk_end[-1])
    pad_start = (blk_end - nblk) * block  # padded index of each document's first token
    slot = pad_start[idx.doc] + idx.pos
    block_start = torch.zeros(n_blocks, dtype=torch.bool, device=cu.device)
    block_start[blk_end - nblk] = True
    return PaddedLayout(slot, n_blocks * block, block, block_start, int(slot[-1]))


def to_padded(x: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """x: (total, ...) -> (P, ...) with zeros in the padding slots (differentiable)."""
    out = x.new_zeros(layout.padded_len, *x.shape[1:])
    return out.index_copy(0, layout.slot, x)


def from_padded(y: torch.Tensor, layout: PaddedLayout) -> torch.Tensor:
    """y: (P, ...) -> (total, ...): the real tokens, in stream order (differentiable)."""
    return y.index_select(0, layout.slot)


def rope_positions(cu_seqlens: torch.Tensor, total: int, chunk_size: int) -> torch.Tensor:
    """(total,) long chunk-local RoPE positions: restart at 0 at every document start and every C tokens after."""
    return doc_index(cu_seqlens, total).pos % chunk_size
