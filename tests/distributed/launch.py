"""Run a test function in N local processes (gloo on CPU) with a hard timeout, so a failure never hangs CI.

Each rank gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), one CPU thread
and a short collective timeout; an exception in a rank is written to `<out>/error_rank<r>.txt`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable, rank: int, world: int, port: int, out: str, dist_timeout: float, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MEGALODON_DIST_TIMEOUT=str(dist_timeout),
                      OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world, Path(out), *args)
    except BaseException:  # noqa: B036 - report anything, including SystemExit from the CLI
        (Path(out) / f"error_rank{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, out: Path, *args: Any, timeout: float = 120,
              dist_timeout: float = 60) -> list[int | None]:
    """Start `fn(rank, world, out, *args)` in `world` processes; returns their exit codes (None = killed at
    the timeout). Ranks still alive at `timeout` seconds are killed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(out), dist_timeout, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    codes: list[int | None] = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(Path(out).glob("error_rank*.txt")))


def check_ok(codes: list[int | None], out: Path) -> None:
    assert all(c == 0 for c in codes), f"exit codes {codes}\n{errors(out)}"
