"""Reference initialisation statistics (docs/architecture.md §1.6, §2.2, §5)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn as nn

from megalodon_lm import MegalodonConfig, MegalodonLM

D = 256
TRUNC3_STD = 0.98658  # std of a standard normal truncated at +-3


def _config(**overrides) -> MegalodonConfig:
    base = dict(num_layers=3, model_dim=D, z_dim=128, value_dim=512, num_heads=2, ffn_hidden_dim=512,
                cema_ndim=16, chunk_size=16, norm_num_groups=16, vocab_size=1024, rescale_nffn=True)
    return MegalodonConfig(**{**base, **overrides})


@functools.cache
def _model(**overrides) -> MegalodonLM:
    torch.manual_seed(0)
    return MegalodonLM(_config(**overrides))


def _close(value: float, expected: float, rel: float) -> bool:
    return abs(value - expected) <= rel * expected


def test_embedding_truncated_normal():
    model = _model()
    w = model.embed.weight.detach()
    std = 1 / math.sqrt(D)
    assert abs(float(w.mean())) < 0.05 * std
    assert _close(float(w.std()), TRUNC3_STD * std, 0.03), float(w.std()) / std
    assert float(w.abs().max()) <= 3 * std * (1 + 1e-6)
    assert float(w.abs().max()) > 2.8 * std  # really truncated at 3 std, not narrower
    out = model.output.output.weight.detach()
    assert _close(float(out.std()), TRUNC3_STD * std, 0.03)
    assert float(out.abs().max()) <= 3 * std * (1 + 1e-6)
    assert not torch.equal(out, w)


def _linears(model):
    return [(n, m) for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]


def test_projection_weights_he_init():
    model = _model()
    linears = _linears(model)
    names = {n.split(".", 1)[1] for n, _ in linears}
    assert names == {"mega.wv", "mega.wz", "mega.wr", "mega.wh1", "mega.wh2", "nffn.fc1", "nffn.fc2"}
    for name, lin in linears:
        w = lin.weight.detach()
        expected = math.sqrt(1.0 / (3 * lin.in_features))
        assert _close(float(w.std()), expected, 0.05), (name, float(w.std()), expected)
        assert abs(float(w.mean())) < 0.05 * expected
        if lin.bias is not None:
            assert float(lin.bias.detach().abs().max()) == 0.0, name


def test_swiglu_third_matrix_initialised():
    model = _model(swiglu=True)
    for block in model.layers:
        w = block.nffn.fc3.weight.detach()
        assert _close(float(w.std()), math.sqrt(1.0 / (3 * D)), 0.05)


def test_zero_initialised_parameters():
    model = _model()
    zero = []
    for name, p in model.named_parameters():
        if name.endswith(("timenorm.weight", "timenorm.bias", "rmsnorm.weight", "norm.weight", "norm.bias",
                          "mega.gamma", "mega.beta", "final_norm.weight", "final_norm.bias")) or (
                name.endswith(".bias") and ".mega.w" in name):
            zero.append(name)
            assert float(p.detach().abs().max()) == 0.0, name
    # 3 layers x (timenorm w/b, rmsnorm w, 4 biases, gamma, beta, nffn norm w/b) + final norm w/b
    assert len(zero) == 3 * 11 + 2


def test_cema_initialisation():
    model = _model()
    cemas = [block.mega.cema for block in model.layers]
    alpha = torch.cat([c.alpha.detach().flatten() for c in cemas])
    delta = torch.cat([c.delta.detach().flatten() for c in cemas])
    gamma = torch.stack([c.gamma.detach() for c in cemas])
    omega = torch.cat([c.omega.detach().flatten() for c in cemas])
    assert _close(float(alpha.std()), 0.2, 0.06) and abs(float(alpha.mean())) < 0.02
    assert _close(float(delta.std()), 0.2, 0.06) and abs(float(delta.mean())) < 0.02
    assert float(gamma[..., 1].abs().max()) == 0.0
    assert _close(float(gamma[..., 0].std()), 1.0, 0.06) and abs(float(gamma[..., 0].mean())) < 0.1
    assert float(omega.abs().max()) <= 1.0
    assert _close(float(omega.std()), 0.25, 0.12) and abs(float(omega.mean())) < 0.05
    assert not torch.equal(alpha, delta)


def test_cema_base_frequencies_are_a_permutation():
    model = _model()
    i = torch.arange(1, D + 1, dtype=torch.float64)
    expected = D ** (-i / D)  # descending
    perms = []
    for block in model.layers:
        theta = block.mega.cema.theta.detach()
        assert theta.shape == (D, 1, 1)
        f = torch.sigmoid(theta.double().flatten())
        assert torch.allclose(f.sort(descending=True).values, expected, rtol=1e-5, atol=1e-7)
        order = f.argsort(descending=True)
        assert not torch.equal(order, torch.arange(D)), "frequencies should be randomly permuted"
        perms.append(order)
    assert not all(torch.equal(perms[0], p) for p in perms[1:]), "each layer draws its own permutation"


def test_rescale_nffn_layer_scale():
    model = _model()
    for layer_id, block in enumerate(model.layers):
        alpha = block.nffn.alpha.detach()
        assert alpha.shape == (D,)
        assert torch.allclose(alpha, torch.full((D,), 0.1 * 0.5**layer_id))
    assert _model(rescale_nffn=False).layers[0].nffn.alpha is None


@pytest.mark.parametrize("mode", ["bert", "gaussian", "xavier"])
def test_other_init_modes(mode):
    model = _model(init_mode=mode)
    for name, lin in _linears(model):
        w = lin.weight.detach()
        fan_in, fan_out = lin.in_features, lin.out_features
        if mode == "bert":
            assert _close(float(w.std()), 0.02, 0.05), name
        elif mode == "gaussian":
            std = 1 / math.sqrt(fan_in)
            assert _close(float(w.std()), TRUNC3_STD * std, 0.05), name
            assert float(w.abs().max()) <= 3 * std * (1 + 1e-6), name
        else:
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert float(w.abs().max()) <= bound * (1 + 1e-6), name
            assert _close(float(w.std()), bound / math.sqrt(3), 0.05), name
        if lin.bias is not None:
            assert float(lin.bias.detach().abs().max()) == 0.0
    # Embeddings do not depend on init_mode.
    assert _close(float(model.embed.weight.detach().std()), TRUNC3_STD / math.sqrt(D), 0.03)


def test_reset_parameters_reinitialises_every_parameter():
    """`MegalodonLM.reset_parameters` promises the reference initialisation of *every* parameter."""
    model = MegalodonLM(_config(num_layers=2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.reset_parameters()
    assert _close(float(model.embed.weight.detach().std()), TRUNC3_STD / math.sqrt(D), 0.03)
    assert _close(float(model.layers[0].mega.wv.weight.detach().std()), math.sqrt(1 / (3 * D)), 0.05)
    not_reset = []
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith(("timenorm.weight", "timenorm.bias", "rmsnorm.weight", "norm.weight", "norm.bias",
                          "mega.gamma", "mega.beta", "final_norm.weight", "final_norm.bias", "wz.bias")):
            ok = float(p.abs().max()) == 0.0
        elif name.endswith("cema.gamma"):
            ok = float(p[..., 1].abs().max()) == 0.0
        elif name.endswith(("cema.alpha", "cema.delta", "cema.omega", "cema.theta")):
            ok = not bool((p == 0.5).all())
        elif name.endswith("nffn.alpha"):
            layer_id = int(name.split(".")[1])
            ok = torch.allclose(p, torch.full_like(p, 0.1 * 0.5**layer_id))
        else:
            continue
        if not ok:
            not_reset.append(name)
    assert not not_reset, f"reset_parameters() left these parameters as they were: {not_reset}"
