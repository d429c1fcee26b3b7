"""Bad distributed setups fail with a clear error on every rank, never a hang (every launch has a timeout)."""

from __future__ import annotations

import time

import pytest
from training.conftest import tiny_options

import megalodon_lm

from .launch import errors, run_ranks
from .workers import dying_worker, per_rank_train_worker


def test_mismatched_configuration_is_named(tmp_path, text_file, cache_dir):
    base = tiny_options(text_file, tmp_path / "run", cache_dir, max_steps=2, warmup_steps=0)
    codes = run_ranks(per_rank_train_worker, 2, tmp_path / "logs", [base, {**base, "lr": 1e-3}], timeout=120)
    assert codes == [1, 1]
    assert "rank 1's configuration differs from rank 0's in: lr" in errors(tmp_path / "logs")
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_chunk_split(tmp_path, text_file, cache_dir):
    # seq_len 32 with chunk_size 16 and K = 2 is fine; 40 is not a multiple of 2 x 16.
    opts = tiny_options(text_file, tmp_path / "run", cache_dir, max_steps=2, warmup_steps=0, seq_len=40,
                        chunk_parallel=2)
    codes = run_ranks(per_rank_train_worker, 2, tmp_path / "logs", [opts, opts], timeout=120)
    assert codes == [1, 1]
    assert "--seq-len 40 must be divisible by --chunk-parallel x chunk_size = 2 x 16 = 32" in errors(tmp_path / "logs")
    assert not (tmp_path / "run").exists()


def test_chunk_parallel_needs_torchrun(tmp_path, text_file, cache_dir):
    with pytest.raises(ValueError, match="--chunk-parallel needs several processes: launch with torchrun"):
        megalodon_lm.train(None, **tiny_options(text_file, tmp_path / "run", cache_dir, chunk_parallel=2))
    with pytest.raises(ValueError, match="--parallel must be auto, ddp, fsdp or none"):
        megalodon_lm.train(None, **tiny_options(text_file, tmp_path / "run", cache_dir, parallel="zero3"))


def test_dead_rank_is_an_error_not_a_hang(tmp_path):
    t0 = time.monotonic()
    codes = run_ranks(dying_worker, 2, tmp_path, timeout=120, dist_timeout=20)
    assert codes[1] == 3
    assert codes[0] == 1, f"rank 0 did not fail cleanly: exit code {codes[0]}"  # None would mean killed (a hang)
    assert "Error" in errors(tmp_path)
    assert time.monotonic() - t0 < 100
