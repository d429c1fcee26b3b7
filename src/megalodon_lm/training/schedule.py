"""Learning-rate schedule: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from typing import Any

import torch


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_schedule(warmup_steps: int, max_steps: int, min_lr_ratio: float, init_ratio: float) -> None:
    _check_int("warmup_steps", warmup_steps, 0)
    _check_int("max_steps", max_steps, 1)
    if warmup_steps > max_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed max_steps ({max_steps})")
    _check_ratio("min_lr_ratio", min_lr_ratio)
    _check_ratio("init_ratio", init_ratio)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
                  init_ratio: float = 0.0) -> float:
    """Factor on the base learning rate at optimizer step `step` (0-based).

    Warmup: init_ratio + (1 - init_ratio) * (step + 1) / warmup_steps for step < warmup_steps, so the first
    step already trains when init_ratio is 0 and step warmup_steps - 1 reaches 1. Then a cosine from 1 at
    step warmup_steps down to min_lr_ratio at max_steps, and min_lr_ratio from there on.
    """
    _check_int("step", step, 0)
    _check_schedule(warmup_steps, max_steps, min_lr_ratio, init_ratio)
    if step < warmup_steps:
        return init_ratio + (1.0 - init_ratio) * (step + 1) / warmup_steps
    if step >= max_steps:
        return float(min_lr_ratio)
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """`lr_multiplier` times a base learning rate, with a JSON-able state for checkpoints.

    `last_step` is the step most recently passed to `apply` (-1 before the first), i.e. the scheduler position.
    """

    _FIELDS = ("base_lr", "warmup_steps", "max_steps", "min_lr_ratio", "init_ratio", "last_step")

    def __init__(self, base_lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.1,
                 init_ratio: float = 0.0) -> None:
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not (
            math.isfinite(base_lr) and base_lr > 0
        ):
            raise ValueError(f"base_lr must be a positive finite number, got {base_lr!r}")
        _check_schedule(warmup_steps, max_steps, min_lr_ratio, init_ratio)
        self.base_lr = float(base_lr)
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.init_ratio = float(init_ratio)
        self.last_step = -1

    def lr(self, step: int) -> float:
        """Learning rate at optimizer step `step`."""
        return self.base_lr * lr_multiplier(step, self.warmup_steps, self.max_steps, self.min_lr_ratio,
                                            self.init_ratio)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for step `step`; returns that lr."""
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        self.last_step = step
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore settings and position; the state is validated as a whole before anything changes."""
        missing = [name for name in self._FIELDS if name not in state]
        unknown = sorted(set(state) - set(self._FIELDS))
        if missing or unknown:
            raise ValueError(f"bad WarmupCosine state: missing {missing}, unknown {unknown}")
        restored = WarmupCosine(state["base_lr"], state["warmup_steps"], state["max_steps"], state["min_lr_ratio"],
                                state["init_ratio"])
        _check_int("last_step", state["last_step"], -1)
        restored.last_step = state["last_step"]
        self.__dict__.update(restored.__dict__)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"WarmupCosine({args})"
