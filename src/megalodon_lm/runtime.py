"""Process-level settings that make long-sequence CPU training run at its real speed.

glibc returns large freed blocks to the operating system right away (allocations above 32 MiB are
served by mmap). A training step at 16K tokens frees and re-allocates gigabytes of activations, so
every step faults all of those pages in again: measured on the `tiny` preset at 16K tokens, that was
~0.8 ms of kernel time per token, about 45% of the step. `tune_cpu_allocator()` makes glibc keep
freed memory for reuse instead. It is opt-in (it changes the whole process: the peak RSS is kept
rather than returned) and a no-op where glibc is absent. jemalloc or tcmalloc via LD_PRELOAD work too.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
