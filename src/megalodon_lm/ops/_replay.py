"""Shared by the hand-written backwards that replay an element-wise prologue under autograd."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def replay_leaves(inputs: Sequence[torch.Tensor], needs: Sequence[bool]) -> list[torch.Tensor]:
    """Detached copies of saved inputs, requiring grad where the caller's input did."""
    return [t.detach().requires_grad_(n) for t, n in zip(inputs, needs, strict=True)]


def input_grads(outputs: Sequence[torch.Tensor], leaves: Sequence[torch.Tensor], needs: Sequence[bool],
                grad_outputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    """Gradients of `outputs` (given grad_outputs) for the leaves that need one; zeros where unused, None
    where not needed (the convention of autograd.Function.backward)."""
    grads: list[torch.Tensor | None] = [None] * len(leaves)
    wanted = [i for i, n in enumerate(needs) if n]
    if wanted:
        got = torch.autograd.grad(outputs, [leaves[i] for i in wanted], grad_outputs, allow_unused=True)
        for i, g in zip(wanted, got, strict=True):
            grads[i] = g if g is not None else torch.zeros_like(leaves[i])
    return grads
