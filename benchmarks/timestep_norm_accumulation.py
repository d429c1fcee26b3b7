"""TimestepNorm's prefix sums: float64 accumulation (what we ship) against float32, plain and blocked.

    python benchmarks/timestep_norm_accumulation.py

Precision: the 64K-token case of tests/ops/test_timestep_norm.py (x ~ 50 + N(0, 1), float32 inputs, max abs
error of y and of the final mean against the float64 Welford loop; the test's limit is 1e-4). Speed: forward +
backward of the lean TimestepNorm at the `tiny` shape (B=1, D=384, G=32), alternating the accumulators, medians.
Blocked = float32 cumulative sums inside blocks of 256 tokens, block totals carried in float64.
"""

from __future__ import annotations

import importlib
import statistics
import time

import torch
from _common import print_table

from megalodon_lm.ops.timestep_norm import timestep_norm_naive, timestep_norm_prefix, timestep_norm_prefix_fn

# ops/__init__ re-exports the function `timestep_norm`, which shadows the subpackage's attribute path.
prefix = importlib.import_module("megalodon_lm.ops.timestep_norm.prefix")
BLOCK = 256
_cumsum = torch.cumsum


def blocked_cumsum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 cumsum within blocks of BLOCK along dim 1, block offsets accumulated in float64."""
    if dim != 1:
        return _cumsum(t, dim)
    B, L = t.shape[:2]
    nb = -(-L // BLOCK)
    pad = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, nb * BLOCK - L))
    blocks = pad.view(B, nb, BLOCK, *t.shape[2:]).float()
    inner = _cumsum(blocks, 2)
    offsets = _cumsum(inner[:, :, -1].double(), 1) - inner[:, :, -1].double()
    out = inner.double() + offsets.unsqueeze(2)
    return out.view(B, nb * BLOCK, *t.shape[2:])[:, :L].to(t.dtype)


def with_accumulator(name: str, fn):
    """Run fn with prefix sums in float64, float32 or blocked float32."""
    old_acc, old_cumsum = prefix.ACC, torch.cumsum
    try:
        if name == "float32":
            prefix.ACC = torch.float32
        elif name == "blocked float32":
            prefix.ACC = torch.float32
            torch.cumsum = blocked_cumsum
        return fn()
    finally:
        prefix.ACC, torch.cumsum = old_acc, old_cumsum


def precision(name: str) -> tuple[float, float]:
    B, L, D, G = 1, 65_536, 32, 4
    g = torch.Generator().manual_seed(60)
    x = (50.0 + torch.randn(B, L, D, generator=g, dtype=torch.float64)).float()
    w = (0.2 * torch.randn(D, generator=g, dtype=torch.float64)).float()
    b = (0.2 * torch.randn(D, generator=g, dtype=torch.float64)).float()
    count, mean, var = torch.zeros(B, dtype=torch.long), torch.zeros(B, G), torch.ones(B, G)
    y, _, m, _ = with_accumulator(name, lambda: timestep_norm_prefix(x, w, b, G, 1e-5, count, mean, var))
    y64, _, m64, _ = timestep_norm_naive(x.double(), w.double(), b.double(), G, 1e-5, count, mean.double(),
                                         var.double())
    return float((y.double() - y64).abs().max()), float((m.double() - m64).abs().max())


def speed(names: list[str], L: int = 2048, repeats: int = 7) -> dict[str, float]:
    B, D, G = 1, 384, 32
    x = torch.randn(B, L, D, requires_grad=True)
    w, b = torch.zeros(D, requires_grad=True), torch.zeros(D, requires_grad=True)
    count, mean, var = torch.zeros(B, dtype=torch.long), torch.zeros(B, G), torch.ones(B, G)

    def step():
        y = timestep_norm_prefix_fn(x, w, b, G, 1e-5, count, mean, var)[0]
        y.sum().backward()

    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = time.perf_counter()
            with_accumulator(n, step)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> None:
    names = ["float64", "float32", "blocked float32"]
    t = speed(names)
    rows = []
    for n in names:
        ey, em = precision(n)
        rows.append([n, f"{ey:.2e}", f"{em:.2e}", "yes" if max(ey, em) <= 1e-4 else "no", f"{t[n] * 1e3:.1f}"])
    print_table(["accumulator", "64K max |y err|", "64K max |mean err|", "within test limit 1e-4",
                 "tiny 2K fwd+bwd ms"], rows, "TimestepNorm prefix-sum accumulation")


if __name__ == "__main__":
    main()
