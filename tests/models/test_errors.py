"""Bad calls fail early with a ValueError/TypeError that names the problem."""

from __future__ import annotations

import functools

import pytest
import torch

from megalodon_lm import MegalodonLM, StreamState

from .helpers import nano_config, nano_model, random_ids


@functools.cache
def _model():
    return nano_model(seed=31, perturb=False)


def _ids(b=2, n=8):
    return random_ids(b, n, seed=32)


def test_one_dimensional_input():
    with pytest.raises(ValueError, match=r"input_ids must be 2-D"):
        _model()(_ids()[0])


def test_three_dimensional_input():
    with pytest.raises(ValueError, match=r"input_ids must be 2-D"):
        _model()(_ids().unsqueeze(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool])
def test_non_integer_input(dtype):
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor"):
        _model()(_ids().to(dtype))


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"input_ids must be a torch.Tensor"):
        _model()([[1, 2, 3]])


@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)])
def test_empty_input(shape):
    with pytest.raises(ValueError, match=r"empty"):
        _model()(torch.zeros(shape, dtype=torch.long))


def test_ids_out_of_vocab():
    ids = _ids()
    ids[1, 3] = 256
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\).*256"):
        _model()(ids)


def test_negative_ids():
    ids = _ids()
    ids[0, 0] = -1
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\).*-1"):
        _model()(ids)


def test_int32_ids_are_accepted():
    ids = _ids()
    with torch.no_grad():
        a = _model()(ids.int()).logits
        b = _model()(ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 7), (2, 9), (1, 8), (16,), (2, 8, 1)])
def test_targets_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 8\)"):
        _model()(_ids(), targets=torch.zeros(shape, dtype=torch.long))


def test_targets_wrong_dtype():
    with pytest.raises(TypeError, match=r"targets must be an integer tensor"):
        _model()(_ids(), targets=torch.zeros(2, 8))


@pytest.mark.parametrize("bad", [256, -2])
def test_targets_out_of_range(bad):
    targets = _ids()
    targets[0, 1] = bad
    with pytest.raises(ValueError, match=rf"targets must be -100 or lie in \[0, 256\).*{bad}"):
        _model()(_ids(), targets=targets)


@pytest.mark.parametrize("shape", [(2, 7), (1, 8), (8,), (2, 8, 1)])
def test_attention_mask_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 8\)"):
        _model()(_ids(), attention_mask=torch.ones(shape, dtype=torch.long))


def test_attention_mask_not_a_tensor():
    with pytest.raises(TypeError, match=r"attention_mask must be a torch.Tensor"):
        _model()(_ids(), attention_mask=[[1] * 8] * 2)


def test_state_not_a_stream_state():
    with pytest.raises(TypeError, match=r"state must be a StreamState"):
        _model()(_ids(), state={"positions": torch.zeros(2)})


def test_state_for_another_batch_size():
    model = _model()
    state = model.init_state(3)
    with pytest.raises(ValueError, match=r"batch size 3.*batch size 2"):
        model(_ids(), state=state)
    with torch.no_grad():
        state = model(_ids(b=1), return_state=True).state
    with pytest.raises(ValueError, match=r"batch size 1.*batch size 2"):
        model(_ids(), state=state)


def test_state_from_model_with_other_num_layers():
    other = MegalodonLM(nano_config(num_layers=3))
    with torch.no_grad():
        state = other(_ids(), return_state=True).state
    with pytest.raises(ValueError, match=r"state has 3 layers, the model has 2"):
        _model()(_ids(), state=state)


def test_state_from_model_with_other_model_dim():
    other = MegalodonLM(nano_config(model_dim=64, norm_num_groups=16))
    with torch.no_grad():
        state = other(_ids(), return_state=True).state
    with pytest.raises(ValueError, match=r"another config"):
        _model()(_ids(), state=state)


@pytest.mark.parametrize(
    "overrides",
    [{"norm_num_groups": 8}, {"cema_ndim": 8}, {"z_dim": 32}, {"value_dim": 128}, {"num_heads": 4}],
)
def test_state_from_model_with_other_sizes(overrides):
    other = MegalodonLM(nano_config(**overrides))
    with torch.no_grad():
        state = other(_ids(n=5), return_state=True).state  # non-empty attention cache
    with pytest.raises(ValueError, match=r"state (layer|final)"):
        _model()(_ids(), state=state)


def test_state_from_model_with_larger_chunk():
    other = MegalodonLM(nano_config(chunk_size=32))
    with torch.no_grad():
        state = other(random_ids(2, 20, seed=1), return_state=True).state  # 20 cached keys >= 16
    with pytest.raises(ValueError, match=r"state layer 0 caches 20 tokens"):
        _model()(_ids(), state=state)


def test_from_dict_rejects_a_non_real_cema_entry():
    with torch.no_grad():
        d = _model()(_ids(), return_state=True).state.to_dict()
    d["layers.0.cema"] = d["layers.0.cema"][..., 0]
    with pytest.raises(ValueError, match=r"layers.0.cema"):
        StreamState.from_dict(d)


def test_errors_leave_the_model_usable():
    model = _model()
    with pytest.raises(ValueError):
        model(_ids(), targets=torch.zeros(2, 3, dtype=torch.long))
    with torch.no_grad():
        out = model(_ids(), targets=_ids())
    assert torch.isfinite(out.loss)
