"""benchmarks/train_efficiency.py: the clock-free counters (live-tensor peak, saved bytes) on known steps."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_efficiency import live_peak_bytes  # noqa: E402

MB = 1 << 20


def test_live_peak_counts_the_largest_moment_not_the_sum():
    kept: list[torch.Tensor] = []

    def step() -> None:
        kept.append(torch.ones(MB // 4))  # 1 MiB, alive after the step
        tmp = torch.ones(3 * MB // 4)  # 3 MiB, freed before the next allocation
        del tmp
        tmp = torch.ones(2 * MB // 4)  # 2 MiB
        del tmp

    peak = live_peak_bytes(step)
    assert 4 * MB <= peak < 4 * MB + 64 * 1024, peak  # 1 + 3 MiB at once; never 1 + 3 + 2


def test_live_peak_ignores_tensors_alive_before_the_step():
    big = torch.ones(8 * MB // 4)
    peak = live_peak_bytes(lambda: big.add_(1))
    assert peak < 64 * 1024, peak
