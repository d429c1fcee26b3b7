"""Speed of the sequence ops: CEMA (chunked scan per block size, chunk_fn with its hand-written backward, FFT,
naive, Triton), TimestepNorm (prefix vs naive vs Triton) and chunk attention (SDPA path vs naive), forward and
forward+backward, with a bandwidth estimate. The Triton rows run only on CUDA with triton installed (a note says
why they are absent otherwise).

    python benchmarks/ops_speed.py            # L = 1K, 4K, 16K
    python benchmarks/ops_speed.py --quick    # smoke run

Shapes are the `tiny` preset's: B=1, D=384, N=16 (CEMA), G=32 (TimestepNorm), C=256, H=2, dz=64, dv=384
(attention). "fwd" runs under torch.no_grad (inference); "fwd+bwd" runs the forward with autograd and
torch.autograd.grad of a random output gradient w.r.t. the input(s) and parameters. For CEMA the
coefficient computation (cema_coefficients) is inside the timed region, as in the model. Times are
medians of --repeats calls after --warmup calls. GB/s = bytes of the inputs and outputs (fwd+bwd:
also the output and input gradients) / median time: a lower bound on the memory traffic, useful to
compare implementations, not a hardware roofline.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    fill_defaults,
    fmt,
    fmt_len,
    median,
    parse_lengths,
    pick_device,
    print_table,
    save_json,
    set_threads,
    system_info,
    time_repeated,
)

from megalodon_lm.ops import (
    cema_chunked,
    cema_chunked_fn,
    cema_coefficients,
    cema_fft,
    cema_naive,
    cema_triton,
    chunk_attention,
    chunk_attention_naive,
    rope_inverse_frequencies,
    timestep_norm_naive,
    timestep_norm_prefix,
    timestep_norm_triton,
)
from megalodon_lm.ops._triton import triton_available

D, N, G = 384, 16, 32
C, H, DZ, DV = 256, 2, 64, 384
BLOCKS = (16, 32, 64, 128)


@dataclass
class Case:
    """One implementation at one length: closures for fwd (no_grad) and fwd+bwd, and their byte counts."""

    op: str
    impl: str
    length: int
    fwd: Callable[[], Any]
    fwd_bwd: Callable[[], Any] | None
    bytes_fwd: int
    bytes_fwd_bwd: int


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _grad_fn(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
             gy: torch.Tensor) -> Callable[[], Any]:
    """Closure: forward with autograd, then gradients of <y, gy> w.r.t. `inputs`."""
    def run() -> Any:
        return torch.autograd.grad(fn(), inputs, gy)
    return run


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()
    return run


# ---------------------------------------------------------------------------------------- cases
def _triton_ok(device: torch.device) -> bool:
    """Triton rows need CUDA and the triton package (the CPU interpreter is far too slow to time)."""
    return device.type == "cuda" and triton_available()


def cema_cases(L: int, device: torch.device, naive_max: int, gen: torch.Generator) -> list[Case]:
    """CEMA at B=1, D=384, N=16 with reference-like random parameters."""
    def rnd(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device).requires_grad_()

    alpha, delta = rnd(D, N, 1, std=0.2), rnd(D, N, 1, std=0.2)
    freqs = torch.exp(-torch.arange(1, D + 1, dtype=torch.float64) * math.log(D) / D).clamp(max=1 - 1e-6)
    theta = torch.logit(freqs).float().view(D, 1, 1).to(device).requires_grad_()
    gamma, omega = rnd(D, N, 2), rnd(D, 1, std=0.25)
    params = [alpha, delta, theta, gamma, omega]
    x = rnd(1, L, D)
    gy = torch.randn(1, L, D, generator=gen).to(device)
    io = _nbytes(x, gy)  # x in, y out (gy has y's size)
    bytes_fwd = io + _nbytes(*params)
    bytes_bwd = 2 * io + 2 * _nbytes(*params)  # + gy in, gx out, param grads

    def coef():
        return cema_coefficients(alpha, delta, theta, gamma, omega)

    impls: dict[str, Callable[[], torch.Tensor]] = {}
    for bs in BLOCKS:
        impls[f"chunked T={bs}"] = lambda bs=bs: cema_chunked(x, coef(), block_size=bs)[0]
    impls["chunk_fn (default T)"] = lambda: cema_chunked_fn(x, coef())[0]
    impls["fft"] = lambda: cema_fft(x, coef())
    if _triton_ok(device):
        impls["triton"] = lambda: cema_triton(x, coef())[0]
    cases = [Case("cema", name, L, _no_grad(fn), _grad_fn(fn, [x, *params], gy), bytes_fwd, bytes_bwd)
             for name, fn in impls.items()]
    if L <= naive_max:
        cases.append(Case("cema", "naive", L, _no_grad(lambda: cema_naive(x, coef())[0]), None, bytes_fwd, 0))
    return cases


def norm_cases(L: int, device: torch.device, naive_max: int, gen: torch.Generator) -> list[Case]:
    """TimestepNorm at B=1, D=384, G=32 from a fresh prior (count 0, mean 0, var 1)."""
    x = torch.randn(1, L, D, generator=gen).to(device).requires_grad_()
    weight = (0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(D, generator=gen)).to(device).requires_grad_()
    count = torch.zeros(1, dtype=torch.long, device=device)
    mean, var = torch.zeros(1, G, device=device), torch.ones(1, G, device=device)
    gy = torch.randn(1, L, D, generator=gen).to(device)
    io = _nbytes(x, gy)
    bytes_fwd, bytes_bwd = io + _nbytes(weight, bias), 2 * io + 2 * _nbytes(weight, bias)

    def prefix() -> torch.Tensor:
        return timestep_norm_prefix(x, weight, bias, G, 1e-5, count, mean, var)[0]

    def naive() -> torch.Tensor:
        return timestep_norm_naive(x, weight, bias, G, 1e-5, count, mean, var)[0]

    cases = [Case("timestep_norm", "prefix", L, _no_grad(prefix), _grad_fn(prefix, [x, weight, bias], gy),
                  bytes_fwd, bytes_bwd)]
    if _triton_ok(device):
        def kernels() -> torch.Tensor:
            return timestep_norm_triton(x, weight, bias, G, 1e-5, count, mean, var)[0]

        cases.append(Case("timestep_norm", "triton", L, _no_grad(kernels), _grad_fn(kernels, [x, weight, bias], gy),
                          bytes_fwd, bytes_bwd))
    if L <= naive_max:
        cases.append(Case("timestep_norm", "naive", L, _no_grad(naive), None, bytes_fwd, 0))
    return cases


def attention_cases(L: int, device: torch.device, gen: torch.Generator) -> list[Case]:
    """Chunk attention at C=256, H=2, dz=64, dv=384 (the naive path loops over chunks only: all L)."""
    q, k = (torch.randn(1, L, H, DZ, generator=gen).to(device).requires_grad_() for _ in range(2))
    v = torch.randn(1, L, H, DV, generator=gen).to(device).requires_grad_()
    freqs = rope_inverse_frequencies(DZ, 10000.0).to(device)
    gy = torch.randn(1, L, H, DV, generator=gen).to(device)
    bytes_fwd = _nbytes(q, k, v, gy)
    bytes_bwd = 2 * bytes_fwd + _nbytes(gy)

    def fast() -> torch.Tensor:
        return chunk_attention(q, k, v, freqs, C)[0]

    def naive() -> torch.Tensor:
        return chunk_attention_naive(q, k, v, freqs, C)

    return [Case("chunk_attention", name, L, _no_grad(fn), _grad_fn(fn, [q, k, v], gy), bytes_fwd, bytes_bwd)
            for name, fn in (("sdpa (chunk_attention)", fast), ("naive", naive))]


# ---------------------------------------------------------------------------------------- running
def run_case(case: Case, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"op": case.op, "impl": case.impl, "length": case.length}
    modes = (("fwd", case.fwd, case.bytes_fwd), ("fwd_bwd", case.fwd_bwd, case.bytes_fwd_bwd))
    for mode, fn, nbytes in modes:
        if fn is None:
            rec[mode] = None
            continue
        times = time_repeated(fn, device, warmup, repeats)
        t = median(times)
        rec[mode] = {"times_s": times, "median_s": t, "bytes": nbytes, "gb_per_s": nbytes / t / 1e9}
    fb = rec["fwd_bwd"]
    print(f"  {case.op:15s} L={fmt_len(case.length):>4s} {case.impl:22s} "
          f"fwd {rec['fwd']['median_s'] * 1e3:9.2f} ms"
          + (f"   fwd+bwd {fb['median_s'] * 1e3:9.2f} ms" if fb else ""), flush=True)
    return rec


def winners(records: list[dict[str, Any]], op: str, L: int) -> dict[str, Any]:
    """Fastest implementation per mode at one length, with its speed-up over the runner-up."""
    out: dict[str, Any] = {}
    for mode in ("fwd", "fwd_bwd"):
        ranked = sorted((r[mode]["median_s"], r["impl"]) for r in records
                        if r["op"] == op and r["length"] == L and r[mode] is not None)
        if ranked:
            out[mode] = {"impl": ranked[0][1], "median_s": ranked[0][0],
                         "speedup_vs_next": ranked[1][0] / ranked[0][0] if len(ranked) > 1 else None,
                         "next": ranked[1][1] if len(ranked) > 1 else None}
    return out


def report(records: list[dict[str, Any]], lengths: list[int], win: dict[str, dict[int, Any]]) -> None:
    titles = {"cema": "CEMA (B=1, D=384, N=16)", "timestep_norm": "TimestepNorm (B=1, D=384, G=32)",
              "chunk_attention": "chunk attention (B=1, C=256, H=2, dz=64, dv=384)"}
    for op, title in titles.items():
        if not any(r["op"] == op for r in records):
            continue
        rows = []
        for L in lengths:
            for r in (r for r in records if r["op"] == op and r["length"] == L):
                f, b = r["fwd"], r["fwd_bwd"]
                mark = "".join(["F" if win[op][L].get("fwd", {}).get("impl") == r["impl"] else "",
                                "B" if win[op][L].get("fwd_bwd", {}).get("impl") == r["impl"] else ""])
                rows.append([fmt_len(L), r["impl"], fmt(f["median_s"] * 1e3, ".2f"),
                             fmt(f["gb_per_s"], ".2f"),
                             fmt(b and b["median_s"] * 1e3, ".2f"), fmt(b and b["gb_per_s"], ".2f"), mark])
        print_table(["L", "impl", "fwd ms", "fwd GB/s", "fwd+bwd ms", "fwd+bwd GB/s", "best"], rows,
                    f"{title}: medians; best: F = fastest fwd, B = fastest fwd+bwd")
        for L in lengths:
            for mode, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
                w = win[op][L].get(mode)
                if w:
                    extra = (f" ({w['speedup_vs_next']:.2f}x faster than {w['next']})" if w["next"]
                             else " (only candidate)")
                    print(f"  winner {op} L={fmt_len(L)} {label}: {w['impl']}{extra}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all available cores)")
    p.add_argument("--lengths", default=None, help="default 1K,4K,16K (quick: 512,1K)")
    p.add_argument("--ops", default="cema,timestep_norm,chunk_attention")
    p.add_argument("--naive-max-len", default="1K", help="run naive CEMA/TimestepNorm only up to this L")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10, quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 2, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: L=512,1K, 3 repeats, 1 warm-up")
    p.add_argument("--out", default=str(RESULTS_DIR / "ops_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        return fill_defaults(args, dict(lengths="512,1K", repeats=3, warmup=1))
    return fill_defaults(args, dict(lengths="1K,4K,16K", repeats=10, warmup=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    lengths = parse_lengths(args.lengths)
    naive_max = parse_lengths(args.naive_max_len)[0]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    print(f"device {device}, threads {threads}, torch {torch.__version__}, "
          f"lengths {[fmt_len(x) for x in lengths]}")
    triton_note = None
    if not _triton_ok(device):
        triton_note = ("Triton rows skipped: " + ("triton is not installed" if not triton_available()
                                                  else f"device is {device.type}, the kernels need CUDA"))
        print(triton_note)
    gen = torch.Generator().manual_seed(args.seed)
    records: list[dict[str, Any]] = []
    for L in lengths:
        cases: list[Case] = []
        if "cema" in ops:
            cases += cema_cases(L, device, naive_max, gen)
        if "timestep_norm" in ops:
            cases += norm_cases(L, device, naive_max, gen)
        if "chunk_attention" in ops:
            cases += attention_cases(L, device, gen)
        records += [run_case(c, device, args.warmup, args.repeats) for c in cases]
        del cases
    win = {op: {L: winners(records, op, L) for L in lengths} for op in ops}
    report(records, lengths, {op: win.get(op, {L: {} for L in lengths}) for op in
                              ("cema", "timestep_norm", "chunk_attention")})
    res = {"system": system_info(device, threads),
           "config": {"lengths": lengths, "ops": ops, "naive_max_len": naive_max, "repeats": args.repeats,
                      "warmup": args.warmup, "quick": args.quick, "dtype": "float32", "batch_size": 1,
                      "cema": {"D": D, "N": N, "block_sizes": list(BLOCKS)},
                      "timestep_norm": {"D": D, "G": G},
                      "chunk_attention": {"C": C, "H": H, "dz": DZ, "dv": DV}},
           "triton_note": triton_note,
           "results": records,
           "winners": {op: {str(L): w for L, w in per.items()} for op, per in win.items()}}
    print(f"\nresults written to {save_json(args.out, res)}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
