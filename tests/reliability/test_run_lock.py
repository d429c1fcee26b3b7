"""One writer per run directory: a second writer is refused in one line naming the holder's pid, before it writes
anything; a dead holder's lock is taken over; a save removes only its own (and dead processes') debris; readers
take no lock; under torchrun rank 0 locks and every rank learns the outcome."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from training.conftest import cli_env

from megalodon_lm.training.checkpoint import load_run, save_checkpoint
from megalodon_lm.training.run_lock import LOCK_FILE, RunLock, RunLockedError, lock_run_dir

from .helpers import STEPS, one_error_line, run_cli, train_argv, tree

pytestmark = pytest.mark.usefixtures("single_thread")

# run_lock.py loaded on its own (it needs nothing else of the package), so the holder starts in milliseconds
_HOLDER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
    run_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_lock)
    run_lock.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock (the way a running `train` holds it)."""
    import megalodon_lm.training.run_lock as run_lock

    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), run_lock.__file__],
                            stdout=subprocess.PIPE, text=True, env=cli_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_then_a_dead_holders_lock_is_taken_over(run_copy, text_file, cache_dir, capsys):
    before = tree(run_copy)
    holder = _hold_lock(run_copy)
    try:
        # a finished run extended by two steps: a resume that has something to write
        code, _, err = run_cli(train_argv(text_file, run_copy, cache_dir, resume=True, max_steps=STEPS + 2), capsys)
        assert code == 2
        one_error_line(err, rf"run directory .* is in use by another megalodon-lm process \(pid {holder.pid}\)")
        after = tree(run_copy)
        after.pop(LOCK_FILE), before.pop(LOCK_FILE)  # the file stays; only the holder's pid in it changes
        assert after == before  # nothing written: no checkpoint, metrics or config touched
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): its lock file still names it, and the next writer takes the lock over.
    assert (run_copy / LOCK_FILE).read_text().split()[0] == str(holder.pid)
    with RunLock(run_copy):
        assert (run_copy / LOCK_FILE).read_text().split()[0] == str(os.getpid())


def test_two_writers_in_one_process_and_release(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


def test_readers_need_no_lock(finished_run, capsys):
    with RunLock(finished_run):
        model, _ = load_run(finished_run)
        code, out, err = run_cli(["generate", str(finished_run), "--prompt", "the", "--max-new-tokens", "3",
                                  "--threads", "1"], capsys)
    assert code == 0, err


def test_a_save_removes_only_its_own_and_dead_processes_debris(tmp_path, finished_run):
    model, _ = load_run(finished_run)
    root = tmp_path / "checkpoints"
    root.mkdir()
    own = root / f".tmp-step_00000007-{os.getpid()}"
    dead = root / f".tmp-step_00000005-{_dead_pid()}"
    (tmp_path / "elsewhere").mkdir()
    live_holder = _hold_lock(tmp_path / "elsewhere")  # any live process other than this one
    live = root / f".tmp-step_00000003-{live_holder.pid}"
    unknown = root / ".tmp-notes"
    for d in (own, dead, live, unknown):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    try:
        save_checkpoint(tmp_path, 8, model, None, None, {"step": 8})
        assert not own.exists() and not dead.exists()
        assert live.exists() and unknown.exists()  # another live process's files are not ours to delete
    finally:
        live_holder.kill()
        live_holder.wait()


class _Rank:
    """What `lock_run_dir` needs of a DistributedRun: the rank's role and rank 0's broadcast."""

    def __init__(self, is_main: bool, from_rank0: int | None = None) -> None:
        self.is_main, self.from_rank0 = is_main, from_rank0

    def from_main(self, value: int) -> int:
        return value if self.is_main else self.from_rank0


def test_under_torchrun_rank0_locks_and_every_rank_agrees(tmp_path):
    lock = lock_run_dir(tmp_path / "run", _Rank(is_main=True))  # rank 0 takes the lock
    try:
        assert lock is not None and (tmp_path / "run" / LOCK_FILE).is_file()
        assert lock_run_dir(tmp_path / "other", _Rank(is_main=False, from_rank0=0)) is None  # others: no lock
        with pytest.raises(RunLockedError, match=rf"pid {os.getpid()}"):  # rank 0 of a second run is refused
            lock_run_dir(tmp_path / "run", _Rank(is_main=True))
        with pytest.raises(RunLockedError, match="pid 4242"):  # ... and its other ranks raise the same error
            lock_run_dir(tmp_path / "run", _Rank(is_main=False, from_rank0=4242))
    finally:
        lock.release()


def test_two_training_processes_cannot_share_a_run(tmp_path, text_file, cache_dir, capsys):
    """End to end: while a run directory is held, `train` on it (fresh) is refused and writes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        code, _, err = run_cli(train_argv(text_file, out, cache_dir), capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    one_error_line(err, rf"in use by .*pid {holder.pid}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    code, _, err = run_cli(train_argv(text_file, out, cache_dir), capsys)  # the holder is gone: this one runs
    assert code == 0, err
    assert sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*")) == [2, 4, STEPS]
