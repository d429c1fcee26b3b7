"""`--max-time`: one wall-clock budget for the whole job, the final evaluation, checkpoint and sample included.

The budget counts across resumes (a checkpoint carries the time spent so far). Training stops early enough that
what follows it fits: the final evaluation (the measured duration of an earlier one, or early in the run the
time of one evaluation batch scaled to the whole evaluation), the text sample (a measured per-token decode
time) and a margin of 2% for the checkpoint, the plot and timing noise. The same estimates size the schedule's
horizon and the progress bar's total, and `--resume` uses the ones saved with the checkpoint. When the budget
is too short even for that (a machine much slower than the budget assumed), the final evaluation scores only
the tokens that still fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

MARGIN_FRACTION = 0.02  # of the budget: checkpoint writes, the plot, noise in the estimates
PROBE_TOKENS = 8  # tokens generated to time the end-of-training sample


@dataclass
class TimeBudget:
    """Seconds of a run's budget (None = no limit) and the measured costs that decide when training stops."""

    total: float | None
    tokens_per_step: int
    eval_tokens: int  # tokens one evaluation scores
    sample_tokens: int
    step_s: float | None = None  # seconds per optimizer step
    eval_s: float | None = None  # seconds of the last complete evaluation
    eval_token_s: float | None = None  # seconds per scored token, timed on one evaluation batch
    decode_s: float | None = None  # seconds per sampled token

    def eval_estimate(self) -> float:
        """Seconds one evaluation takes: measured, else one batch's time scaled up (0 before either)."""
        if self.eval_s is not None:
            return self.eval_s
        return self.eval_tokens * (self.eval_token_s or 0.0)

    def reserve(self) -> float:
        """Seconds kept for the end of the run: final evaluation, sample, margin."""
        if self.total is None:
            return 0.0
        return self.eval_estimate() + self.sample_tokens * (self.decode_s or 0.0) + MARGIN_FRACTION * self.total

    def left(self, elapsed: float) -> float | None:
        """Seconds of the budget not yet used (None without a budget)."""
        return None if self.total is None else self.total - elapsed

    def out_of_time(self, elapsed: float) -> bool:
        """Whether one more step would eat into the reserve."""
        return self.total is not None and elapsed + (self.step_s or 0.0) + self.reserve() >= self.total

    def eval_tokens_that_fit(self, elapsed: float) -> int:
        """Validation tokens an evaluation starting now can score within the budget (all of them without one)."""
        if self.total is None or self.eval_estimate() <= 0:
            return self.eval_tokens
        seconds = self.total - elapsed - self.sample_tokens * (self.decode_s or 0.0) - MARGIN_FRACTION * self.total
        return max(0, min(self.eval_tokens, math.floor(seconds / self.eval_estimate() * self.eval_tokens)))

    def steps_that_fit(self, elapsed: float, eval_every: int) -> int:
        """Optimizer steps that still fit, periodic evaluations included (needs a step time)."""
        if self.total is None or self.step_s is None:
            raise ValueError("steps_that_fit needs a budget and a measured step time")
        per_step = self.step_s + self.eval_estimate() / eval_every
        return max(0, math.floor((self.total - elapsed - self.reserve()) / per_step))

    def state_dict(self) -> dict[str, Any]:
        """The measured costs, saved with a checkpoint for `--resume`."""
        return {"step_time": self.step_s, "eval_time": self.eval_s, "eval_token_time": self.eval_token_s,
                "decode_time": self.decode_s}

    def load_state_dict(self, state: dict[str, Any], elapsed: float, step: int) -> None:
        """Measured costs from a checkpoint's trainer state; a checkpoint without them gives elapsed / step."""
        self.step_s = state.get("step_time") or (elapsed / step if step else None)
        self.eval_s = state.get("eval_time")
        self.eval_token_s = state.get("eval_token_time")
        self.decode_s = state.get("decode_time")


# Each probe runs once untimed first: a first call pays one-off costs (measured 7x the steady per-token decode
# time for `mini` on a busy 2-core machine) that would make the budget keep far too much time in reserve.
def measure_eval(evaluate_fn, n_tokens: int, warmup_tokens: int) -> float:
    """Seconds per scored token of `evaluate_fn(n_tokens)` (one batch of validation windows), after a warm-up."""
    evaluate_fn(warmup_tokens)
    start = time.perf_counter()
    evaluate_fn(n_tokens)
    return (time.perf_counter() - start) / max(1, n_tokens)


def measure_decode(sample_fn, n_tokens: int = PROBE_TOKENS) -> float:
    """Seconds per token of `sample_fn(n_tokens)` after a warm-up, with the RNG state restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        sample_fn(2)
        start = time.perf_counter()
        sample_fn(n_tokens)
        return (time.perf_counter() - start) / n_tokens
