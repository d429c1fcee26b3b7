"""Exact streaming: any split of a sequence into pieces, with the state carried, equals one forward."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megalodon_lm import StreamState

from .helpers import CHUNK, nano_model, random_ids, rel_err

SEQ = 70
BATCH = 2


@functools.cache
def _setup():
    model = nano_model(seed=0)
    ids = random_ids(BATCH, SEQ, seed=1)
    with torch.no_grad():
        full = model(ids).logits
    return model, ids, full


def _stream(model, ids, cuts, state=None):
    """Feed ids cut at `cuts`; returns (concatenated logits, final state, states after each piece)."""
    bounds = [0, *cuts, ids.shape[1]]
    logits, states = [], []
    with torch.no_grad():
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out = model(ids[:, a:b], state=state, return_state=True)
            state = out.state
            logits.append(out.logits)
            states.append(state)
    return torch.cat(logits, dim=1), state, states


def _assert_states_equal(a: StreamState, b: StreamState) -> None:
    da, db = a.to_dict(), b.to_dict()
    assert set(da) == set(db)
    for k in da:
        assert da[k].dtype == db[k].dtype, k
        assert torch.equal(da[k], db[k]), k


@settings(max_examples=15, deadline=None)
@given(st.sets(st.integers(1, SEQ - 1), max_size=8))
def test_random_splits_match_one_forward(cuts):
    model, ids, full = _setup()
    logits, state, _ = _stream(model, ids, sorted(cuts))
    assert logits.shape == full.shape
    assert rel_err(logits, full) <= 1e-5
    assert state.positions.tolist() == [SEQ] * BATCH


@pytest.mark.parametrize(
    "cuts",
    [
        pytest.param(list(range(1, SEQ)), id="token_by_token"),
        pytest.param([5, 16, 33, 36, 53], id="unaligned"),
        pytest.param([16, 32, 48, 64], id="aligned"),
        pytest.param([3, 59], id="multi_chunk_piece"),
        pytest.param([50], id="long_then_partial"),
        pytest.param([15, 17, 31, 33], id="around_boundaries"),
    ],
)
def test_explicit_splits_match_one_forward(cuts):
    model, ids, full = _setup()
    logits, state, states = _stream(model, ids, cuts)
    assert rel_err(logits, full) <= 1e-5
    # Per position, not only overall: every piece must be right.
    per_pos = (logits - full).abs().amax(dim=(0, 2)) / full.abs().amax()
    assert float(per_pos.max()) <= 1e-5
    for cut, st_ in zip([*cuts, SEQ], states, strict=True):
        assert st_.positions.tolist() == [cut] * BATCH


def test_fresh_state_equals_no_state():
    model, ids, full = _setup()
    with torch.no_grad():
        out_none = model(ids[:, :23], return_state=True)
        out_init = model(ids[:, :23], state=model.init_state(BATCH), return_state=True)
    assert torch.allclose(out_none.logits, out_init.logits, rtol=0, atol=1e-6)
    assert rel_err(out_none.logits, full[:, :23]) <= 1e-5
    fresh = model.init_state(BATCH)
    assert fresh.batch_size == BATCH and fresh.positions.tolist() == [0] * BATCH
    assert fresh.positions.dtype == torch.long


def test_state_given_implies_state_returned():
    model, ids, _ = _setup()
    with torch.no_grad():
        assert model(ids[:, :5]).state is None
        out = model(ids[:, :5], state=model.init_state(BATCH))
    assert isinstance(out.state, StreamState)
    assert out.state.positions.tolist() == [5] * BATCH


def test_positions_advance():
    model, ids, _ = _setup()
    state = None
    expected = 0
    with torch.no_grad():
        for n in (1, 4, 11, 16, 17, 21):
            state = model(ids[:, expected:expected + n], state=state, return_state=True).state
            expected += n
            assert state.positions.tolist() == [expected] * BATCH
            for layer in state.layers:
                assert layer.attn_k.shape[1] == expected % CHUNK
                assert layer.attn_v.shape[1] == expected % CHUNK
                assert layer.norm[0].tolist() == [expected] * BATCH  # TimestepNorm count


def _continue(model, ids, state, start):
    with torch.no_grad():
        out = model(ids[:, start:], state=state, return_state=True)
    return out.logits, out.state


def test_to_dict_round_trip_mid_stream():
    model, ids, full = _setup()
    with torch.no_grad():
        state = model(ids[:, :23], return_state=True).state
    d = state.to_dict()
    assert all(isinstance(v, torch.Tensor) and not v.is_complex() for v in d.values())
    restored = StreamState.from_dict(d)
    _assert_states_equal(restored, state)
    a, sa = _continue(model, ids, state, 23)
    b, sb = _continue(model, ids, restored, 23)
    assert torch.equal(a, b)
    _assert_states_equal(sa, sb)
    assert rel_err(b, full[:, 23:]) <= 1e-5


def test_safetensors_round_trip_mid_stream(tmp_path):
    from safetensors.torch import load_file, save_file

    model, ids, full = _setup()
    with torch.no_grad():
        state = model(ids[:, :37], return_state=True).state
    path = tmp_path / "state.safetensors"
    save_file({k: v.contiguous() for k, v in state.to_dict().items()}, str(path))
    restored = StreamState.from_dict(load_file(str(path)))
    _assert_states_equal(restored, state)
    a, _ = _continue(model, ids, state, 37)
    b, _ = _continue(model, ids, restored, 37)
    assert torch.equal(a, b)
    assert rel_err(b, full[:, 37:]) <= 1e-5


def test_from_dict_reports_missing_entry():
    model, ids, _ = _setup()
    with torch.no_grad():
        d = model(ids[:, :5], return_state=True).state.to_dict()
    del d["layers.1.attn_v"]
    with pytest.raises(ValueError, match="layers.1.attn_v"):
        StreamState.from_dict(d)


def test_detach_and_clone_keep_values():
    model, ids, full = _setup()
    emb = model.embed.weight
    emb.requires_grad_(True)
    state = model(ids[:, :21], return_state=True).state  # with grad: the state has history
    assert any(t.requires_grad for t in state.to_dict().values())
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.to_dict().values())
    _assert_states_equal(detached, state.detach())
    for k, v in detached.to_dict().items():
        assert torch.equal(v, state.to_dict()[k].detach()), k

    cloned = state.detach().clone()
    _assert_states_equal(cloned, detached)
    # A clone is a deep copy: changing it leaves the original alone.
    for v in cloned.to_dict().values():
        if v.is_floating_point():
            v.add_(1.0)
    cloned.positions.add_(3)
    assert detached.positions.tolist() == [21] * BATCH
    assert not torch.equal(cloned.layers[0].norm[1], detached.layers[0].norm[1])
    assert not torch.equal(cloned.layers[0].cema, detached.layers[0].cema)

    a, _ = _continue(model, ids, detached, 21)
    b, _ = _continue(model, ids, state.clone().detach(), 21)
    assert torch.equal(a, b)
    assert rel_err(a, full[:, 21:]) <= 1e-5
    assert detached.to("cpu").positions.tolist() == [21] * BATCH
    _assert_states_equal(detached.to("cpu"), detached)


def test_state_size_does_not_grow():
    model = nano_model(seed=3)
    ids = random_ids(1, 10 * CHUNK + 5, seed=4)
    with torch.no_grad():
        short = model(ids[:, -(CHUNK + 5):], return_state=True).state
        long = model(ids, return_state=True).state
    assert short.nbytes() == long.nbytes()
    assert short.nbytes() == sum(t.numel() * t.element_size() for t in short.to_dict().values())
    assert long.layers[0].attn_k.shape[1] == 5
    # And a continuation by many tokens keeps it bounded.
    with torch.no_grad():
        longer = model(random_ids(1, 7 * CHUNK, seed=5), state=long).state
    assert longer.nbytes() == long.nbytes()


def test_gradient_flows_through_state():
    """A loss on segment 2 reaches the embeddings of segment-1 tokens only through the state."""
    model = nano_model(seed=5)
    seg1 = random_ids(2, 20, vocab=100, seed=6)  # ids 0..99
    seg2 = random_ids(2, 20, vocab=256, low=100, seed=7)  # ids 100..255
    targets = random_ids(2, 20, seed=8)
    seg1_rows = torch.unique(seg1)

    model.zero_grad()
    state = model(seg1, return_state=True).state
    model(seg2, targets=targets, state=state).loss.backward()
    grad = model.embed.weight.grad
    assert grad is not None
    assert bool(torch.isfinite(grad).all())
    assert float(grad[seg1_rows].abs().min()) > 0, "every segment-1 token should receive gradient"

    model.zero_grad()
    state = model(seg1, return_state=True).state.detach()
    model(seg2, targets=targets, state=state).loss.backward()
    grad = model.embed.weight.grad
    assert float(grad[seg1_rows].abs().max()) == 0.0
    assert float(grad[100:].abs().sum()) > 0  # segment 2 itself still learns
