"""init_run_dir and load_run: the run directory's files, its refusals, and loading a trained run."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from megalodon_lm import MegalodonConfig, __version__
from megalodon_lm.training import checkpoint
from megalodon_lm.training.checkpoint import RUN_FORMAT_VERSION, init_run_dir, load_run, save_checkpoint

from .test_checkpoint import assert_same_tensors, nano_config, trained


def test_fresh_run_dir_files(tmp_path):
    config = nano_config()
    run = init_run_dir(tmp_path / "a" / "run", config, {"lr": 1e-3, "data": Path("/data/x")}, resume=False)
    info = json.loads((run / "run.json").read_text())
    assert info["format_version"] == RUN_FORMAT_VERSION == 1
    assert info["megalodon_lm_version"] == __version__
    assert "T" in info["created"]
    assert MegalodonConfig.from_json(run / "model_config.json") == config
    assert json.loads((run / "train_config.json").read_text()) == {"lr": 1e-3, "data": "/data/x"}
    assert (run / "checkpoints").is_dir()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]


def test_existing_checkpoints_need_resume(tmp_path):
    config = nano_config()
    run = init_run_dir(tmp_path, config, {"lr": 1e-3}, resume=False)
    # No checkpoint yet: starting over in the same directory is fine.
    init_run_dir(tmp_path, config, {"lr": 2e-3}, resume=False)
    model, _ = trained(config)
    save_checkpoint(run, 1, model, None, None, {"step": 1})
    with pytest.raises(ValueError, match="--resume.*--out"):
        init_run_dir(tmp_path, config, {"lr": 3e-3}, resume=False)
    # Resuming leaves the recorded configuration alone.
    assert init_run_dir(tmp_path, config, {"lr": 4e-3}, resume=True) == tmp_path
    assert json.loads((run / "train_config.json").read_text()) == {"lr": 2e-3}


def test_resume_into_empty_dir_initialises(tmp_path):
    run = init_run_dir(tmp_path / "new", nano_config(), {}, resume=True)
    assert json.loads((run / "run.json").read_text())["format_version"] == 1


def test_unknown_format_version(tmp_path):
    init_run_dir(tmp_path, nano_config(), {}, resume=False)
    (tmp_path / "run.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        init_run_dir(tmp_path, nano_config(), {}, resume=True)
    with pytest.raises(ValueError, match="format_version"):
        load_run(tmp_path)


def test_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        init_run_dir(target, nano_config(), {}, resume=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="not writable"):
            init_run_dir(ro, nano_config(), {}, resume=False)
    finally:
        ro.chmod(0o700)


def test_unwritable_dir_is_refused(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", refuse)
    with pytest.raises(ValueError, match="output directory is not writable"):
        init_run_dir(tmp_path, nano_config(), {}, resume=False)


def _trained_run(tmp_path, config, steps=(1, 2)):
    run = init_run_dir(tmp_path / "run", config, {}, resume=False)
    models = {}
    for step in steps:
        model, optimizer = trained(config, seed=step)
        save_checkpoint(run, step, model, optimizer, None, {"step": step})
        models[step] = model
    return run, models


def test_load_run_with_stub_tokenizer(tmp_path, monkeypatch):
    # Stands in for megalodon_lm.data.tokenizer so this test does not depend on the data module.
    fake = types.ModuleType("megalodon_lm.data.tokenizer")
    fake.load_tokenizer = lambda directory: ("tokenizer from", Path(directory))
    monkeypatch.setitem(sys.modules, "megalodon_lm.data.tokenizer", fake)

    config = nano_config()
    run, models = _trained_run(tmp_path, config)
    model, tok = load_run(run)
    assert tok == ("tokenizer from", run / "tokenizer")
    assert not model.training
    assert model.config == config
    assert_same_tensors(model.state_dict(), models[2].state_dict())
    older, _ = load_run(run, step=1)
    assert_same_tensors(older.state_dict(), models[1].state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, models[2].eval()(ids).logits)

    with pytest.raises(FileNotFoundError, match="step 7.*available steps: \\[1, 2\\]"):
        load_run(run, step=7)
    empty = init_run_dir(tmp_path / "empty", config, {}, resume=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
        load_run(empty)
    with pytest.raises(FileNotFoundError, match="not a megalodon-lm run directory"):
        load_run(tmp_path / "nowhere")


def test_load_run_with_byte_tokenizer(tmp_path):
    tokenizer_module = pytest.importorskip("megalodon_lm.data.tokenizer")
    byte_tokenizer = getattr(tokenizer_module, "ByteTokenizer", None)
    if byte_tokenizer is None:
        pytest.skip("megalodon_lm.data.tokenizer has no ByteTokenizer yet")
    tok = byte_tokenizer()
    config = nano_config(vocab_size=tok.vocab_size)
    run, models = _trained_run(tmp_path, config, steps=(3,))
    tokenizer_module.save_tokenizer(tok, run / "tokenizer")
    model, loaded = load_run(run, device="cpu")
    assert type(loaded) is type(tok)
    assert loaded.encode("héllo") == tok.encode("héllo")
    assert_same_tensors(model.state_dict(), models[3].state_dict())
