"""Causality (no logit depends on a later token) and independence of batch rows."""

from __future__ import annotations

import functools

import pytest
import torch

from .helpers import CHUNK, nano_model, random_ids, rel_err

L = 50


@functools.cache
def _setup():
    model = nano_model(seed=21)
    ids = random_ids(2, L, seed=22)
    with torch.no_grad():
        base = model(ids).logits
    return model, ids, base


@pytest.mark.parametrize("t", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, L - 1])
def test_future_token_does_not_change_the_past(t):
    model, ids, base = _setup()
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1 + torch.arange(2) * 17) % model.config.vocab_size
    with torch.no_grad():
        logits = model(changed).logits
    if t > 0:
        diff = (logits[:, :t] - base[:, :t]).abs().max()
        assert float(diff) <= 1e-6 * float(base.abs().max()), f"position < {t} changed by {float(diff):.3e}"
    # The change is visible from t on (otherwise this test would prove nothing).
    assert float((logits[:, t] - base[:, t]).abs().max()) > 1e-3
    if t + 1 < L:
        assert float((logits[:, t + 1:] - base[:, t + 1:]).abs().max()) > 1e-4


def test_information_crosses_chunk_boundaries():
    """Attention is chunk-local, but CEMA and TimestepNorm carry information across chunks."""
    model, ids, base = _setup()
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 5) % model.config.vocab_size
    with torch.no_grad():
        logits = model(changed).logits
    assert float((logits[:, 2 * CHUNK:] - base[:, 2 * CHUNK:]).abs().max()) > 1e-5


def test_causality_with_gradients():
    """d logits[t] / d embedding(x_s) is zero for s > t."""
    model = nano_model(seed=23)
    ids = torch.arange(40).view(1, 40)  # distinct tokens: embedding rows identify positions
    t = 20
    model.zero_grad()
    model(ids).logits[0, t].square().sum().backward()
    grad = model.embed.weight.grad
    assert float(grad[t + 1:40].abs().max()) == 0.0
    assert float(grad[: t + 1].abs().min()) > 0.0


def test_rows_are_independent():
    model, ids, base = _setup()
    batch = torch.cat([ids, random_ids(1, L, seed=23)])
    changed = batch.clone()
    changed[1] = random_ids(1, L, seed=24)[0]
    with torch.no_grad():
        a = model(batch).logits
        b = model(changed).logits
        alone = [model(batch[i:i + 1]).logits[0] for i in range(3)]
    for i in (0, 2):
        assert rel_err(b[i], a[i]) <= 1e-6, f"row {i} changed when row 1 changed"
    assert rel_err(b[1], a[1]) > 1e-2
    for i in range(3):
        assert rel_err(a[i], alone[i]) <= 1e-5, f"row {i} differs from its own forward"
    assert rel_err(a[:2], base) <= 1e-5


def test_rows_are_independent_in_the_loss_gradient():
    model = nano_model(seed=25)
    ids = random_ids(2, 24, vocab=100, seed=26)
    ids[1] = random_ids(1, 24, vocab=256, low=100, seed=27)[0]
    model.zero_grad()
    model(ids).logits[0].sum().backward()  # depends on row 0 only
    grad = model.embed.weight.grad
    row1_only = torch.tensor(sorted(set(ids[1].tolist()) - set(ids[0].tolist())))
    assert float(grad[row1_only].abs().max()) == 0.0
