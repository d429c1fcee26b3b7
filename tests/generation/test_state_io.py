"""`save_state` / `load_state`: exact round trip, generate by parts, refusing another model's state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megalodon_lm.generation import STATE_FORMAT_VERSION, generate, load_state, read_state_info, save_state

from .helpers import small_model as _model


def _rows():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g) for n in (6, 19)]


def test_round_trip_is_exact(tmp_path):
    _, state = generate(_model(), _rows(), max_new_tokens=5, temperature=0, return_state=True)
    path = save_state(state, tmp_path / "s.safetensors", _model())
    loaded = load_state(path, _model())
    before, after = state.to_dict(), loaded.to_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    info = read_state_info(path)
    assert info.format_version == STATE_FORMAT_VERSION and info.batch_size == 2
    assert info.config == _model().config.to_dict()
    assert info.next_tokens is None and info.rng_state is None
    assert loaded.nbytes() == state.nbytes()


def test_save_load_continue_equals_uninterrupted(tmp_path):
    model, rows = _model(), _rows()
    # One generator shared by both rows (what a state file stores); an int seed would give each row its own.
    one = generate(model, rows, max_new_tokens=13, temperature=0.8, top_k=30, seed=torch.Generator().manual_seed(4))
    rng = torch.Generator().manual_seed(4)
    first, state = generate(model, rows, max_new_tokens=5, temperature=0.8, top_k=30, seed=rng, return_state=True)
    path = save_state(state, tmp_path / "s.safetensors", model, next_tokens=first[:, -1], rng=rng)
    del state

    info = read_state_info(path)
    assert info.next_tokens == first[:, -1].tolist()
    rng2 = torch.Generator()
    rng2.set_state(info.rng_state)
    pending = torch.tensor(info.next_tokens)[:, None]
    rest = generate(model, pending, state=load_state(path, model), max_new_tokens=8, temperature=0.8, top_k=30,
                    seed=rng2)
    assert torch.equal(torch.cat([first, rest], 1), one)


def test_fresh_state_and_overwrite_in_place(tmp_path):
    model = _model()
    path = tmp_path / "s.safetensors"
    save_state(model.init_state(3), path)  # fresh states hold empty attention caches
    assert load_state(path, model).positions.tolist() == [0, 0, 0]
    _, state = generate(model, _rows(), max_new_tokens=2, return_state=True, seed=0)
    save_state(state, path, model)  # replaces the file it may have been loaded from
    assert load_state(path, model).positions.tolist() == state.positions.tolist()
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left


def test_config_mismatch_is_named(tmp_path):
    _, state = generate(_model(), _rows(), max_new_tokens=2, return_state=True, seed=0)
    path = save_state(state, tmp_path / "s.safetensors", _model())
    other = _model(chunk_size=16)
    with pytest.raises(ValueError, match=r"different config \(chunk_size: file 8, model 16\)"):
        load_state(path, other)
    load_state(path)  # without a model nothing is compared


def test_state_without_config_is_still_shape_checked(tmp_path):
    _, state = generate(_model(), _rows(), max_new_tokens=2, return_state=True, seed=0)
    path = save_state(state, tmp_path / "s.safetensors")  # no model: no config recorded
    with pytest.raises(ValueError, match=r"state layer 0"):
        load_state(path, _model(model_dim=32, norm_num_groups=4))


def test_not_a_state_file(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match=r"not a megalodon-lm stream state file"):
        load_state(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"not a readable safetensors state file"):
        load_state(garbage)
    with pytest.raises(FileNotFoundError, match=r"state file not found"):
        load_state(tmp_path / "missing.safetensors")


def test_future_format_version_is_refused(tmp_path):
    tensors = _model().init_state(1).to_dict()
    path = tmp_path / "s.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "megalodon-lm-stream-state", "format_version": "99"})
    with pytest.raises(ValueError, match=r"format_version '99'"):
        load_state(path)


def test_next_tokens_must_match_batch(tmp_path):
    with pytest.raises(ValueError, match=r"next_tokens has 1 entries, the state has 2 rows"):
        save_state(_model().init_state(2), tmp_path / "s.safetensors", next_tokens=[3])
    with pytest.raises(TypeError, match=r"expects a StreamState"):
        save_state({"positions": torch.zeros(1)}, tmp_path / "s.safetensors")
