"""Resume that continues: larger --max-steps / --max-time train on, nothing left exits 0 at once; stop requests
skip the evaluation; the time budget keeps room for the end of the run; the warm-up default fits short runs."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from megalodon_lm.training import trainer
from megalodon_lm.training.budget import TimeBudget
from megalodon_lm.training.config import TrainConfig, resolve_config

from .conftest import checkpoint_steps, cli, eval_lines, read_jsonl, run_tiny, tiny_options, train_lines, write_toml

pytestmark = pytest.mark.usefixtures("single_thread")

OPTIONS = dict(save_every=10, keep_last=2, eval_every=10, warmup_steps=2, log_every=1, eval_tokens=64,
               sample_tokens=0)


def _no_duplicates(run_dir: Path) -> None:
    """Every (step, kind) appears once in metrics.jsonl."""
    kinds = Counter((r["step"], "val" if "val_loss" in r else "train") for r in read_jsonl(run_dir / "metrics.jsonl"))
    assert [k for k, n in kinds.items() if n > 1] == []


def _state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


def test_resume_with_larger_max_steps_trains_on_and_nothing_left_exits(tmp_path, text_file, cache_dir):
    out = tmp_path / "run"
    first = run_tiny(text_file, out, cache_dir, max_steps=20, **OPTIONS)
    assert first.step == 20 and first.stopped_by == "max_steps"

    second = run_tiny(text_file, out, cache_dir, resume=True, max_steps=40, **OPTIONS)
    assert second.step == 40 and second.stopped_by == "max_steps"
    assert [r["step"] for r in train_lines(out)] == list(range(1, 41))
    assert [r["step"] for r in eval_lines(out)] == [10, 20, 30, 40]
    _no_duplicates(out)
    # The horizon was recomputed at step 20 and recorded: schedule, trainer state, train_config.json.
    assert json.loads((out / "checkpoints" / "step_00000040" / "scheduler.json").read_text())["max_steps"] == 40
    assert _state(out, 40)["horizons"] == [{"step": 20, "horizon": 40, "max_steps": 40, "max_time": None}]
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 40
    # The learning rate after step 20 follows the 40-step schedule: it is above the 20-step floor again.
    lrs = {r["step"]: r["lr"] for r in train_lines(out)}
    assert lrs[21] > lrs[20]

    # Nothing left: one line, exit 0, in seconds, and the run directory untouched (no evaluation, no line).
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    options = tiny_options(text_file, out, cache_dir, max_steps=40, **OPTIONS)
    options.pop("threads")
    config = write_toml(tmp_path / "run.toml", options)
    start = time.monotonic()
    done = cli("train", "--config", str(config), "--resume", "--threads", "1")
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [f"nothing to do: {out} is at step 40 of 40; pass a larger "
                                                "--max-steps to train on"]
    assert "val_loss" not in done.stdout + done.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert seconds < 60  # a process start and two small JSON reads (the machine may be busy)


def test_resume_after_the_time_budget_needs_a_larger_max_time(tmp_path, text_file, cache_dir):
    out = tmp_path / "run"
    options = dict(OPTIONS, max_steps=100_000, eval_every=100_000, save_every=100_000)
    first = run_tiny(text_file, out, cache_dir, max_time="2s", **options)
    assert first.stopped_by == "max_time" and 0 < first.step < 100_000
    spent = run_tiny(text_file, out, cache_dir, resume=True, max_time="2s", **options)
    assert spent.stopped_by == "nothing_left" and spent.step == first.step

    more = run_tiny(text_file, out, cache_dir, resume=True, max_time="5s", **options)
    assert more.stopped_by == "max_time" and more.step > first.step
    assert more.elapsed <= 5 * 1.25
    horizon = _state(out, more.step)["horizons"]
    assert len(horizon) == 1 and horizon[0]["step"] == first.step and horizon[0]["max_time"] == "5s"
    assert [r["step"] for r in train_lines(out)] == list(range(1, more.step + 1))
    assert [r["step"] for r in eval_lines(out)] == [first.step, more.step]
    _no_duplicates(out)


def test_stop_request_during_evaluation_saves_without_evaluating(tmp_path, text_file, cache_dir, monkeypatch):
    """SIGTERM while a periodic evaluation runs: it is abandoned, no val line, a checkpoint, no final evaluation."""
    out = tmp_path / "run"
    real = trainer.bytes_per_target
    calls = []

    def signal_on_first_batch(y, byte_lengths):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(y, byte_lengths)

    monkeypatch.setattr(trainer, "bytes_per_target", signal_on_first_batch)
    result = run_tiny(text_file, out, cache_dir, max_steps=20, **dict(OPTIONS, eval_every=5, eval_tokens=10**9))
    assert result.stopped_by == "signal" and result.step == 5
    assert len(calls) == 1  # the evaluation stopped after its first batch (there are dozens)
    assert eval_lines(out) == [] and result.val_loss is None
    assert checkpoint_steps(out) == [5]
    assert [r["step"] for r in train_lines(out)] == [1, 2, 3, 4, 5]


def test_time_budget_reserves_the_end_of_the_run():
    b = TimeBudget(total=100.0, tokens_per_step=1000, eval_tokens=30_000, sample_tokens=100)
    assert b.reserve() == pytest.approx(2.0) and not b.out_of_time(97.0)  # nothing measured: the 2% margin
    b.step_s, b.eval_token_s = 1.0, 0.0005  # one timed evaluation batch: 0.5 ms per scored token
    assert b.eval_estimate() == pytest.approx(15.0)
    b.decode_s = 0.05
    assert b.reserve() == pytest.approx(15.0 + 5.0 + 2.0)
    assert b.out_of_time(77.0) and not b.out_of_time(76.9)
    b.eval_s = 4.0  # a measured evaluation replaces the estimate
    assert b.steps_that_fit(50.0, eval_every=4) == 19  # (100 - 50 - (4 + 5 + 2)) / (1 + 4 / 4) = 19.5
    # Too late for a whole evaluation: the tokens that fit in what is left (2 s of the 4 s it takes).
    assert b.eval_tokens_that_fit(50.0) == 30_000 and b.eval_tokens_that_fit(91.0) == 15_000
    # A cost measured while the machine was twice as slow (step time 2 s then, 1 s now) counts half now.
    b.measured("eval_s", 4.0, step_s=2.0)
    assert b.eval_estimate() == pytest.approx(2.0)
    b.step_s = 2.0
    assert b.eval_estimate() == pytest.approx(4.0)
    assert b.sample_estimate() == pytest.approx(5.0)  # set without a step time of its own: not rescaled
    assert TimeBudget(None, 1000, 30_000, 100).reserve() == 0.0


def test_warmup_default_fits_short_runs_and_explicit_warmup_is_checked():
    assert resolve_config({"max_steps": 50}).warmup_steps == 5
    assert resolve_config({}).warmup_steps == 100
    assert resolve_config({"max_steps": 5}).warmup_steps == 0
    with pytest.raises(ValueError, match=r"--warmup-steps \(100\) must not exceed --max-steps \(50\)"):
        resolve_config({"max_steps": 50, "warmup_steps": 100})
    assert TrainConfig.warmup_steps is None  # documented default, resolved by validate()
