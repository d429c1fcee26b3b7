"""Index bookkeeping for packed variable-length input (`cu_seqlens`, the FlashAttention varlen convention).

A (B, L) batch with `cu_seqlens` is read as one stream of B*L tokens (row-major); `cu_seqlens` (n_docs + 1,)
holds the cumulative document lengths over that stream: document i is tokens [cu[i], cu[i+1]). A document
may continue from the end of one row into the next (rows are just a reshape of the stream); callers that want
documents inside rows put every row start b*L in `cu_seqlens`. Every document is processed as if alone.

The ops that need a per-document grid scatter the stream into padded layouts whose padding always sits
after the real tokens it pads, so causal operators never see it:
- `padded_layout` (CEMA blocks): each document starts at a multiple of `block` and occupies ceil(len/block)
  whole blocks (padding < block per document).
- `chunk_buckets` (attention chunks): each document is cut into its chunks (pieces of C tokens from its
  start, the last one shorter); full pieces are laid out as C-slot chunks, a short piece of l tokens in a
  slot of the next power of two >= l (at least `min_size`), grouped by slot size. Padding is < l per short
  piece, so many short documents cost about their own length, not C each.
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
    """Where each stream token lives in the block-aligned padded layout: `rows` rows of padded_len/rows slots."""

    slot: torch.Tensor  # (total,) long: padded index of each token (row-major over the rows)
    padded_len: int  # all slots: rows * blocks per row * block
    block: int
    block_start: torch.Tensor  # (padded_len / block,) bool: the block is a document's first block
    last_slot: int  # padded index of the stream's last token (the end of the last document)
    rows: int  # 1, or the input's rows when every row starts a document (see `padded_layout`)


def padded_layout(cu_seqlens: torch.Tensor, total: int, block: int, rows: int = 1) -> PaddedLayout:
    """Each document padded at its end to whole blocks of `block` tokens.

    The stream is `rows` rows of total/rows tokens. If every row starts a document, each row keeps its own
    padded row (all padded to the longest), so a scan over blocks runs per row as in the unpacked input;
    otherwise (a document crosses a row boundary) the layout is one row. Two host syncs.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    idx = doc_index(cu_seqlens, total)
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    nblk = (lens + block - 1) // block  # blocks per document
    first_blk = torch.cumsum(nblk, 0) - nblk  # first block of each document in a single-row layout
    row_len = total // rows if rows > 1 and total % rows == 0 else 0
    at_row_start = (cu[:-1] % row_len == 0) if row_len else None
    if at_row_start is not None and int(at_row_start.sum()) == rows:  # every row start begins a document
        row = cu[:-1] // row_len
        first_blk = first_blk - first_blk[at_row_start][row]  # block index inside the document's row
        per_row = torch.zeros(rows, dtype=torch.long, device=cu.device).index_add_(0, row, nblk)
        n_row = int(per_row.max())
        first_blk = first_blk + row * n_row
        n_blocks = rows * n_row
    else:
        rows, n_blocks = 1, int(nblk.sum())
    slot = first_blk[idx.doc] * block + idx.pos
    block_start = torch.zeros(n_blocks, dtype=torch.bool, device=cu.device)
    block_start[first_blk] = True
    return PaddedLayout(slot, n_blocks * block, block, block_start, int(slot[-1]), rows)


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


class PieceBucket(NamedTuple):
    """The attention pieces padded to `size` slots each, laid out one after another."""

    size: int  # S: slots per piece (C for full pieces; a power of two < C for short ones)
    src: torch.Tensor  # (n_pieces * S,) long: the stream token in each slot (padding slots hold token 0)


class ChunkLayout(NamedTuple):
    """All buckets, and where each stream token lands in the concatenation of their layouts."""

    buckets: list[PieceBucket]
    slot: torch.Tensor  # (total,) long; slot - bucket offset = chunk-local position mod S


def chunk_buckets(cu_seqlens: torch.Tensor, total: int, chunk_size: int, min_size: int = 16) -> ChunkLayout:
    """Every document's attention chunks, grouped by padded size (see the module docstring); 3 host syncs.

    Padding slots repeat token 0 instead of holding zeros: they are keys after every real query of their
    chunk (hidden by causality) and queries whose outputs are dropped, so their content never matters,
    and one gather builds each layout.
    """
    C = chunk_size
    idx = doc_index(cu_seqlens, total)
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    n_per_doc = (lens + C - 1) // C
    first = torch.cumsum(n_per_doc, 0) - n_per_doc  # first piece of each document
    piece = first[idx.doc] + idx.pos // C  # (total,) piece of each token
    n_pieces = int(n_per_doc.sum())
    piece_doc = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), n_per_doc,
                                        output_size=n_pieces)
    piece_len = (lens[piece_doc] - (torch.arange(n_pieces, device=cu.device) - first[piece_doc]) * C).clamp(max=C)
    pow2 = torch.exp2(torch.log2(piece_len.double()).ceil()).long()  # exact for these small integers
    size = torch.where(piece_len == C, C, pow2.clamp(min=min_size).clamp(max=C))
    counts = torch.bincount(size, minlength=C + 1).tolist()
    piece_base = torch.zeros(n_pieces, dtype=torch.long, device=cu.device)  # first slot of each piece
    buckets, offset = [], 0
    for S in (s for s in range(C + 1) if counts[s]):
        in_bucket = size == S
        rank = torch.cumsum(in_bucket, 0) - 1  # index of each piece among this bucket's pieces
        piece_base = torch.where(in_bucket, offset + rank * S, piece_base)
        buckets.append(PieceBucket(S, torch.zeros(counts[S] * S, dtype=torch.long, device=cu.device)))
        offset += counts[S] * S
    slot = piece_base[piece] + idx.pos % C
    all_src = torch.zeros(offset, dtype=torch.long, device=cu.device).index_copy_(
        0, slot, torch.arange(total, device=cu.device))
    start = 0
    for b in buckets:
        b.src.copy_(all_src[start : start + b.src.numel()])
        start += b.src.numel()
    return ChunkLayout(buckets, slot)
