"""lr_multiplier values at the schedule's key steps, argument checks, and WarmupCosine's state."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch

from megalodon_lm.training.schedule import WarmupCosine, lr_multiplier


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.1),  # (0 + 1) / 10: the first step already trains
        (4, 0.5),
        (9, 1.0),  # warmup reaches the peak on its last step
        (10, 1.0),  # cosine starts at the peak
        (60, 0.55),  # half way: 0.1 + 0.9 * 0.5
        (110, 0.1),
        (10_000, 0.1),
    ],
)
def test_key_steps(step, expected):
    assert lr_multiplier(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) == pytest.approx(expected)


def test_shape_and_edge_cases():
    values = [lr_multiplier(s, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in pairwise(values))
    assert lr_multiplier(0, 4, 20, init_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.25)
    assert lr_multiplier(0, 0, 20) == 1.0
    assert lr_multiplier(5, 6, 6, min_lr_ratio=0.3) == 1.0
    assert lr_multiplier(6, 6, 6, min_lr_ratio=0.3) == 0.3
    assert lr_multiplier(50, 10, 110, min_lr_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(step=-1),
        dict(step=1.5),
        dict(warmup_steps=-1),
        dict(max_steps=0),
        dict(warmup_steps=200),
        dict(min_lr_ratio=1.5),
        dict(init_ratio=-0.1),
        dict(warmup_steps=True),
    ],
)
def test_invalid_arguments(kwargs):
    args = {"step": 0, "warmup_steps": 10, "max_steps": 100, **kwargs}
    with pytest.raises(ValueError):
        lr_multiplier(**args)


def test_warmup_cosine_apply_and_state():
    sched = WarmupCosine(3e-4, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert sched.lr(60) == pytest.approx(3e-4 * 0.55)
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}], lr=1.0)
    assert sched.apply(optimizer, 4) == pytest.approx(1.5e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1.5e-4)] * 2
    assert sched.last_step == 4

    state = json.loads(json.dumps(sched.state_dict()))
    other = WarmupCosine(1.0, warmup_steps=0, max_steps=5)
    other.load_state_dict(state)
    assert other.state_dict() == sched.state_dict()
    assert other.lr(37) == sched.lr(37)


def test_warmup_cosine_rejects_bad_settings():
    with pytest.raises(ValueError, match="base_lr"):
        WarmupCosine(0.0, 1, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1e-3, 20, 10)
    sched = WarmupCosine(1e-3, 1, 10)
    before = sched.state_dict()
    with pytest.raises(ValueError, match="missing"):
        sched.load_state_dict({"base_lr": 1.0})
    with pytest.raises(ValueError, match="max_steps"):
        sched.load_state_dict({**before, "max_steps": 0, "last_step": 3})
    assert sched.state_dict() == before
