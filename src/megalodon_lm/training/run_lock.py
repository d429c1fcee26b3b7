"""One writer per run directory: an exclusive OS file lock on ``RUN_DIR/.lock``, held while a process writes.

Two training processes on one run directory would delete each other's checkpoints in progress and interleave
their metrics. The writer (`train`, `consolidate`, `import-hf`) therefore takes `RunLock` before its first
write and holds it until it is done; a second writer is refused in one line naming the holder's pid.

- The lock is `fcntl.flock` (``msvcrt.locking`` on Windows) on an open file: the operating system releases it
  when the holder exits, however it exits (kill -9 included), so a lock left by a dead process is simply
  taken over by the next writer; the pid in the file is only there to name the holder.
- Readers (generate, eval, export-hf) take no lock: checkpoints are published by an atomic rename, so a reader
  sees a complete checkpoint or none.
- Under torchrun only rank 0 writes the run directory's own files (configs, metrics, `latest`, the checkpoint
  rename), so only rank 0 takes the lock; `lock_run_dir` tells every rank whether rank 0 got it, so all ranks
  stop with the same error. The other ranks' shard files go into the temporary directory of the checkpoint
  rank 0 is publishing, under rank 0's lock.
- On network file systems flock works where the file system supports it (NFSv4; Lustre mounted with ``flock``).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """Another live process holds the run directory's lock."""


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError (EWOULDBLOCK) on POSIX, PermissionError on Windows
        return False
    return True


def read_holder(run_dir: str | Path) -> tuple[int | None, str | None]:
    """(pid, host) recorded by the lock's current or last holder; (None, None) when unreadable."""
    try:
        pid, _, host = (Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8").strip().partition(" ")
        return int(pid), host or None
    except (OSError, ValueError):
        return None, None


def holder_message(run_dir: Path, pid: int | None, host: str | None) -> str:
    who = "another process" if pid is None else f"another megalodon-lm process (pid {pid}"
    if pid is not None:
        who += f" on {host})" if host and host != socket.gethostname() else ")"
    return (f"run directory {run_dir} is in use by {who}: wait for it to finish, or choose another output "
            "directory")


class RunLock:
    """An exclusive, non-blocking lock on a run directory (the directory must exist). Use as a context manager
    or call `acquire` / `release`; `acquire` raises `RunLockedError` when another process holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.fd is not None:
            return self
        path = self.run_dir / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
        if not _try_lock(fd):
            os.close(fd)
            raise RunLockedError(holder_message(self.run_dir, *read_holder(self.run_dir)))
        # Ours now (a dead holder's lock was released by the OS): record who holds it, for the message above.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock still holds, only the holder's pid is not recorded
        self.fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (closing the file releases it). The file stays: removing it would race a new
        holder that opened it already."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path, drun: Any = None) -> RunLock | None:
    """Create `run_dir` if needed and lock it for this writer; returns the held lock (None on ranks != 0).

    drun: a `megalodon_lm.distributed.run.DistributedRun` under torchrun (None otherwise): rank 0 locks and
    every rank learns the outcome, raising the same `RunLockedError` when the directory is taken.
    """
    from .checkpoint import ensure_run_dir

    path = Path(run_dir)
    if drun is None:
        return RunLock(ensure_run_dir(path)).acquire()
    # 0: rank 0 holds the lock; a pid: that process holds it; -1: held, holder unknown; -2: rank 0 failed
    lock, holder, error = None, 0, None
    if drun.is_main:
        try:
            lock = RunLock(ensure_run_dir(path)).acquire()
        except RunLockedError:
            holder = read_holder(path)[0] or -1
        except ValueError as exc:
            holder, error = -2, exc
    holder = drun.from_main(holder)
    if holder == -2:
        raise error if error is not None else ValueError(f"rank 0 could not prepare the run directory {path}")
    if holder:
        raise RunLockedError(holder_message(path, holder if holder > 0 else None, None))
    return lock
