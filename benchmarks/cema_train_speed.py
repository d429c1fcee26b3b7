"""CEMA training cost: `cema_chunked` differentiated by autograd ("chunk", the previous path) vs
`cema_chunked_fn` with its hand-written backward ("chunk_fn", the default when gradients are recorded).

    python benchmarks/cema_train_speed.py                  # L = 512, 2K, 8K at 1 and 2 threads
    python benchmarks/cema_train_speed.py --quick          # smoke run

Shape: the `tiny` preset's CEMA, B=1, D=384, N=16, fp32, each path at its default block size. "fwd+bwd":
cema_coefficients from the raw parameters, the forward with autograd, and torch.autograd.grad of a random
output gradient w.r.t. x and the five raw parameters (as in a training step). "fwd": the same forward under
torch.no_grad. Within one (threads, L) the four cases alternate call by call, so drift on a shared machine
hits all of them; the table gives medians of --repeats calls after --warmup calls, and old/new ratios.
Both paths are checked to agree first (max relative gradient difference, printed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import RESULTS_DIR, fill_defaults, fmt, fmt_len, median, parse_lengths, print_table, save_json, system_info

from megalodon_lm.ops import cema_chunked, cema_chunked_fn, cema_coefficients
from megalodon_lm.ops.cema.chunk import default_block_size
from megalodon_lm.ops.cema.chunk_fn import block_size_fn

D, N = 384, 16
PATHS: dict[str, Callable] = {"chunk": cema_chunked, "chunk_fn": cema_chunked_fn}


def make_cases(L: int, gen: torch.Generator) -> tuple[dict[str, Callable[[], Any]], float]:
    """Closures for (path, mode) at length L, and the max relative gradient difference between the paths."""
    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).requires_grad_()

    alpha, delta = rnd(D, N, 1, std=0.2), rnd(D, N, 1, std=0.2)
    freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D).clamp(max=1 - 1e-6)
    theta = torch.logit(freqs).float().view(D, 1, 1).requires_grad_()
    gamma, omega = rnd(D, N, 2), rnd(D, 1, std=0.25)
    x = rnd(1, L, D)
    gy = torch.randn(1, L, D, generator=gen)
    leaves = [x, alpha, delta, theta, gamma, omega]

    def fwd_bwd(fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            y, _ = fn(x, cema_coefficients(alpha, delta, theta, gamma, omega))
            return torch.autograd.grad(y, leaves, gy)
        return run

    def fwd(fn: Callable) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return fn(x, cema_coefficients(alpha, delta, theta, gamma, omega))[0]
        return run

    cases = {}
    for name, fn in PATHS.items():
        cases[(name, "fwd+bwd")] = fwd_bwd(fn)
        cases[(name, "fwd")] = fwd(fn)
    g_old, g_new = cases[("chunk", "fwd+bwd")](), cases[("chunk_fn", "fwd+bwd")]()
    diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(g_new, g_old, strict=True))
    return cases, diff


def measure(cases: dict[Any, Callable[[], Any]], warmup: int, repeats: int) -> dict[Any, list[float]]:
    """Warm-up calls, then `repeats` rounds calling every case once per round (alternating)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[Any, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=None, help="default 512,2K,8K (quick: 256)")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, run in turn")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case (default 2, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: L=256, 2 rounds, 1 warm-up")
    p.add_argument("--out", default=str(RESULTS_DIR / "cema_train_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        return fill_defaults(args, dict(lengths="256", repeats=2, warmup=1))
    return fill_defaults(args, dict(lengths="512,2K,8K", repeats=9, warmup=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    lengths = parse_lengths(args.lengths)
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    gen = torch.Generator().manual_seed(args.seed)
    records, rows = [], []
    for th in threads:
        torch.set_num_threads(th)
        for L in lengths:
            cases, diff = make_cases(L, gen)
            times = measure(cases, args.warmup, args.repeats)
            med = {k: median(v) for k, v in times.items()}
            rec = {"threads": th, "length": L, "max_rel_grad_diff": diff,
                   "block_chunk": default_block_size(L), "block_chunk_fn": block_size_fn(L),  # B = 1
                   "times_s": {f"{p}/{m}": v for (p, m), v in times.items()},
                   "median_s": {f"{p}/{m}": v for (p, m), v in med.items()}}
            records.append(rec)
            fb_old, fb_new = med[("chunk", "fwd+bwd")], med[("chunk_fn", "fwd+bwd")]
            f_old, f_new = med[("chunk", "fwd")], med[("chunk_fn", "fwd")]
            rows.append([th, fmt_len(L), f"{rec['block_chunk']}/{rec['block_chunk_fn']}",
                         fmt(fb_old * 1e3, ".1f"), fmt(fb_new * 1e3, ".1f"), fmt(fb_old / fb_new, ".2f"),
                         fmt(f_old * 1e3, ".1f"), fmt(f_new * 1e3, ".1f"), fmt(f_old / f_new, ".2f"),
                         fmt(diff, ".1e")])
            print(f"  threads {th} L={fmt_len(L)}: fwd+bwd {fb_old * 1e3:.1f} -> {fb_new * 1e3:.1f} ms", flush=True)
    print_table(["threads", "L", "T old/new", "fwd+bwd old ms", "new ms", "speed-up", "fwd old ms", "new ms",
                 "speed-up", "grad rel diff"], rows,
                f"CEMA (B=1, D={D}, N={N}, fp32): chunk (autograd) vs chunk_fn (hand-written backward), "
                f"medians of {args.repeats} alternating rounds")
    res = {"system": system_info(torch.device("cpu"), threads[-1]),
           "config": {"lengths": lengths, "threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                      "D": D, "N": N, "batch_size": 1, "dtype": "float32"},
           "results": records}
    print(f"\nresults written to {save_json(args.out, res)}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
