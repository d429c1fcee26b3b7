"""Precision: float64 models, bf16 autocast on CPU, and activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from megalodon_lm import MegalodonLM

from .helpers import nano_config, nano_model, perturb_zero_init_, random_ids, rel_err


def test_double_model_computes_in_float64():
    model = nano_model(seed=41)
    ids = random_ids(2, 40, seed=42)
    targets = random_ids(2, 40, seed=43)
    with torch.no_grad():
        ref = model(ids, targets=targets)
    model.double()
    with torch.no_grad():
        out = model(ids, targets=targets, return_state=True)
    assert out.logits.dtype == torch.float64
    assert out.loss.dtype == torch.float64
    assert rel_err(out.logits, ref.logits) <= 1e-5  # same function, only more digits
    assert rel_err(out.logits, ref.logits) > 0  # really recomputed, not float32 cast up
    d = out.state.to_dict()
    names = ("layers.0.cema", "layers.0.attn_k", "layers.0.attn_v", "layers.0.norm.mean", "final_norm.var")
    for name in names:
        assert d[name].dtype == torch.float64, name
    assert out.state.layers[0].cema.dtype == torch.complex128
    fresh = model.init_state(2)
    assert fresh.layers[0].cema.dtype == torch.complex128
    assert fresh.layers[0].norm[1].dtype == torch.float64


def test_double_streaming_is_exact():
    model = nano_model(seed=44).double()
    ids = random_ids(1, 45, seed=45)
    with torch.no_grad():
        full = model(ids).logits
        a = model(ids[:, :19], return_state=True)
        b = model(ids[:, 19:], state=a.state)
    assert rel_err(torch.cat([a.logits, b.logits], 1), full) <= 1e-12


def test_float32_model_logits_are_float32():
    model = nano_model(seed=46)
    with torch.no_grad():
        out = model(random_ids(1, 10, seed=1), return_state=True)
    assert out.logits.dtype == torch.float32
    assert out.state.layers[0].cema.dtype == torch.complex64


def test_bf16_autocast_forward_backward():
    model = nano_model(seed=47)
    ids = random_ids(2, 40, seed=48)
    targets = random_ids(2, 40, seed=49)
    with torch.no_grad():
        ref = model(ids, targets=targets)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, targets=targets)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    assert rel_err(out.logits, ref.logits) <= 0.05
    assert abs(float(out.loss.detach()) - float(ref.loss)) <= 0.005 * float(ref.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    assert float(model.layers[0].mega.cema.alpha.grad.abs().sum()) > 0
    assert float(model.layers[0].mega.wz.weight.grad.abs().sum()) > 0
    # Gradients agree in direction with the float32 ones.
    emb_bf16 = model.embed.weight.grad.clone()
    model.zero_grad()
    model(ids, targets=targets).loss.backward()
    cos = torch.nn.functional.cosine_similarity(emb_bf16.flatten(), model.embed.weight.grad.flatten(), dim=0)
    assert float(cos) > 0.95


def test_bf16_autocast_streaming():
    model = nano_model(seed=50)
    ids = random_ids(2, 40, seed=51)
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = model(ids[:, :21], return_state=True)
            b = model(ids[:, 21:], state=a.state, return_state=True)
    assert b.state.positions.tolist() == [40, 40]
    assert rel_err(torch.cat([a.logits, b.logits], 1), ref) <= 0.05


def _twin_models(**overrides):
    torch.manual_seed(52)
    plain = MegalodonLM(nano_config(**overrides))
    perturb_zero_init_(plain, seed=53)
    ckpt = MegalodonLM(nano_config(layerwise_ckpt=True, **overrides))
    ckpt.load_state_dict(plain.state_dict())
    return plain.train(), ckpt.train()


def _count_forward_calls(module):
    """Count calls of module.forward (forward hooks do not fire when checkpointing recomputes)."""
    calls = []
    inner = module.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    module.forward = counting_forward
    return calls


def _loss_and_grads(model, ids, targets, seed, state=None):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(ids, targets=targets, state=state).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
def test_layerwise_checkpointing_matches(dropout):
    overrides = dict(dropout=dropout, hidden_dropout=dropout, attention_dropout=dropout)
    plain, ckpt = _twin_models(**overrides)
    assert ckpt.config.layerwise_ckpt and ckpt.gradient_checkpointing
    ids = random_ids(2, 40, seed=54)
    targets = random_ids(2, 40, seed=55)

    calls = _count_forward_calls(ckpt.layers[0])
    loss_c, grads_c = _loss_and_grads(ckpt, ids, targets, seed=56)
    assert len(calls) == 2, "with layerwise_ckpt the block should be recomputed during backward"

    loss_p, grads_p = _loss_and_grads(plain, ids, targets, seed=56)
    assert torch.allclose(loss_c, loss_p, rtol=1e-6, atol=0)
    assert set(grads_c) == set(grads_p)
    for n in grads_p:
        assert torch.allclose(grads_c[n], grads_p[n], rtol=1e-4, atol=1e-7), n
    if dropout:  # dropout really active: another seed gives another loss
        other, _ = _loss_and_grads(plain, ids, targets, seed=57)
        assert not torch.allclose(other, loss_p)


def test_layerwise_checkpointing_with_state():
    plain, ckpt = _twin_models()
    ids = random_ids(2, 40, seed=58)
    targets = random_ids(2, 20, seed=59)
    results = []
    for model in (plain, ckpt):
        model.zero_grad()
        state = model(ids[:, :20], return_state=True).state
        loss = model(ids[:, 20:], targets=targets, state=state).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp, gp), (lc, gc) = results
    assert torch.allclose(lp, lc, rtol=1e-6, atol=0)
    for n in gp:
        assert torch.allclose(gc[n], gp[n], rtol=1e-4, atol=1e-7), n


def test_checkpointing_is_inactive_in_eval_and_no_grad():
    _, ckpt = _twin_models()
    calls = _count_forward_calls(ckpt.layers[0])
    ckpt.eval()
    out = ckpt(random_ids(1, 10, seed=1), targets=random_ids(1, 10, seed=2))
    out.loss.backward()
    assert len(calls) == 1


def test_double_after_construction_and_back():
    model = nano_model(seed=60)
    copy_ = copy.deepcopy(model).double().float()
    ids = random_ids(1, 20, seed=61)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, copy_(ids).logits)
