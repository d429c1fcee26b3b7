"""save_checkpoint / load_checkpoint / latest_checkpoint: exact round trips, pruning, crash debris."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from megalodon_lm import MegalodonConfig, MegalodonLM
from megalodon_lm.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)


# ---------------------------------------------------------------------- helpers (also used by test_run_dir)
def nano_config(**overrides) -> MegalodonConfig:
    return MegalodonConfig.from_preset("nano", **{"num_layers": 1, "chunk_size": 16, **overrides})


def train_one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> float:
    """One AdamW step on a fixed random batch; returns the loss."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    loss = model(ids, targets=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def trained(config: MegalodonConfig, seed: int = 0) -> tuple[MegalodonLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = MegalodonLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    train_one_step(model, optimizer, seed)
    return model, optimizer


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes and bitwise-equal values."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def assert_same_nested(a, b) -> None:
    """Bitwise equality of nested dicts/lists/tuples holding tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_nested(x, y)
    else:
        assert a == b


def _fresh_copy(config, seed: int = 99):
    torch.manual_seed(seed)
    model = MegalodonLM(config)
    return model, torch.optim.AdamW(model.parameters(), lr=5e-2)


def test_round_trip_is_exact(tmp_path):
    config = nano_config()
    model, optimizer = trained(config)
    trainer_state = {"step": 1, "tokens": 32, "elapsed": 0.25, "data": {"shard": 0, "offset": 32}}
    scheduler_state = {"base_lr": 1e-3, "last_step": 0}
    ckpt = save_checkpoint(tmp_path, 1, model, optimizer, scheduler_state, trainer_state)
    assert ckpt == tmp_path / "checkpoints" / "step_00000001"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    rng_at_save = torch.get_rng_state()
    expected_draw = torch.rand(8)

    # optimizer.pt holds nothing that needs arbitrary unpickling.
    torch.load(ckpt / "optimizer.pt", weights_only=True)

    copy, copy_opt = _fresh_copy(config)
    got_trainer, got_sched = load_checkpoint(ckpt, copy, copy_opt)
    assert got_trainer == trainer_state
    assert got_sched == scheduler_state
    assert_same_tensors(copy.state_dict(), model.state_dict())
    assert_same_nested(copy_opt.state_dict(), optimizer.state_dict())
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert torch.equal(torch.rand(8), expected_draw)

    # Continuing from the restored copy is indistinguishable from continuing the original.
    train_one_step(model, optimizer, seed=5)
    train_one_step(copy, copy_opt, seed=5)
    assert_same_tensors(copy.state_dict(), model.state_dict())


def test_tied_embedding_config_round_trip(tmp_path):
    config = nano_config(share_emb=True)
    model, optimizer = trained(config)
    ckpt = save_checkpoint(tmp_path, 3, model, optimizer, None, {"step": 3})
    copy, copy_opt = _fresh_copy(config)
    trainer_state, scheduler_state = load_checkpoint(ckpt, copy, copy_opt)
    assert trainer_state == {"step": 3} and scheduler_state is None
    assert_same_tensors(copy.state_dict(), model.state_dict())
    assert copy.output_weight is copy.embed.weight


class _TiedPair(nn.Module):
    """Two state-dict keys on one storage, which safetensors refuses to save as is."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


def test_aliased_tensors_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = _TiedPair()
    ckpt = save_checkpoint(tmp_path, 0, model, None, None, {"step": 0})
    copy = _TiedPair()
    load_checkpoint(ckpt, copy)
    assert torch.equal(copy.embed.weight, model.embed.weight)
    assert copy.head.weight is copy.embed.weight


def test_keep_last_prunes_oldest(tmp_path):
    model = MegalodonLM(nano_config())
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, model, None, None, {"step": step * 10}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000040", "step_00000050"]
    assert latest_checkpoint(tmp_path).name == "step_00000050"
    save_checkpoint(tmp_path, 60, model, None, None, {"step": 60}, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 70, model, None, None, {"step": 70}, keep_last=0)


def test_leftover_tmp_dir_ignored_then_removed(tmp_path):
    model = MegalodonLM(nano_config())
    save_checkpoint(tmp_path, 2, model, None, None, {"step": 2})
    debris = tmp_path / "checkpoints" / ".tmp-step_00000009-4242"
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"partial")
    (debris / "trainer_state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    save_checkpoint(tmp_path, 4, model, None, None, {"step": 4})
    assert not debris.exists()
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_latest_falls_back_to_newest_complete(tmp_path):
    model = MegalodonLM(nano_config())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, None, None, {"step": step})
    latest = tmp_path / "checkpoints" / "latest"
    latest.write_text("step_00000007\n")
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    # An incomplete step directory (no trainer_state.json) never counts.
    (tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    # `latest` may name an older complete checkpoint (a resumed branch); it wins then.
    latest.write_text("step_00000001\n")
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    latest.write_text("../../elsewhere\n")
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert list_checkpoints(tmp_path) == []


def test_resave_same_step_replaces(tmp_path):
    config = nano_config()
    model = MegalodonLM(config)
    save_checkpoint(tmp_path, 5, model, None, None, {"step": 5, "run": "first"})
    ckpt = save_checkpoint(tmp_path, 5, model, None, None, {"step": 5, "run": "second"})
    assert json.loads((ckpt / "trainer_state.json").read_text())["run"] == "second"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005"]


def test_load_errors(tmp_path):
    model = MegalodonLM(nano_config())
    ckpt = save_checkpoint(tmp_path, 1, model, None, None, {"step": 1})
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileNotFoundError, match="optimizer"):
        load_checkpoint(ckpt, model, optimizer)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000002", model)
    with pytest.raises(RuntimeError):  # strict: a different architecture does not load silently
        load_checkpoint(ckpt, MegalodonLM(nano_config(num_layers=2)))
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model, None, None, {})
