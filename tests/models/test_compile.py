"""torch.compile: the model compiles with no graph breaks (fullgraph=True) for training and for the static
decode step, and the compiled results equal eager ones. Cold CPU compiles take tens of seconds."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.generation.static_decode import StaticDecoder

SMALL = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=64, chunk_size=8,
             norm_num_groups=4, cema_ndim=4)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_training_step_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = MegalodonLM(MegalodonConfig.from_preset("nano", **SMALL))
    ids = torch.randint(0, 256, (2, 21))
    tgt = torch.randint(0, 256, (2, 21))

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(ids, targets=tgt).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads(model)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    loss, grads = loss_and_grads(compiled)
    assert rel(loss, ref_loss) <= 1e-5
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert rel(g, r) <= 1e-4, name


@torch.no_grad()
def test_static_decode_step_compiles(monkeypatch):
    import megalodon_lm.generation.static_decode as sd

    monkeypatch.setattr(sd, "_COMPILED", [])  # a fresh compile, whatever ran before
    torch.manual_seed(0)
    model = MegalodonLM(MegalodonConfig.from_preset("nano", **SMALL)).eval()
    ids = torch.randint(0, 256, (2, 14))
    state = model(ids[:, :5], return_state=True).state
    eager = StaticDecoder(model, state)
    compiled = StaticDecoder(model, state, compile=True)
    assert compiled._step is not sd._decode_step
    for t in range(5, 14):  # crosses a chunk boundary: one graph serves every offset
        assert rel(compiled.step(ids[:, t]), eager.step(ids[:, t])) <= 1e-5
    assert rel(compiled.stream_state().layers[0].cema, eager.stream_state().layers[0].cema) <= 1e-5
