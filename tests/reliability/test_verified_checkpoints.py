"""Verified checkpoints: every kind of damage to the newest checkpoint is reported in one line and the resume
continues from the previous verified one, exactly (the final weights equal the uninterrupted run's);
generate/eval refuse a damaged checkpoint in one line (exit 2) naming the step to use; checkpoints of older
versions (no manifest) still load; `--keep-last` never deletes the newest verified checkpoint; the non-finite
loss message names a checkpoint that is actually good."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megalodon_lm.training import TrainingError
from megalodon_lm.training.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint
from megalodon_lm.training.fallback import check_checkpoint, newest_verified_checkpoint
from megalodon_lm.training.loading import load_run
from megalodon_lm.training.manifest import MANIFEST_FILE, CorruptCheckpointError, NonFiniteError
from megalodon_lm.training.trainer import _check_finite

from .helpers import STEPS, final_weights, one_error_line, run_cli, tiny_run, train_argv

pytestmark = pytest.mark.usefixtures("single_thread")


def _newest(run: Path) -> Path:
    return run / "checkpoints" / f"step_{STEPS:08d}"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garble_finite(path: Path) -> None:
    """Flip the sign bit of every float32 in place (the header untouched): same size, values finite, the file
    still parses; only the SHA-256 can tell."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, raw data
    for i in range(start + 3, len(data), 4):
        data[i] ^= 0x80
    path.write_bytes(bytes(data))
    assert all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def _weights_nan(path: Path) -> None:
    """The same file with every float NaN (same size)."""
    weights = load_file(str(path))
    save_file({k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in weights.items()},
              str(path), metadata={"format": "pt"})


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "weights garbled to NaN": lambda c: _weights_nan(c / "model.safetensors"),
    "weights garbled to finite values": lambda c: _garble_finite(c / "model.safetensors"),
    "truncated optimizer": lambda c: _truncate(c / "optimizer.pt"),
    "empty optimizer": lambda c: (c / "optimizer.pt").write_bytes(b""),
    "truncated rng": lambda c: _truncate(c / "rng.safetensors"),
    "trainer_state {}": lambda c: (c / "trainer_state.json").write_text("{}"),
    "trainer_state not JSON": lambda c: (c / "trainer_state.json").write_text("{oops"),
    "missing scheduler": lambda c: (c / "scheduler.json").unlink(),
    "garbled manifest": lambda c: (c / MANIFEST_FILE).write_text("[1, 2"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_to_the_previous_verified_checkpoint(damage, run_copy, finished_run, text_file, cache_dir,
                                                               capsys):
    newest = _newest(run_copy)
    DAMAGE[damage](newest)
    with pytest.raises(CorruptCheckpointError):
        check_checkpoint(newest)
    assert newest_verified_checkpoint(run_copy).name == "step_00000004"
    code, out, err = run_cli(train_argv(text_file, run_copy, cache_dir, resume=True), capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("megalodon-lm:")]
    assert len(notes) == 2, err  # one line for the damaged checkpoint, one saying which is used instead
    assert re.match(rf"megalodon-lm: warning: checkpoint .*step_{STEPS:08d} is corrupt: ", notes[0]), notes[0]
    assert notes[1] == "megalodon-lm: resuming from step_00000004, the newest checkpoint that verifies"
    # Nothing lost: steps 5 and 6 were trained again, exactly as the first time.
    after, before = final_weights(run_copy), final_weights(finished_run)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    for ckpt in list_checkpoints(run_copy):
        check_checkpoint(ckpt)


def test_generate_and_eval_on_a_corrupt_checkpoint_one_line_exit_2(run_copy, text_file, capsys):
    _truncate(_newest(run_copy) / "model.safetensors")
    hint = r"the newest verified checkpoint is step_00000004 \(use --step 4\)"
    code, out, err = run_cli(["generate", str(run_copy), "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert code == 2 and out == ""
    one_error_line(err, rf"step_{STEPS:08d} is corrupt: model.safetensors has .* bytes.*; {hint}")
    code, out, err = run_cli(["eval", "ppl", str(run_copy), "--data", str(text_file), "--max-docs", "1",
                              "--contexts", "8", "--score-tokens", "8"], capsys)
    assert code == 2 and out == ""
    one_error_line(err, hint)
    code, out, err = run_cli(["generate", str(run_copy), "--step", "4", "--prompt", "a", "--max-new-tokens", "2"],
                             capsys)
    assert code == 0, err


def test_nan_weights_without_a_manifest_are_refused_by_the_finite_check(run_copy, capsys):
    newest = _newest(run_copy)
    _weights_nan(newest / "model.safetensors")
    (newest / MANIFEST_FILE).unlink()
    code, out, err = run_cli(["generate", str(run_copy), "--prompt", "a", "--max-new-tokens", "2"], capsys)
    assert code == 2
    one_error_line(err, r"model.safetensors holds NaN or infinity")


def test_checkpoints_of_older_versions_load_unverified(run_copy, finished_run, text_file, cache_dir, capsys):
    """No manifest (written before manifests existed): loads, resumes and generates as before."""
    for ckpt in list_checkpoints(run_copy):
        (ckpt / MANIFEST_FILE).unlink()
    shutil.rmtree(_newest(run_copy))
    (run_copy / "checkpoints" / "latest").write_text("step_00000004\n")
    load_run(run_copy)
    code, _, err = run_cli(train_argv(text_file, run_copy, cache_dir, resume=True), capsys)
    assert code == 0, err
    assert not [line for line in err.splitlines() if line.startswith("megalodon-lm:")]
    after, before = final_weights(run_copy), final_weights(finished_run)
    assert all(torch.equal(after[k], before[k]) for k in after)
    assert (_newest(run_copy) / MANIFEST_FILE).is_file()  # new checkpoints get one


def test_keep_last_never_deletes_the_newest_verified_checkpoint(run_copy, text_file, cache_dir, capsys):
    """The newest checkpoint damaged, --keep-last 1: the resume re-trains from step 4 and at every moment a
    verified checkpoint exists; in the end only the newest one, verified, is left."""
    DAMAGE["weights garbled to finite values"](_newest(run_copy))
    code, _, err = run_cli(train_argv(text_file, run_copy, cache_dir, resume=True, keep_last=1), capsys)
    assert code == 0, err
    assert [c.name for c in list_checkpoints(run_copy)] == [f"step_{STEPS:08d}"]
    check_checkpoint(latest_checkpoint(run_copy))


def test_a_non_finite_run_keeps_and_names_a_good_checkpoint(tmp_path, text_file, cache_dir):
    """Diverging training with --keep-last 1 and a save every step: weights that became NaN are never saved
    (so never pruned into the place of the good one), and the message names a checkpoint that verifies."""
    with pytest.raises(TrainingError) as info:
        tiny_run(text_file, tmp_path / "run", cache_dir, lr=1e6, grad_clip=0, warmup_steps=0, save_every=1,
                 keep_last=1, max_steps=40, eval_every=100)
    named = re.search(r"last good checkpoint is kept: (\S+)", str(info.value))
    assert named, str(info.value)
    check_checkpoint(Path(named.group(1)))


def test_non_finite_weights_are_never_saved_so_never_pruned_into_place(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    model, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        next(model.parameters())[0] = math.inf
    before = [c.name for c in list_checkpoints(tmp_path / "run")]
    with pytest.raises(NonFiniteError, match="NaN or infinity .* at step 8: not saved"):
        save_checkpoint(tmp_path / "run", 8, model, None, None, {"step": 8}, keep_last=1)
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == before
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_the_non_finite_loss_message_skips_a_damaged_newest_checkpoint(run_copy):
    DAMAGE["weights garbled to finite values"](_newest(run_copy))
    with pytest.raises(TrainingError, match=r"last good checkpoint is kept: .*step_00000004$"):
        _check_finite(math.nan, STEPS, run_copy)


def test_manifest_lists_every_file_with_size_and_sha256(finished_run):
    ckpt = _newest(finished_run)
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST_FILE)
    assert files["model.safetensors"]["size"] == (ckpt / "model.safetensors").stat().st_size
    assert all(len(entry["sha256"]) == 64 for entry in files.values())
