"""`--max-time`: one wall-clock budget for the whole job, the final evaluation, checkpoint and sample included.

The budget counts across resumes (a checkpoint carries the time spent so far). Training stops early enough that
what follows it fits: the final evaluation (the duration of an earlier one, or early in the run the time of one
evaluation batch scaled to the whole evaluation), the text sample (a timed decode of a few tokens) and a margin
of 2% for the checkpoint, the plot and timing noise. On a shared machine the speed drifts, so each cost is kept
together with the step time measured when it was taken and rescaled by the current step time (the mean of the
last few steps). The same estimates size the schedule's horizon and the progress bar's total, and `--resume`
uses the ones saved with the checkpoint. When the budget is too short even for that, the final evaluation scores
only the tokens that still fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
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
    step_s: float | None = None  # seconds per optimizer step, recent
    eval_s: float | None = None  # seconds of the last complete evaluation
    eval_token_s: float | None = None  # seconds per scored token, timed on one evaluation batch
    decode_s: float | None = None  # seconds per sampled token
    # The step time when each of the three costs above was measured (by name): they are rescaled by step_s / it.
    measured_at: dict[str, float] = field(default_factory=dict)

    def measured(self, name: str, seconds: float, step_s: float | None = None) -> None:
        """Record a cost (eval_s, eval_token_s or decode_s) with the step time of that moment (default: step_s)."""
        setattr(self, name, seconds)
        if step_s or self.step_s:
            self.measured_at[name] = step_s or self.step_s

    def _now(self, name: str) -> float:
        value, at = getattr(self, name) or 0.0, self.measured_at.get(name)
        return value * self.step_s / at if at and self.step_s else value

    def eval_estimate(self) -> float:
        """Seconds one evaluation takes now: measured, else one batch's time scaled up (0 before either)."""
        if self.eval_s is not None:
            return self._now("eval_s")
        return self.eval_tokens * self._now("eval_token_s")

    def sample_estimate(self) -> float:
        """Seconds the end-of-run sample takes now (0 before its decode time is measured)."""
        return self.sample_tokens * self._now("decode_s")

    def reserve(self) -> float:
        """Seconds kept for the end of the run: final evaluation, sample, margin."""
        if self.total is None:
            return 0.0
        return self.eval_estimate() + self.sample_estimate() + MARGIN_FRACTION * self.total

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
        seconds = self.total - elapsed - self.sample_estimate() - MARGIN_FRACTION * self.total
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
                "decode_time": self.decode_s, "costs_measured_at_step_time": dict(self.measured_at)}

    def load_state_dict(self, state: dict[str, Any], elapsed: float, step: int) -> None:
        """Measured costs from a checkpoint's trainer state; a checkpoint without them gives elapsed / step."""
        self.step_s = state.get("step_time") or (elapsed / step if step else None)
        self.eval_s = state.get("eval_time")
        self.eval_token_s = state.get("eval_token_time")
        self.decode_s = state.get("decode_time")
        self.measured_at = dict(state.get("costs_measured_at_step_time") or {})


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
