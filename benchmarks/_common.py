"""Shared helpers for the benchmark scripts: timing, system facts, memory probes, JSON output.

Standard library + torch only. Imported by `model_speed.py` and `ops_speed.py` (run them as scripts
from the repository root, e.g. `python benchmarks/model_speed.py`).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ---------------------------------------------------------------------------------------- parsing
def fill_defaults(args: argparse.Namespace, defaults: dict[str, Any]) -> argparse.Namespace:
    """Set each option still None (not given on the command line) to its default; returns args."""
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def parse_lengths(text: str) -> list[int]:
    """'1K,4K,16K' or '1024,4096' -> [1024, 4096, ...]; K = 1024, M = 1024**2; '' -> []."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = 1
        if part.endswith("K"):
            mult, part = 1024, part[:-1]
        elif part.endswith("M"):
            mult, part = 1024 * 1024, part[:-1]
        out.append(int(float(part) * mult))
    return out


def fmt_len(n: int) -> str:
    """1024 -> '1K', 65536 -> '64K', 300 -> '300'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------- device
def pick_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return torch.device(name)


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads or all available cores); returns the count used."""
    n = threads if threads and threads > 0 else available_cores()
    torch.set_num_threads(n)
    return n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of one call, synchronising the device before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_repeated(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """`warmup` untimed calls, then `repeats` timed calls; returns the list of seconds."""
    for _ in range(warmup):
        fn()
    return [time_call(fn, device) for _ in range(repeats)]


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


# ---------------------------------------------------------------------------------------- system
def cpu_model() -> str:
    """'model name' from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    """HEAD commit of the repository (with '+dirty' when the work tree has changes), or None."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def system_info(device: torch.device, threads: int) -> dict[str, Any]:
    """Facts that a result needs to be comparable: versions, hardware, threads, date."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "torch_num_threads": threads,
        "cpu_cores_available": available_cores(),
        "cpu_model": cpu_model(),
        "git_revision": git_revision(),
        "argv": sys.argv,
    }
    try:
        import megalodon_lm

        info["megalodon_lm"] = megalodon_lm.__version__
    except ImportError:  # pragma: no cover
        info["megalodon_lm"] = None
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    """A 'Field:  N kB' line of /proc/self/status, in bytes (None where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident set size now (VmRSS), Linux only."""
    return _status_kib("VmRSS")


def max_rss_bytes() -> int:
    """Peak resident set size since start or the last `reset_peak_rss` (VmHWM; ru_maxrss as fallback)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def trim_and_reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc malloc_trim) and reset the peak RSS to the current RSS.

    Resetting uses `echo 5 > /proc/self/clear_refs` (Linux >= 4.0). Returns False when the reset is
    unavailable, in which case the peak includes everything since the process started.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_probe(script: Path, args: list[str], timeout: float | None = None) -> dict[str, Any] | None:
    """Run `python script *args` in a fresh process; it must print one JSON object as its last line."""
    cmd = [sys.executable, str(script), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": f"unparsable probe output: {lines[-1][:200]}"}


# ---------------------------------------------------------------------------------------- output
def save_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, creating the folder; returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    return p


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    """Plain fixed-width table on stdout (first column left-aligned, others right-aligned)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    if title:
        print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(line(r))
    sys.stdout.flush()
