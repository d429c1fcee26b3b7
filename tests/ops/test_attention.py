"""Chunk attention: SDPA fast path vs the naive reference, block-diagonal causality, streaming cache.

All in float64. Tolerances: outputs rel 1e-12 (streaming and per-row offsets included), gradients rel
1e-10, independence checks (block-diagonal, causality) absolute 1e-13 (a real leak is O(1)).
"""

from __future__ import annotations

import random

import pytest
import torch

from megalodon_lm.ops import apply_rope, chunk_attention, chunk_attention_naive, rope_inverse_frequencies

F64 = torch.float64
C = 4  # chunk size used throughout: small, so that sequences cross several chunk boundaries
H, DZ, DV = 2, 4, 6  # value heads wider than query heads, as in Megalodon
FREQS = rope_inverse_frequencies(DZ, 100.0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    """Equal shapes and rel error <= tol; empty tensors of equal shape count as equal."""
    return a.shape == b.shape and (a.numel() == 0 or rel(a, b) <= tol)


def qkv(B: int, L: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, DZ, generator=g, dtype=F64)
    k = torch.randn(B, L, H, DZ, generator=g, dtype=F64)
    v = torch.randn(B, L, H, DV, generator=g, dtype=F64)
    return q, k, v


LENGTHS = [1, C - 1, C, C + 1, 2 * C + 3]


@pytest.mark.parametrize("L", LENGTHS)
def test_matches_naive(L):
    """No cache, offsets 0: chunk_attention == chunk_attention_naive, rel 1e-12."""
    q, k, v = qkv(2, L, seed=L)
    out, ck, cv = chunk_attention(q, k, v, FREQS, C)
    assert ck is None and cv is None
    assert out.shape == (2, L, H, DV) and out.dtype == F64
    assert rel(out, chunk_attention_naive(q, k, v, FREQS, C)) <= 1e-12


@pytest.mark.parametrize("L", [C + 1, 2 * C + 3])
def test_gradients_match_naive(L):
    """Gradients of a random functional of the output w.r.t. q, k, v: rel 1e-10."""
    q, k, v = qkv(2, L, seed=10 + L)
    w = torch.randn(2, L, H, DV, generator=torch.Generator().manual_seed(11), dtype=F64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        return torch.autograd.grad((out * w).sum(), leaves)

    g = grads(lambda q, k, v: chunk_attention(q, k, v, FREQS, C)[0])
    g_ref = grads(lambda q, k, v: chunk_attention_naive(q, k, v, FREQS, C))
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        assert rel(a, b) <= 1e-10, name


def test_naive_reference_semantics():
    """The naive reference itself: for L <= C it is plain causal softmax(q_rot k_rot^T) v with no scaling,
    positions 0..L-1 (1e-13)."""
    L = C
    q, k, v = qkv(1, L, seed=5)
    pos = torch.arange(L)
    qr, kr = apply_rope(q, pos, FREQS), apply_rope(k, pos, FREQS)
    s = torch.einsum("bihd,bjhd->bhij", qr, kr)
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v)
    assert rel(chunk_attention_naive(q, k, v, FREQS, C), ref) <= 1e-13


def test_block_diagonal():
    """Changing k/v (and q) of chunk 0 leaves the outputs of chunks 1, 2 unchanged (abs 1e-13); positions
    restart at 0 in every chunk, so a chunk's output depends only on its own tokens."""
    L = 3 * C
    q, k, v = qkv(2, L, seed=20)
    out = chunk_attention(q, k, v, FREQS, C)[0]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(21)
    k2[:, :C] = torch.randn(2, C, H, DZ, generator=g, dtype=F64)
    v2[:, :C] = torch.randn(2, C, H, DV, generator=g, dtype=F64)
    q2[:, :C] = torch.randn(2, C, H, DZ, generator=g, dtype=F64)
    out2 = chunk_attention(q2, k2, v2, FREQS, C)[0]
    assert (out2[:, C:] - out[:, C:]).abs().max().item() <= 1e-13
    assert (out2[:, :C] - out[:, :C]).abs().max().item() > 1e-3  # the change is visible where it should be
    # translation: chunk 1 computed alone (from position 0) equals chunk 1 in the full sequence
    alone = chunk_attention(q[:, C : 2 * C], k[:, C : 2 * C], v[:, C : 2 * C], FREQS, C)[0]
    assert rel(alone, out[:, C : 2 * C]) <= 1e-12


@pytest.mark.parametrize("t", [0, 2, C + 1, 2 * C - 1])
def test_causality(t):
    """Changing token t (q, k, v) never changes outputs before t (abs 1e-13); the output at t changes."""
    L = 2 * C + 1
    q, k, v = qkv(1, L, seed=30)
    out = chunk_attention(q, k, v, FREQS, C)[0]
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, t] += 1.0
    k2[:, t] -= 2.0
    v2[:, t] += 3.0
    out2 = chunk_attention(q2, k2, v2, FREQS, C)[0]
    if t > 0:
        assert (out2[:, :t] - out[:, :t]).abs().max().item() <= 1e-13
    assert (out2[:, t] - out[:, t]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------


def _stream(q, k, v, pieces, lengths=None):
    """Feed consecutive pieces with offsets = tokens so far mod C and the returned cache."""
    B = q.shape[0]
    outs, ck, cv, pos = [], None, None, 0
    for n in pieces:
        offsets = torch.full((B,), pos % C, dtype=torch.long)
        o, ck, cv = chunk_attention(
            q[:, pos : pos + n], k[:, pos : pos + n], v[:, pos : pos + n], FREQS, C,
            offsets=offsets, cache_k=ck, cache_v=cv, need_cache=True,
        )
        outs.append(o)
        pos += n
        # the cache holds exactly the tokens of the current, partial chunk: rotated keys and the values
        r = pos % C
        assert ck.shape[1] == r and cv.shape[1] == r, f"cache length after {pos} tokens"
        start = pos - r
        k_rot = apply_rope(k[:, start:pos], torch.arange(r), FREQS)
        assert torch.allclose(ck, k_rot, rtol=0, atol=1e-14) and torch.equal(cv, v[:, start:pos])
    return torch.cat(outs, dim=1)


def _random_splits(L: int, rng: random.Random) -> list[int]:
    pieces, left = [], L
    while left:
        n = min(left, rng.choice([1, 1, 2, 3, C - 1, C, C + 1, 2 * C + 1, 3 * C + 2]))
        pieces.append(n)
        left -= n
    return pieces


@pytest.mark.parametrize("seed", range(6))
def test_streaming_random_splits(seed):
    """Any split of the sequence, fed piece by piece with the cache, equals one call: rel 1e-12."""
    L = 6 * C + 3
    q, k, v = qkv(2, L, seed=40 + seed)
    full = chunk_attention(q, k, v, FREQS, C)[0]
    pieces = _random_splits(L, random.Random(seed))
    assert rel(_stream(q, k, v, pieces), full) <= 1e-12, pieces


@pytest.mark.parametrize(
    "pieces",
    [[1] * (2 * C + 3), [C - 1, 3 * C + 2, 1, 1], [2, 2 * C, C + 1, 2], [C, C, 3, C + 1, 1]],
    ids=["single_tokens", "cross_several", "mid_to_mid", "boundaries"],
)
def test_streaming_fixed_splits(pieces):
    """Hand-picked splits: single tokens, pieces starting mid-chunk and crossing several boundaries."""
    L = sum(pieces)
    q, k, v = qkv(1, L, seed=50 + L)
    full = chunk_attention(q, k, v, FREQS, C)[0]
    assert rel(_stream(q, k, v, pieces), full) <= 1e-12


def test_rows_at_different_offsets():
    """One call with per-row offsets (cache padded per row with garbage beyond each row's offset) equals
    processing each row alone; so do the returned caches (first r_b entries, zeros beyond). rel 1e-12."""
    offsets = torch.tensor([0, 2, 3, 1, 2])
    B, Lp = offsets.numel(), 2 * C + 1
    hist_q, hist_k, hist_v = qkv(B, C + int(offsets.max()), seed=60)
    q, k, v = qkv(B, Lp, seed=61)
    n_max = int(offsets.max())
    cache_k = torch.full((B, n_max, H, DZ), 77.0, dtype=F64)
    cache_v = torch.full((B, n_max, H, DV), -55.0, dtype=F64)
    alone = []
    for b in range(B):
        # history of row b: one full chunk then offsets[b] tokens, so its stream is at offsets[b]
        n_hist = C + int(offsets[b])
        _, ck_b, cv_b = chunk_attention(
            hist_q[b : b + 1, :n_hist], hist_k[b : b + 1, :n_hist], hist_v[b : b + 1, :n_hist], FREQS, C,
            need_cache=True,
        )
        assert ck_b.shape[1] == int(offsets[b])
        cache_k[b, : ck_b.shape[1]] = ck_b[0]
        cache_v[b, : cv_b.shape[1]] = cv_b[0]
        alone.append(chunk_attention(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], FREQS, C,
            offsets=offsets[b : b + 1], cache_k=ck_b, cache_v=cv_b, need_cache=True,
        ))
    out, nk, nv = chunk_attention(q, k, v, FREQS, C, offsets=offsets, cache_k=cache_k, cache_v=cache_v,
                                  need_cache=True)
    for b in range(B):
        o_b, k_b, v_b = alone[b]
        assert rel(out[b : b + 1], o_b) <= 1e-12, f"row {b} output"
        r = k_b.shape[1]
        assert r == (int(offsets[b]) + Lp) % C
        assert same(nk[b : b + 1, :r], k_b) and same(nv[b : b + 1, :r], v_b), f"row {b} cache"
        assert bool((nk[b, r:] == 0).all()) and bool((nv[b, r:] == 0).all())


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_lengths_cache_holds_only_real_tokens(offset):
    """Right padding: the returned cache of each row equals the cache from its unpadded piece alone
    (real tokens only, zeros beyond); outputs at real positions equal the unpadded run; continuing the
    stream from that cache gives the unpadded continuation. Includes a row with 0 real tokens. 1e-12."""
    L = 2 * C + 1
    lengths = torch.tensor([L, L - 3, C - offset, 1, 0])
    B = lengths.numel()
    hist = qkv(B, offset, seed=70)
    q, k, v = qkv(B, L, seed=71)
    nxt = qkv(B, 3, seed=72)
    if offset:
        _, ck0, cv0 = chunk_attention(*hist, FREQS, C, need_cache=True)
    else:
        ck0 = cv0 = None
    offs = torch.full((B,), offset, dtype=torch.long)
    out, ck, cv = chunk_attention(q, k, v, FREQS, C, offsets=offs, cache_k=ck0, cache_v=cv0, lengths=lengths,
                                  need_cache=True)
    for b in range(B):
        n = int(lengths[b])
        sl = slice(b, b + 1)
        c0 = (None, None) if ck0 is None else (ck0[sl], cv0[sl])
        if n > 0:
            o_b, k_b, v_b = chunk_attention(q[sl, :n], k[sl, :n], v[sl, :n], FREQS, C, offsets=offs[sl],
                                            cache_k=c0[0], cache_v=c0[1], need_cache=True)
            assert rel(out[sl, :n], o_b) <= 1e-12, f"row {b} output"
        else:  # nothing real: the cache is the incoming one
            k_b = ck0[sl] if ck0 is not None else torch.zeros(1, 0, H, DZ, dtype=F64)
            v_b = cv0[sl] if cv0 is not None else torch.zeros(1, 0, H, DV, dtype=F64)
        r = (offset + n) % C
        assert k_b.shape[1] == r
        assert same(ck[sl, :r], k_b), f"row {b} cache k"
        assert same(cv[sl, :r], v_b), f"row {b} cache v"
        assert bool((ck[b, r:] == 0).all()) and bool((cv[b, r:] == 0).all()), f"row {b}: pads in cache"
        # continue the stream by 3 tokens from the padded call's cache vs from the unpadded cache
        off_next = torch.tensor([r])
        cont = chunk_attention(nxt[0][sl], nxt[1][sl], nxt[2][sl], FREQS, C, offsets=off_next,
                               cache_k=ck[sl], cache_v=cv[sl])[0]
        ref = chunk_attention(nxt[0][sl], nxt[1][sl], nxt[2][sl], FREQS, C, offsets=off_next,
                              cache_k=k_b if r else None, cache_v=v_b if r else None)[0]
        assert rel(cont, ref) <= 1e-12, f"row {b} continuation"


def test_rows_at_different_offsets_with_lengths():
    """Per-row offsets combined with right padding (one row with 0 real tokens): outputs at real positions
    and the returned per-row caches equal each row processed alone on its unpadded piece. rel 1e-12."""
    offsets = torch.tensor([0, 2, 3, 1, 3])
    lengths = torch.tensor([5, 0, 2, 7, 1])
    B, Lp = offsets.numel(), 7
    hist = qkv(B, C + 3, seed=80)
    q, k, v = qkv(B, Lp, seed=81)
    cache_k = torch.full((B, 3, H, DZ), 9.0, dtype=F64)  # garbage beyond each row's offset
    cache_v = torch.full((B, 3, H, DV), 9.0, dtype=F64)
    alone = []
    for b in range(B):
        n_hist, sl, n = C + int(offsets[b]), slice(b, b + 1), int(lengths[b])
        h_q, h_k, h_v = (t[sl, :n_hist] for t in hist)
        _, kb, vb = chunk_attention(h_q, h_k, h_v, FREQS, C, need_cache=True)
        cache_k[b, : kb.shape[1]] = kb[0]
        cache_v[b, : vb.shape[1]] = vb[0]
        if n:
            alone.append(chunk_attention(q[sl, :n], k[sl, :n], v[sl, :n], FREQS, C, offsets=offsets[sl],
                                         cache_k=kb, cache_v=vb, need_cache=True))
        else:
            alone.append((None, kb, vb))
    out, nk, nv = chunk_attention(q, k, v, FREQS, C, offsets=offsets, cache_k=cache_k, cache_v=cache_v,
                                  lengths=lengths, need_cache=True)
    for b in range(B):
        o_b, k_b, v_b = alone[b]
        n, r = int(lengths[b]), k_b.shape[1]
        assert r == (int(offsets[b]) + n) % C
        if n:
            assert rel(out[b : b + 1, :n], o_b) <= 1e-12, f"row {b} output"
        assert same(nk[b : b + 1, :r], k_b) and same(nv[b : b + 1, :r], v_b), f"row {b} cache"
        assert bool((nk[b, r:] == 0).all()) and bool((nv[b, r:] == 0).all()), f"row {b}: padding in cache"


@pytest.mark.parametrize("mode", ["heads", "loop", "off"])
@pytest.mark.parametrize("dv", [DZ - 1, DZ, 2 * DZ, DV])
def test_value_split_modes(mode, dv, monkeypatch):
    """Every way of feeding wide value heads to SDPA (repeated q/k heads, a loop over slices, one math
    call) gives the naive result, with value widths below, equal to, a multiple of and not a multiple of
    the query width: outputs, gradients and the streaming path (rel 1e-10)."""
    monkeypatch.setenv("MEGALODON_ATTN_VALUE_SPLIT", mode)
    L = 2 * C + 3
    q, k, _ = qkv(2, L, seed=70 + dv)
    v = torch.randn(2, L, H, dv, generator=torch.Generator().manual_seed(71), dtype=F64)
    w = torch.randn(2, L, H, dv, generator=torch.Generator().manual_seed(72), dtype=F64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad((out * w).sum(), leaves))

    got = grads(lambda q, k, v: chunk_attention(q, k, v, FREQS, C)[0])
    ref = grads(lambda q, k, v: chunk_attention_naive(q, k, v, FREQS, C))
    for name, a, b in zip(["out", "q", "k", "v"], got, ref, strict=True):
        assert rel(a, b) <= 1e-10, name
    assert rel(_stream(q, k, v, [3, C, 1, 2, 1]), ref[0]) <= 1e-10


def test_value_split_mode_is_validated(monkeypatch):
    monkeypatch.setenv("MEGALODON_ATTN_VALUE_SPLIT", "fast")
    q, k, v = qkv(1, C, seed=1)
    with pytest.raises(ValueError, match="MEGALODON_ATTN_VALUE_SPLIT"):
        chunk_attention(q, k, v, FREQS, C)
