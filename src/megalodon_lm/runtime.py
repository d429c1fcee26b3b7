"""Process-level settings that make long-sequence CPU training run at its real speed.

glibc returns large freed blocks to the operating system right away (allocations above 32 MiB are
served by mmap). A training step at 16K tokens frees and re-allocates gigabytes of activations, so
every step faults all of those pages in again: measured on the `tiny` preset at 16K tokens, that was
~0.8 ms of kernel time per token, about 45% of the step. `tune_cpu_allocator()` makes glibc keep
freed memory for reuse instead. It is opt-in (it changes the whole process: the peak RSS is kept
rather than returned) and a no-op where glibc is absent. jemalloc or tcmalloc via LD_PRELOAD work too.

`set_threads()` picks the torch CPU thread count of train, generate, eval (and any serving command): the
CPUs this process may actually use, never more. torch's own default is the machine's core count, which in a
container limited to fewer CPUs (a cgroup quota) or pinned to a few cores (taskset) oversubscribes them: every
parallel region then waits for threads the scheduler cannot run (docs/reliability.md §8).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from pathlib import Path

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def tune_cpu_allocator() -> bool:
    """Serve large allocations from the reusable heap and never trim it. Returns True if applied."""
    global _applied
    if _applied:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    # mallopt returns 1 on success. -1 as the trim threshold wraps to SIZE_MAX: never trim.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))
    return _applied


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # torch's choice at start-up: physical cores or OMP_NUM_THREADS


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max, then v1 cfs), None without a quota."""
    root = Path("/sys/fs/cgroup")
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, SLURM), capped by a cgroup CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def default_threads() -> int:
    """The default thread count: OMP_NUM_THREADS when set, else min(torch's default, `available_cpus()`)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, min(_TORCH_DEFAULT_THREADS, available_cpus()))


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """ValueError unless `threads` is None (the default) or an int >= 1."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{flag} must be an integer >= 1, got {threads!r}")


def set_threads(threads: int | None = None, flag: str = "--threads") -> int:
    """Set torch's CPU thread count to `threads`, or to `default_threads()` when None; returns the count."""
    check_threads(threads, flag)
    n = default_threads() if threads is None else threads
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def add_threads_argument(parser, default_help: str = "") -> None:
    """Add `--threads N` to an argparse parser (generate, eval, serving commands); apply it with `set_threads`."""
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads [the CPUs this process may use: its affinity mask, capped by a "
                             f"cgroup CPU quota, or OMP_NUM_THREADS{default_help}]")


_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def bound_cpu_allocator(mmap_threshold: int = 256 * 1024, arenas: int = 2) -> bool:
    """For long-running servers (`megalodon-lm serve`): keep glibc's footprint from creeping up.

    Allocations above `mmap_threshold` bytes get mappings of their own, returned to the system when freed
    (glibc otherwise raises the threshold after such frees and serves later large tensors from its heaps,
    where freed blocks of varying sizes stay resident); at most `arenas` malloc arenas. Process-wide, the
    opposite trade of `tune_cpu_allocator`; a no-op where glibc is absent. Returns True if applied.
    """
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_ARENA_MAX, arenas))


def release_free_memory() -> bool:
    """Return glibc's free heap pages to the system (malloc_trim); False where glibc is absent."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
