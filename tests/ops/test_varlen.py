"""Packed variable-length input (cu_seqlens): every op equals running each document alone.

The references here are per-document loops over the ops' plain (non-packed) naive paths, in float64:
outputs, final states and the gradients of every input and parameter. Errors are ||a-b||/||b||.
"""

from __future__ import annotations

import pytest
import torch

from megalodon_lm.ops.attention import chunk_attention, chunk_attention_naive
from megalodon_lm.ops.cema import cema, cema_coefficients, cema_naive, cema_varlen
from megalodon_lm.ops.rope import rope_inverse_frequencies
from megalodon_lm.ops.timestep_norm import timestep_norm, timestep_norm_naive, timestep_norm_prefix
from megalodon_lm.ops.varlen import check_cu_seqlens, chunk_buckets, padded_layout, rope_positions

F64 = torch.float64
TOL = 1e-12  # float64: only rounding differs between the paths


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().norm() / b.abs().norm())


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def split_docs(t: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """(B, L, ...) -> the documents of the flattened stream, each (1, len, ...)."""
    stream = t.reshape(1, -1, *t.shape[2:])
    return list(torch.split(stream, lengths, dim=1))


def outputs_and_grads(fn, leaves: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """fn() -> tuple of tensors; returns them plus d(sum_i <out_i, g_i>)/d leaves for random g_i."""
    for t in leaves:
        t.grad = None
    outs = [o for o in fn() if o is not None]
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for o in outs:
        w = torch.randn(o.shape, generator=g, dtype=F64)
        loss = loss + ((o.real * w).sum() + (o.imag * w).sum() if o.is_complex() else (o * w).sum())
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + list(grads)


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = TOL) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape, (i, a.shape, b.shape)
        assert rel_err(a, b) < tol, (i, rel_err(a, b))


# ------------------------------------------------------------------------------------------------ bookkeeping
@pytest.mark.parametrize("cu, total, match", [
    ([0.0, 4.0], 4, "int32 or int64"),
    ([1, 4], 4, "start at 0"),
    ([0, 3], 4, "end at the token count"),
    ([0, 2, 2, 4], 4, "strictly increasing"),
    ([0, 3, 2, 4], 4, "strictly increasing"),
    ([0], 0, "n_docs"),
    ([[0, 4]], 4, "1-D"),
])
def test_cu_seqlens_errors(cu, total, match):
    with pytest.raises(ValueError, match=match):
        check_cu_seqlens(torch.tensor(cu), total)


def test_cu_seqlens_must_be_a_tensor():
    with pytest.raises(ValueError, match="torch.Tensor"):
        check_cu_seqlens([0, 4], 4)


def test_padded_layout_and_rope_positions():
    lengths = [3, 4, 1, 9]
    lay = padded_layout(cu_of(lengths), 17, 4)
    # Blocks: doc0 [0,4), doc1 [4,8), doc2 [8,12), doc3 [12,24): 6 blocks.
    assert lay.padded_len == 24 and lay.last_slot == 20
    assert lay.slot.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    assert lay.block_start.tolist() == [True, True, True, True, False, False]
    assert lay.rows == 1 and padded_layout(cu_of(lengths), 17, 4, rows=17).rows == 1  # documents cross rows
    pos = rope_positions(cu_of(lengths), 17, 4)
    assert pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0, 1, 2, 3, 0, 1, 2, 3, 0]


def test_padded_layout_keeps_rows_that_start_documents():
    # Rows of 10 tokens: [3, 7 | 1, 9 | 10]; blocks of 4 -> rows need 3, 4 and 3 blocks, all padded to 4.
    lay = padded_layout(cu_of([3, 7, 1, 9, 10]), 30, 4, rows=3)
    assert lay.rows == 3 and lay.padded_len == 48
    assert lay.slot[:10].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert lay.slot[10:20].tolist() == [16, 20, 21, 22, 23, 24, 25, 26, 27, 28]
    assert lay.slot[20:].tolist() == list(range(32, 42)) and lay.last_slot == 41
    assert lay.block_start.view(3, 4).tolist() == [[True, True, False, False], [True, True, False, False],
                                                   [True, False, False, False]]


# ------------------------------------------------------------------------------------------------ CEMA
D, N = 6, 4


def cema_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(D, N, 1), (D, N, 1), (D, 1, 1), (D, N, 2), (D, 1)]
    return [(torch.randn(s, generator=g, dtype=F64) * 0.5).requires_grad_() for s in shapes]


# Block size T = 8 in the direct calls: documents of T-1, T, T+1 and 1 tokens, a long one crossing many blocks.
CEMA_CASES = [
    (2, [7, 8, 9, 1, 15]),  # 40 tokens; 20 per row: the 9-token document crosses the row boundary
    (1, [1] * 5 + [30] + [1] * 5),  # many 1-token documents around a long one
    (3, [17, 1, 6]),
    (1, [24]),  # one document = the plain path
    (1, [31, 32, 33, 1, 3]),  # around a 32-token block
    (3, [7, 13, 1, 19, 20]),  # every 20-token row starts a document: the layout keeps the rows
    (2, [20, 5, 1, 14]),
]


@pytest.mark.parametrize("B, lengths", CEMA_CASES)
@pytest.mark.parametrize("block", [8, 32, None])
def test_cema_packed_equals_documents_alone(B, lengths, block):
    total = sum(lengths)
    params = cema_params()
    x = torch.randn(B, total // B, D, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    leaves = [x, *params]
    cu = cu_of(lengths)

    def packed():
        return cema_varlen(x, cema_coefficients(*params), cu, need_state=True, block_size=block)

    def alone():
        coef = cema_coefficients(*params)
        parts = [cema_naive(d, coef) for d in split_docs(x, lengths)]
        return torch.cat([y for y, _ in parts], 1).view_as(x), parts[-1][1]

    want = outputs_and_grads(alone, leaves)
    assert_all_close(outputs_and_grads(packed, leaves), want)
    # The naive path's own cu_seqlens support, and the dispatcher.
    coef_fn = lambda: cema_coefficients(*params)  # noqa: E731
    assert_all_close(outputs_and_grads(lambda: cema_naive(x, coef_fn(), cu_seqlens=cu), leaves), want)
    assert_all_close(outputs_and_grads(lambda: cema(x, coef_fn(), need_state=True, cu_seqlens=cu), leaves), want)


def test_cema_dispatch_without_state_and_forced_naive(monkeypatch):
    params = cema_params(3)
    coef = cema_coefficients(*params)
    x = torch.randn(2, 33, D, dtype=F64)
    cu = cu_of([31, 32, 3])
    y, h = cema(x, coef, cu_seqlens=cu)
    assert h is None
    monkeypatch.setenv("MEGALODON_CEMA_IMPL", "naive")
    y_naive, h_naive = cema(x, coef, cu_seqlens=cu)
    assert h_naive is None and rel_err(y, y_naive) < TOL


def test_cema_varlen_errors():
    coef = cema_coefficients(*cema_params())
    x = torch.randn(1, 5, D, dtype=F64)
    h0 = torch.zeros(1, D, N, dtype=torch.complex128)
    with pytest.raises(ValueError, match="neither h0"):
        cema(x, coef, h0=h0, cu_seqlens=cu_of([2, 3]))
    with pytest.raises(ValueError, match="neither h0"):
        cema_naive(x, coef, h0=h0, cu_seqlens=cu_of([2, 3]))
    with pytest.raises(ValueError, match="end at the token count"):
        cema(x, coef, cu_seqlens=cu_of([2, 2]))


# ------------------------------------------------------------------------------------------------ TimestepNorm
G = 3


@pytest.mark.parametrize("B, lengths", [(2, [7, 8, 9, 1, 15]), (1, [1, 1, 2, 1, 5]), (1, [12])])
@pytest.mark.parametrize("prior_count", [0, 3])
def test_timestep_norm_packed_equals_documents_alone(B, lengths, prior_count):
    total = sum(lengths)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(B, total // B, 2 * G, dtype=F64, generator=g) * 2 + 1).requires_grad_()
    weight = (torch.randn(2 * G, dtype=F64, generator=g) * 0.3).requires_grad_()
    bias = torch.randn(2 * G, dtype=F64, generator=g).requires_grad_()
    count = torch.tensor([prior_count])
    mean, var = torch.randn(1, G, dtype=F64, generator=g), torch.rand(1, G, dtype=F64, generator=g) + 0.5
    leaves = [x, weight, bias]
    cu = cu_of(lengths)

    def alone():
        parts = [timestep_norm_naive(d, weight, bias, G, 1e-5, count, mean, var) for d in split_docs(x, lengths)]
        _, c, m, v = parts[-1]
        return torch.cat([p[0] for p in parts], 1).view_as(x), c.double(), m, v

    def run(fn):
        y, c, m, v = fn(x, weight, bias, G, 1e-5, count, mean, var, None, cu)
        return y, c.double(), m, v

    want = outputs_and_grads(alone, leaves)
    for fn in (timestep_norm_prefix, timestep_norm_naive, timestep_norm):
        assert_all_close(outputs_and_grads(lambda fn=fn: run(fn), leaves), want)


def test_timestep_norm_packed_float32_offset_data():
    """fp32 data of mean 50, 300 documents in 6,000 tokens: the segmented float64 sums stay accurate."""
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 40, (300,), generator=g).tolist()
    total = sum(lengths)
    x = torch.randn(1, total, 2 * G, generator=g) + 50.0
    w, b = torch.zeros(2 * G), torch.zeros(2 * G)
    count, mean, var = torch.zeros(1, dtype=torch.long), torch.zeros(1, G), torch.ones(1, G)
    y = timestep_norm(x, w, b, G, 1e-5, count, mean, var, cu_seqlens=cu_of(lengths))[0]
    ref = torch.cat([timestep_norm_prefix(d.double(), w.double(), b.double(), G, 1e-5, count, mean.double(),
                                          var.double())[0] for d in split_docs(x, lengths)], 1)
    assert rel_err(y.double(), ref) < 1e-5


def test_timestep_norm_varlen_errors():
    x = torch.randn(2, 4, 2 * G)
    w = torch.zeros(2 * G)
    count, mean, var = torch.zeros(2, dtype=torch.long), torch.zeros(2, G), torch.ones(2, G)
    with pytest.raises(ValueError, match="one start state"):
        timestep_norm(x, w, w, G, 1e-5, count, mean, var, cu_seqlens=cu_of([3, 5]))
    with pytest.raises(ValueError, match="no padding mask"):
        timestep_norm(x, w, w, G, 1e-5, count[:1], mean[:1], var[:1], torch.ones(2, 4, dtype=torch.bool),
                      cu_of([3, 5]))


# ------------------------------------------------------------------------------------------------ attention
C = 8
H, DZ, DV = 2, 8, 6


# Documents of C-1, C, C+1, 1 and 2C+3 tokens; rows of 25 or 50 tokens put the row's own chunk grid
# (multiples of 8 from each row start) across the documents' grids. With C = 64 the short last pieces
# go to 16- and 32-slot chunks (pieces of 1, 15, 16, 17, 33, 63 tokens; 65 = a full chunk + 1).
ATTN_CASES = [
    (2, [7, 8, 9, 1, 19, 6], 8),
    (1, [1, 1, 3, 2, 1, 1, 1], 8),
    (5, [13, 3, 26, 8], 8),
    (1, [17], 8),
    (3, [1, 15, 16, 17, 33, 63, 64, 65, 149], 64),
]


def test_chunk_buckets():
    # Pieces with min_size 2: 1 and 1 -> 2 slots; 15 -> 16; 17 -> 32; 33, 64, 64 -> 64 (65 tokens = 64 + 1).
    layout = chunk_buckets(cu_of([1, 15, 17, 33, 64, 65]), 195, 64, min_size=2)
    assert [(b.size, b.src.numel()) for b in layout.buckets] == [(2, 4), (16, 16), (32, 32), (64, 192)]
    assert layout.slot[:3].tolist() == [0, 4, 5]  # the 1-token document, then the 15-token one
    assert layout.slot[-2:].tolist() == [4 + 16 + 32 + 2 * 64 + 63, 2]  # the 65-token document's last two
    src = torch.cat([b.src for b in layout.buckets])
    assert torch.equal(src[layout.slot], torch.arange(195))
    assert sorted(layout.slot.tolist()) == sorted(set(layout.slot.tolist()))
    default = chunk_buckets(cu_of([1, 15, 17, 33, 64, 65]), 195, 64)
    assert [(b.size, b.src.numel()) for b in default.buckets] == [(16, 48), (32, 32), (64, 192)]


@pytest.mark.parametrize("B, lengths, C", ATTN_CASES)
def test_attention_packed_equals_documents_alone(B, lengths, C):
    total = sum(lengths)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, total // B, H, DZ, dtype=F64, generator=g).requires_grad_()
    k = torch.randn(B, total // B, H, DZ, dtype=F64, generator=g).requires_grad_()
    v = torch.randn(B, total // B, H, DV, dtype=F64, generator=g).requires_grad_()
    freqs = rope_inverse_frequencies(DZ, 100.0).double()
    cu = cu_of(lengths).long()

    def alone():
        docs = zip(split_docs(q, lengths), split_docs(k, lengths), split_docs(v, lengths), strict=True)
        return (torch.cat([chunk_attention_naive(a, b, c, freqs, C) for a, b, c in docs], 1).view_as(v),)

    want = outputs_and_grads(alone, [q, k, v])
    got = outputs_and_grads(lambda: chunk_attention(q, k, v, freqs, C, cu_seqlens=cu)[:1], [q, k, v])
    assert_all_close(got, want)
    naive = outputs_and_grads(lambda: (chunk_attention_naive(q, k, v, freqs, C, cu_seqlens=cu),), [q, k, v])
    assert_all_close(naive, want)


def test_attention_packed_differs_from_unpacked():
    """The test above can fail: without cu_seqlens the documents do see each other."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 12, H, DZ, dtype=F64, generator=g) for _ in range(3))
    freqs = rope_inverse_frequencies(DZ, 100.0).double()
    packed = chunk_attention(q, k, v, freqs, C, cu_seqlens=cu_of([5, 7]))[0]
    plain = chunk_attention(q, k, v, freqs, C)[0]
    assert rel_err(packed[:, :5], plain[:, :5]) < TOL  # the first document starts where the row does
    assert rel_err(packed[:, 5:], plain[:, 5:]) > 1e-3


def test_attention_varlen_errors():
    q = torch.randn(1, 6, H, DZ)
    freqs = rope_inverse_frequencies(DZ, 100.0)
    cu = cu_of([2, 4])
    with pytest.raises(ValueError, match="cu_seqlens takes no offsets"):
        chunk_attention(q, q, q, freqs, C, offsets=torch.tensor([1]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens takes no offsets"):
        chunk_attention(q, q, q, freqs, C, need_cache=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match="strictly increasing"):
        chunk_attention(q, q, q, freqs, C, cu_seqlens=torch.tensor([0, 0, 6]))
