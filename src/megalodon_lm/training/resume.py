"""What `--resume` does with a checkpoint: continue exactly, extend the run, or say there is nothing left.

A resumed run keeps its options, except that `--max-steps` and `--max-time` may be raised to train on. Given
unchanged, the saved schedule is kept, so an interrupted run continues bitwise as if never stopped. Given
changed, the schedule's horizon is recomputed at the resumed step: the new `--max-steps`, or with a time budget
the steps that fit in what is left of it (from the step, evaluation and decode times saved with the checkpoint).
The learning rate then follows the warm-up + cosine schedule of that horizon from the resumed step on (after a
finished cosine it rises again to that schedule's value, as if the run had been planned this long). When no step
fits, the plan says so in one line and the trainer exits without touching the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .budget import TimeBudget
from .config import TrainConfig
from .metrics import format_duration, parse_duration


@dataclass
class ResumePlan:
    step: int
    nothing_left: str | None = None  # the one-line reason when no step can be trained
    horizon: int | None = None  # a recomputed schedule horizon; None keeps the saved schedule
    note: str | None = None  # the line that reports a recomputed horizon


def _seconds(max_time: str | float | None) -> float | None:
    return None if max_time in (None, "", "none") else parse_duration(max_time)


def read_checkpoint_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer_state.json, scheduler.json or None) of a checkpoint directory: cheap, no tensors."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    sched_path = ckpt / "scheduler.json"
    return state, json.loads(sched_path.read_text(encoding="utf-8")) if sched_path.is_file() else None


def plan_resume(cfg: TrainConfig, run_dir: Path, state: dict[str, Any], sched: dict[str, Any] | None,
                budget: TimeBudget) -> ResumePlan:
    """Decide how a resumed run goes on; loads the saved costs into `budget`."""
    step, elapsed = int(state["step"]), float(state["elapsed"])
    budget.load_state_dict(state, elapsed, step)
    saved = json.loads((run_dir / "train_config.json").read_text(encoding="utf-8"))
    before_steps = state.get("max_steps", saved.get("max_steps"))
    before_time = state.get("max_time", saved.get("max_time"))
    horizon = int(sched["max_steps"]) if sched else int(before_steps)
    changed = cfg.max_steps != before_steps or _seconds(cfg.max_time) != _seconds(before_time)
    where = f"{run_dir} is at step {step}"
    time_left = (f"--max-time {cfg.max_time} is spent ({format_duration(elapsed)} used; it counts across "
                 "resumes): pass a larger --max-time to train on")

    if cfg.max_steps <= step or (not changed and step >= horizon):
        limit = cfg.max_steps if changed else horizon
        hint = "--max-steps" if budget.total is None else "--max-steps or --max-time"
        return ResumePlan(step, nothing_left=f"nothing to do: {where} of {limit}; pass a larger {hint} to train on")
    if budget.out_of_time(elapsed):
        return ResumePlan(step, nothing_left=f"nothing to do: {where}; {time_left}")
    if not changed:
        return ResumePlan(step)

    new = cfg.max_steps
    why = f"--max-steps {cfg.max_steps}"
    if budget.total is not None:
        fit = step + budget.steps_that_fit(elapsed, cfg.eval_every)
        if fit <= step:
            return ResumePlan(step, nothing_left=f"nothing to do: {where}; {time_left}")
        if fit < new:
            new = fit
            why = (f"--max-time {cfg.max_time}: about {fit - step} more steps fit in the "
                   f"{format_duration(budget.total - elapsed)} left")
    new = max(new, step + 1, int(sched["warmup_steps"]) if sched else 0)
    return ResumePlan(step, horizon=new, note=f"resume at step {step}: schedule horizon {horizon} -> {new} ({why})")


def record_resumed_limits(run_dir: Path, cfg: TrainConfig) -> None:
    """train_config.json follows a resume that raised --max-steps / --max-time (atomically replaced)."""
    path = run_dir / "train_config.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.update(max_steps=cfg.max_steps, max_time=cfg.max_time)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
