"""Exact resume: an interrupted and resumed run equals the uninterrupted one bitwise (CPU, fp32, one thread).

Two interruptions are exercised: a crash in the middle of step 10 (in process; the run resumes from the step-8
checkpoint and must redo steps 9 and 10, with the same schedule horizon), and SIGTERM to the CLI (the run saves a
checkpoint where it stops, exits with 143 (128 + SIGTERM), and `--resume` continues it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import megalodon_lm
from megalodon_lm.training import trainer

from .conftest import (
    assert_same_weights,
    checkpoint_steps,
    cli,
    cli_popen,
    eval_lines,
    latest_weights,
    run_tiny,
    tiny_options,
    train_lines,
    write_toml,
)

pytestmark = pytest.mark.usefixtures("single_thread")

N_STEPS = 12
RESUME_OPTIONS = dict(max_steps=N_STEPS, save_every=4, keep_last=10, eval_every=4, warmup_steps=3, log_every=1,
                      eval_tokens=64, sample_tokens=0)


class SimulatedCrash(RuntimeError):
    pass


def _training_record(r: dict) -> tuple:
    # Everything of a training line but the wall-clock values.
    return r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"]


def _optimizer_state(run_dir: Path) -> dict:
    from megalodon_lm.training.checkpoint import latest_checkpoint

    return torch.load(latest_checkpoint(run_dir) / "optimizer.pt", weights_only=True)


def _assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        sa, sb = a["state"][key], b["state"][key]
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (key, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, text_file, cache_dir):
    """The uninterrupted 12-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run_tiny(text_file, out, cache_dir, **RESUME_OPTIONS)
    assert result.step == N_STEPS and result.stopped_by == "max_steps"
    return out


def test_resume_after_crash_is_bitwise_identical(tmp_path, reference, text_file, cache_dir, monkeypatch):
    out = tmp_path / "run"
    real_sample_batch = trainer.sample_batch

    def crashing_sample_batch(corpus, batch_size, seq_len, step, seed, *args, **kwargs):
        if step == 9:  # the batch of the 10th optimizer step: after the step-8 checkpoint and step 9
            raise SimulatedCrash("simulated crash during step 10")
        return real_sample_batch(corpus, batch_size, seq_len, step, seed, *args, **kwargs)

    monkeypatch.setattr(trainer, "sample_batch", crashing_sample_batch)
    with pytest.raises(SimulatedCrash):
        run_tiny(text_file, out, cache_dir, **RESUME_OPTIONS)
    monkeypatch.setattr(trainer, "sample_batch", real_sample_batch)

    assert checkpoint_steps(out) == [4, 8]
    assert [r["step"] for r in train_lines(out)] == list(range(1, 10))  # step 9 is logged but not saved

    result = run_tiny(text_file, out, cache_dir, resume=True, **RESUME_OPTIONS)
    assert result.step == N_STEPS and result.tokens == json.loads(
        (reference / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())["tokens"]
    assert result.stopped_by == "max_steps"
    # Wall-clock time counts across sessions: the final state includes the first session's time.
    elapsed_8 = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())["elapsed"]
    elapsed_12 = json.loads((out / "checkpoints" / "step_00000012" / "trainer_state.json").read_text())["elapsed"]
    assert 0 < elapsed_8 < elapsed_12 <= result.elapsed

    # Steps 9.. were redone from the step-8 checkpoint: no duplicated metrics lines, identical values.
    ref_lines, got_lines = train_lines(reference), train_lines(out)
    assert [r["step"] for r in got_lines] == list(range(1, N_STEPS + 1))
    assert [_training_record(r) for r in got_lines] == [_training_record(r) for r in ref_lines]
    assert [(e["step"], e["val_loss"], e["val_bpb"]) for e in eval_lines(out)] == [
        (e["step"], e["val_loss"], e["val_bpb"]) for e in eval_lines(reference)]

    assert_same_weights(latest_weights(out), latest_weights(reference))
    _assert_same_optimizer(_optimizer_state(out), _optimizer_state(reference))
    assert json.loads((out / "checkpoints" / "step_00000012" / "scheduler.json").read_text()) == json.loads(
        (reference / "checkpoints" / "step_00000012" / "scheduler.json").read_text())
    # Every intermediate checkpoint matches too (the resumed run re-saved 12 only; 4 and 8 are the originals).
    for step in (4, 8):
        a = megalodon_lm.load_run(out, step=step)[0].state_dict()
        b = megalodon_lm.load_run(reference, step=step)[0].state_dict()
        assert_same_weights(a, b)


def test_resume_after_stop_signal_in_process(tmp_path, reference, text_file, cache_dir, monkeypatch):
    """A stop request (SIGTERM) after step 6: the run saves step 6, reports "signal", and resumes exactly."""
    import os

    from megalodon_lm.training import metrics as metrics_module

    out = tmp_path / "run"
    real_log = metrics_module.MetricsLogger.log

    def log_then_signal(self, record):
        real_log(self, record)
        if record.get("step") == 6 and "loss" in record:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics_module.MetricsLogger, "log", log_then_signal)
    previous_handler = signal.getsignal(signal.SIGTERM)
    first = run_tiny(text_file, out, cache_dir, **RESUME_OPTIONS)
    monkeypatch.setattr(metrics_module.MetricsLogger, "log", real_log)
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # the trainer restored the handler
    assert first.stopped_by == "signal" and first.step == 6
    assert checkpoint_steps(out) == [4, 6]

    second = run_tiny(text_file, out, cache_dir, resume=True, **RESUME_OPTIONS)
    assert second.step == N_STEPS and second.stopped_by == "max_steps"
    assert [_training_record(r) for r in train_lines(out)] == [_training_record(r) for r in train_lines(reference)]
    assert_same_weights(latest_weights(out), latest_weights(reference))


def test_resume_with_a_longer_max_steps_is_not_silently_ignored(tmp_path, text_file, cache_dir):
    """Continuing a finished 4-step run with --max-steps 6 either trains to step 6 or refuses clearly.

    What must not happen is a "successful" resume that trains nothing because the checkpoint's horizon won.
    """
    out = tmp_path / "run"
    options = dict(RESUME_OPTIONS, max_steps=4, save_every=2, warmup_steps=1)
    first = run_tiny(text_file, out, cache_dir, **options)
    assert first.step == 4
    options["max_steps"] = 6
    try:
        second = run_tiny(text_file, out, cache_dir, resume=True, **options)
    except ValueError as err:  # refusing is fine, with a message naming the option
        assert "max-steps" in str(err) or "max_steps" in str(err)
        return
    assert second.step == 6, f"resume with max_steps=6 stopped at step {second.step}"


# ---------------------------------------------------------------------- SIGTERM to the CLI
def _wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended before it could be interrupted (rc {proc.returncode}):\n{out}\n{err}")
        if metrics.is_file() and len(train_lines(metrics.parent)) >= n:
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no training steps logged in time")


def test_sigterm_then_resume_via_cli_is_bitwise_identical(tmp_path, text_file, cache_dir):
    max_steps = 100
    options = tiny_options(text_file, tmp_path / "unused", cache_dir, max_steps=max_steps, save_every=25,
                           keep_last=10, eval_every=50, warmup_steps=5, log_every=1, eval_tokens=64,
                           max_time="8m", progress="plain")
    for key in ("out", "threads"):
        options.pop(key)
    config = write_toml(tmp_path / "run.toml", options)
    common = ["train", "--config", str(config), "--threads", "1", "--max-time", "none"]

    interrupted = tmp_path / "interrupted"
    proc = cli_popen(*common, "--out", str(interrupted))
    try:
        _wait_for_steps(proc, interrupted / "metrics.jsonl", 3)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    stopped = train_lines(interrupted)[-1]["step"]
    assert 3 <= stopped < max_steps, "the run was not interrupted part-way"
    assert f"stopped by signal at step {stopped} " in stdout
    # A checkpoint exactly where it stopped, and `latest` points at it.
    assert (interrupted / "checkpoints" / f"step_{stopped:08d}" / "model.safetensors").is_file()
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    state = json.loads((interrupted / "checkpoints" / f"step_{stopped:08d}" / "trainer_state.json").read_text())
    assert state["step"] == stopped
    assert "Traceback" not in stderr

    resumed = cli(*common, "--out", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"stopped by max_steps at step {max_steps} " in resumed.stdout

    reference = tmp_path / "reference"
    ref = cli(*common, "--out", str(reference))
    assert ref.returncode == 0, ref.stderr

    got, want = train_lines(interrupted), train_lines(reference)
    assert [r["step"] for r in got] == list(range(1, max_steps + 1))
    assert [_training_record(r) for r in got] == [_training_record(r) for r in want]
    assert_same_weights(latest_weights(interrupted), latest_weights(reference))
    _assert_same_optimizer(_optimizer_state(interrupted), _optimizer_state(reference))
