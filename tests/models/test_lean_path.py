"""The lean training path (modules/lean.py) against plain autograd (MEGALODON_TRAIN_PATH=autograd).

Loss, every parameter gradient and the final stream state must agree: float64 to 1e-10 relative, float32 to
1e-5, over odd lengths, chunk boundaries +-1, right padding, packed documents, an incoming state, dropout
(same seed) and whole-block activation checkpointing on top. Also: the lean path stores fewer bytes.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import CHUNK, nano_model, random_ids, rel_err

F64_TOL, F32_TOL = 1e-10, 1e-5


def _run(model, path: str, monkeypatch, ids, seed: int = 0, **kw):
    """(loss, {name: grad}, state or None) of one forward + backward on the given path."""
    monkeypatch.setenv("MEGALODON_TRAIN_PATH", path)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, targets=ids, **kw)
    loss = out.loss
    if out.state is not None:  # the state's gradient path is part of the contract too
        loss = loss + 1e-3 * sum(layer.cema.abs().sum() + layer.norm[1].sum() for layer in out.state.layers)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, out.state


def _compare(model, monkeypatch, ids, tol, **kw):
    ref = _run(model, "autograd", monkeypatch, ids, **kw)
    got = _run(model, "lean", monkeypatch, ids, **kw)
    assert rel_err(got[0], ref[0]) <= tol
    assert got[1].keys() == ref[1].keys()
    for name, g in ref[1].items():
        assert rel_err(got[1][name], g) <= tol, name
    if ref[2] is not None:
        for a, b in zip(got[2].to_dict().values(), ref[2].to_dict().values(), strict=True):
            if b.is_floating_point() or b.is_complex():
                assert rel_err(a, b) <= tol if b.norm() > 0 else bool((a == b).all())
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("length", [CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, 37])
def test_lengths_float64(monkeypatch, length):
    model = nano_model().double().train()
    _compare(model, monkeypatch, random_ids(2, length, seed=length), F64_TOL)


@pytest.mark.parametrize("length", [255, 257])
def test_attention_query_blocks_float64(monkeypatch, length):
    """Chunk 256: the lean attention's two causal query blocks (ops/attention/chunk_fn.py) inside the model."""
    model = nano_model(chunk_size=256).double().train()
    _compare(model, monkeypatch, random_ids(1, length, seed=length), F64_TOL)


def test_lean_attention_is_taken_only_in_training(monkeypatch):
    from megalodon_lm.modules import mega

    calls = []
    real = mega.lean_chunk_attention
    monkeypatch.setattr(mega, "lean_chunk_attention", lambda *args: calls.append(1) or real(*args))
    model = nano_model().double().train()
    model(random_ids(2, 37), targets=random_ids(2, 37)).loss.backward()
    assert len(calls) == model.config.num_layers
    calls.clear()
    with torch.no_grad():  # inference keeps the SDPA path
        model(random_ids(2, 37))
    model(random_ids(2, 37), return_state=True).logits.sum().backward()  # a state to return: SDPA path
    assert not calls


def test_float32_swiglu_rescaled(monkeypatch):
    model = nano_model(swiglu=True, rescale_nffn=True).train()
    _compare(model, monkeypatch, random_ids(2, 2 * CHUNK + 3), F32_TOL)


def test_right_padding_and_incoming_state(monkeypatch):
    model = nano_model().double().train()
    ids = random_ids(3, 29, seed=3)
    with torch.no_grad():
        state = model(random_ids(3, CHUNK + 5, seed=4), return_state=True).state  # mid-chunk offsets
    mask = torch.ones(3, 29, dtype=torch.long)
    mask[0, 20:] = 0
    mask[2, 7:] = 0
    _compare(model, monkeypatch, ids, F64_TOL, state=state, attention_mask=mask)


def test_packed_documents(monkeypatch):
    model = nano_model().double().train()
    cu = torch.tensor([0, 5, 5 + CHUNK + 1, 40, 2 * 31])
    _compare(model, monkeypatch, random_ids(2, 31, seed=5), F64_TOL, cu_seqlens=cu)


def test_dropout_same_seed(monkeypatch):
    model = nano_model(dropout=0.1, hidden_dropout=0.2, attention_dropout=0.15).double().train()
    _compare(model, monkeypatch, random_ids(2, 2 * CHUNK + 5, seed=6), F64_TOL)


def test_activation_checkpointing_on_top(monkeypatch):
    model = nano_model(hidden_dropout=0.1).double().train()
    model.gradient_checkpointing = True
    _compare(model, monkeypatch, random_ids(2, 2 * CHUNK + 1, seed=7), F64_TOL)


def _saved_bytes(model, ids) -> int:
    """Bytes autograd keeps for the backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, targets=ids)
    return sum(seen.values())


def test_lean_path_saves_fewer_bytes(monkeypatch):
    model = nano_model().train()
    ids = random_ids(1, 8 * CHUNK)
    monkeypatch.setenv("MEGALODON_TRAIN_PATH", "autograd")
    full = _saved_bytes(model, ids)
    monkeypatch.setenv("MEGALODON_TRAIN_PATH", "lean")
    lean = _saved_bytes(model, ids)
    assert lean < 0.5 * full, (lean, full)


def test_unknown_train_path_is_refused(monkeypatch):
    monkeypatch.setenv("MEGALODON_TRAIN_PATH", "fast")
    with pytest.raises(ValueError, match="MEGALODON_TRAIN_PATH"):
        nano_model().train()(random_ids(1, 4), targets=random_ids(1, 4))
