"""MegalodonLM with packed documents (cu_seqlens): equal to running each document alone (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .helpers import CHUNK, nano_model, random_ids, rel_err

TOL = 1e-10


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)


def logits_and_grads(model, fn, seed: int = 3):
    """fn() -> logits (1|B, L, V); returns logits and the gradient of every parameter of a random projection."""
    model.zero_grad(set_to_none=True)
    logits = fn()
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


# Chunk 16: documents of C-1, C, C+1 and 1 tokens, one crossing the row boundary (rows of 40 tokens).
@pytest.mark.parametrize("B, lengths, ckpt", [(2, [15, 16, 17, 1, 31], False), (1, [3, 1, 20, 2], True)])
def test_packed_model_equals_documents_alone(B, lengths, ckpt):
    model = nano_model(layerwise_ckpt=ckpt).double().train(ckpt)  # checkpointing acts in training mode
    total = sum(lengths)
    ids = random_ids(B, total // B, seed=1)
    docs = torch.split(ids.reshape(1, total), lengths, dim=1)

    def packed():
        return model(ids, cu_seqlens=cu_of(lengths)).logits.reshape(1, total, -1)

    def alone():
        return torch.cat([model(d).logits for d in docs], dim=1)

    got, got_g = logits_and_grads(model, packed)
    want, want_g = logits_and_grads(model, alone)
    assert rel_err(got, want) < TOL
    assert got_g.keys() == want_g.keys() and len(want_g) == len(list(model.parameters()))
    for name, g in want_g.items():
        assert rel_err(got_g[name], g) < TOL, name


def test_packed_loss_and_row_aligned_documents():
    """Documents that are exactly the rows give the plain batch forward, loss included."""
    model = nano_model().double()
    ids, tgt = random_ids(3, 21, seed=2), random_ids(3, 21, seed=3)
    tgt[0, :4] = -100
    with torch.no_grad():
        plain = model(ids, tgt)
        packed = model(ids, tgt, cu_seqlens=torch.tensor([0, 21, 42, 63], dtype=torch.int32))
    assert rel_err(packed.logits, plain.logits) < TOL
    assert abs(float(packed.loss - plain.loss)) < TOL
    ref = F.cross_entropy(plain.logits.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    assert abs(float(packed.loss - ref)) < TOL


def test_packed_documents_do_not_see_each_other():
    """Changing one document changes no other document's logits (and the plain forward does leak)."""
    model = nano_model()
    ids = random_ids(1, 2 * CHUNK + 5, seed=4)
    cu = cu_of([CHUNK + 3, CHUNK + 2])
    other = ids.clone()
    other[0, : CHUNK + 3] = random_ids(1, CHUNK + 3, seed=5)
    with torch.no_grad():
        a = model(ids, cu_seqlens=cu).logits
        b = model(other, cu_seqlens=cu).logits
        plain_a, plain_b = model(ids).logits, model(other).logits
    assert torch.equal(a[:, CHUNK + 3 :], b[:, CHUNK + 3 :])
    assert not torch.allclose(plain_a[:, CHUNK + 3 :], plain_b[:, CHUNK + 3 :])


@pytest.mark.parametrize("kwargs, match", [
    ({"return_state": True}, "streaming"),
    ({"attention_mask": torch.ones(1, 8, dtype=torch.long)}, "attention_mask"),
    ({"last_logits_only": True}, "last_logits_only"),
])
def test_packed_call_errors(kwargs, match):
    model = nano_model()
    with pytest.raises(ValueError, match=match):
        model(random_ids(1, 8), cu_seqlens=cu_of([3, 5]), **kwargs)


def test_packed_with_state_and_bad_cu_seqlens():
    model = nano_model()
    ids = random_ids(1, 8)
    state = model(ids, return_state=True).state
    with pytest.raises(ValueError, match="streaming"):
        model(ids, state=state, cu_seqlens=cu_of([3, 5]))
    with pytest.raises(ValueError, match="end at the token count 8"):
        model(ids, cu_seqlens=cu_of([3, 4]))
    with pytest.raises(ValueError, match="int32 or int64"):
        model(ids, cu_seqlens=torch.tensor([0.0, 8.0]))
