"""Operational failures end in one clear line and exit 2, with nothing lost: a full disk during a save, read-only
cache or output directories, output paths of the wrong kind, a model too large for the memory."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

from megalodon_lm.training.checkpoint import latest_checkpoint, list_checkpoints
from megalodon_lm.training.fallback import check_checkpoint

from .helpers import STEPS, final_weights, one_error_line, read_only, run_cli, train_argv, tree

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------- a full disk
def _disk_full_on_call(monkeypatch, module, name: str, failing_call: int, exc: BaseException,
                       partial: bool = True) -> None:
    """Make `module.name` (a writer taking (obj, path, ...)) fail on its `failing_call`-th call, after writing
    half of its bytes when `partial` (what a full disk leaves)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def writer(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            if partial:
                with open(path, "wb") as f:
                    f.write(b"\0" * 1000)
            raise exc
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, writer)


@pytest.mark.parametrize("kind", ["safetensors ENOSPC", "torch.save enforce fail"])
def test_disk_full_during_a_save(kind, tmp_path, finished_run, text_file, cache_dir, monkeypatch, capsys):
    import megalodon_lm.training.checkpoint as checkpoint

    out = tmp_path / "run"
    if kind == "safetensors ENOSPC":  # 3rd safetensors write: the weights of the 2nd checkpoint (step 4)
        _disk_full_on_call(monkeypatch, checkpoint, "save_safetensors", 3,
                           OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    else:  # what torch.save really raises on a full disk, with the disk reported full
        _disk_full_on_call(monkeypatch, checkpoint.torch, "save", 2,
                           RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240"))
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4096))
    code, _, err = run_cli(train_argv(text_file, out, cache_dir), capsys)
    monkeypatch.undo()
    assert code == 2
    one_error_line(err, r"cannot write checkpoint step_00000004 in .*: No space left on device.* "
                        r"\(step_00000002 is intact; the partial checkpoint was removed\)")
    assert [c.name for c in list_checkpoints(out)] == ["step_00000002"]
    assert latest_checkpoint(out).name == "step_00000002"
    check_checkpoint(latest_checkpoint(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # Space freed: the resume continues from step 2 and ends exactly where the uninterrupted run ended.
    code, _, err = run_cli(train_argv(text_file, out, cache_dir, resume=True), capsys)
    assert code == 0, err
    after, before = final_weights(out), final_weights(finished_run)
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_disk_full_while_updating_latest_keeps_the_previous_pointer(tmp_path, finished_run, monkeypatch):
    from megalodon_lm.training.checkpoint import CheckpointWriteError, load_run, save_checkpoint

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    model, _ = load_run(run)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".tmp-latest"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell the files apart")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointWriteError, match=r"was written but .*latest could not be updated: No space"):
        save_checkpoint(run, 8, model, None, None, {"step": 8})
    monkeypatch.undo()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))


# ---------------------------------------------------------------------- read-only places
def test_read_only_cache_dir(tmp_path, text_file, cache_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = tmp_path / "run"
    with read_only(ro):
        code, _, err = run_cli(train_argv(text_file, out, cache_dir) + ["--cache-dir", str(ro / "cache")], capsys)
    assert code == 2
    one_error_line(err, rf"cannot write the tokenized-data cache in {ro / 'cache'}: .*; pass a writable --cache-dir")
    assert not out.exists() and not (ro / "cache").exists()


def test_read_only_output_dir(tmp_path, text_file, cache_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    fresh_cache = tmp_path / "cache"
    with read_only(ro):
        code, _, err = run_cli(train_argv(text_file, ro / "run", fresh_cache), capsys)
    assert code == 2
    one_error_line(err, rf"output directory {ro / 'run'}: cannot write in {ro} \(")
    assert not (ro / "run").exists()
    assert not fresh_cache.exists()  # refused before tokenizing: nothing written anywhere


# ---------------------------------------------------------------------- output paths of the wrong kind
def _eval_argv(run, text_file, *extra):
    return ["eval", "ppl", str(run), "--data", str(text_file), "--max-docs", "1", "--contexts", "8,whole",
            "--score-tokens", "16", "--threads", "1", *extra]


def test_eval_out_of_the_wrong_kind_fails_before_computing(tmp_path, finished_run, text_file, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    for out, pattern in ((tmp_path, r"--out .* is a directory; give a file name"),
                         (a_file / "results.json", rf"--out .*results.json: {a_file} is not a directory")):
        code, stdout, err = run_cli(_eval_argv(finished_run, text_file, "--out", str(out)), capsys)
        assert code == 2 and stdout == ""  # nothing computed, so nothing lost
        one_error_line(err, pattern)
    assert a_file.read_text() == "keep me"
    code, stdout, err = run_cli(_eval_argv(finished_run, text_file, "--out", str(tmp_path / "new" / "r.json")), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "r.json").read_text())["results"]


def test_eval_results_are_printed_before_a_write_that_fails(tmp_path, finished_run, text_file, monkeypatch, capsys):
    import megalodon_lm.evals.cli as eval_cli

    target = tmp_path / "out"
    target.mkdir()
    monkeypatch.setattr(eval_cli, "check_output_file", lambda path, flag: path)  # the place breaks later
    with read_only(target):
        code, stdout, err = run_cli(_eval_argv(finished_run, text_file, "--out", str(target / "r.json")), capsys)
    assert code == 2
    assert "bpb" in stdout and "whole" in stdout  # the results are on stdout: not lost
    one_error_line(err, r"cannot write .*r.json: ", progress=True)
    assert list(target.iterdir()) == []


def test_export_hf_onto_a_file(tmp_path, finished_run, capsys):
    a_file = tmp_path / "model"
    a_file.write_text("keep me")
    code, stdout, err = run_cli(["export-hf", str(finished_run), str(a_file)], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, rf"OUT_DIR {a_file} exists and is not a directory")
    assert a_file.read_text() == "keep me"


def test_generate_save_state_under_a_file(tmp_path, finished_run, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    code, stdout, err = run_cli(["generate", str(finished_run), "--prompt", "a", "--max-new-tokens", "4",
                                 "--save-state", str(a_file / "s.safetensors")], capsys)
    assert code == 2 and stdout == ""
    one_error_line(err, rf"--save-state .*: {a_file} is not a directory")


# ---------------------------------------------------------------------- a model that cannot fit
def test_memory_estimate_refuses_a_model_that_cannot_fit(tmp_path, text_file, cache_dir, monkeypatch, capsys):
    import megalodon_lm.training.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 24 << 30)  # a 24 GB machine, whatever this is
    out = tmp_path / "run"
    argv = ["train", "--preset", "7B", "--data", str(text_file), "--cache-dir", str(cache_dir), "--out", str(out),
            "--seq-len", "4096", "--batch-size", "1", "--max-time", "none", "--progress", "none"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    line = one_error_line(err, r"preset '7B' at --batch-size 1 --seq-len 4096 does not fit in memory: training "
                               r"needs about \d+\.\d GiB .* but 24\.0 GiB is available on cpu; .*--no-memory-check")
    needed = float(line.split("needs about ")[1].split()[0])
    assert needed > 16 * 6.5  # 16 bytes x 6.5e9 parameters at least
    assert not out.exists()


def test_no_memory_check_overrides_the_estimate(tmp_path, text_file, cache_dir, monkeypatch, capsys):
    import megalodon_lm.training.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 10)  # 1 KiB: even this tiny model "cannot fit"
    out = tmp_path / "run"
    code, _, err = run_cli(train_argv(text_file, out, cache_dir, max_steps=2, save_every=2), capsys)
    assert code == 2
    one_error_line(err, "does not fit in memory")
    assert not out.exists()
    code, _, err = run_cli(train_argv(text_file, out, cache_dir, max_steps=2, save_every=2) + ["--no-memory-check"],
                           capsys)
    assert code == 0, err
    assert tree(out)
