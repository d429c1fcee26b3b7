"""The lean training path: store only what the backward needs, recompute cheap element-wise work.

Autograd keeps the output of every small operation it differentiates: a MEGA sub-layer of `tiny` stored
about 66 KB per token (more than a same-size Llama's whole layer). Most of those tensors are cheap to
rebuild from a few inputs. The layer is therefore cut into regions whose boundaries are tensors that
must be stored anyway (the inputs of the matrix products), and each region keeps only its inputs:

* `recompute(fn, *args)`: run `fn` without storing its intermediates; the backward runs it again with
  autograd on and differentiates that. Bitwise the same forward (same ops, same order), dropout
  included (the RNG state is restored for the replay). Used for TimestepNorm, CEMA + RMSNorm and
  the attention region.
* `prologue_linear(fn, inputs, weight)`: `F.linear(fn(*inputs), weight)` storing `inputs`, not
  `fn`'s output; the backward rebuilds that output (element-wise only, no matrix product is
  repeated). Used for the gate before `wh2` and the SiLU before `fc2`.

`MEGALODON_TRAIN_PATH=autograd` turns the lean path off (plain autograd, the previous behaviour);
the default `lean` is used whenever gradients are being recorded (outside torch.compile). Both give
the same numbers: the forward is the same sequence of operations and the backward differentiates the
same expressions.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..ops._replay import input_grads, replay_leaves

TRAIN_PATHS = ("lean", "autograd")


def train_path() -> str:
    """MEGALODON_TRAIN_PATH: 'lean' (default) or 'autograd'."""
    path = os.environ.get("MEGALODON_TRAIN_PATH", "lean")
    if path not in TRAIN_PATHS:
        raise ValueError(f"MEGALODON_TRAIN_PATH must be one of {TRAIN_PATHS}, got {path!r}")
    return path


def lean_active() -> bool:
    """True when gradients are recorded and the lean path is selected (inference needs no saving).

    Not under torch.compile: Inductor fuses the element-wise chains and chooses what to recompute itself,
    and the regions' Python-level autograd would break its graph."""
    return torch.is_grad_enabled() and train_path() == "lean" and not torch.compiler.is_compiling()


def recompute(fn: Callable, *args):
    """fn(*args) storing only `args` for the backward (non-reentrant checkpoint of one region).

    Nests inside whole-block activation checkpointing. The RNG state is saved and restored so that a
    dropout inside `fn` draws the same mask in the replay."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)


class _RngSnapshot:
    """CPU (and current CUDA device) generator states, to replay a dropout exactly."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        """Run the block from the saved states; the caller's generators are left as they were."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _PrologueLinear(torch.autograd.Function):
    """out = fn(*inputs) @ weight^T, saving inputs and weight only (see `prologue_linear`)."""

    @staticmethod
    def forward(ctx, fn, stochastic, weight, *inputs):
        ctx.fn = fn
        ctx.rng = _RngSnapshot(inputs[0].device) if stochastic else None
        with torch.no_grad():
            e = fn(*inputs)
            out = F.linear(e, weight)
        ctx.save_for_backward(weight, *inputs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        leaves = replay_leaves(inputs, needs)
        with contextlib.nullcontext() if ctx.rng is None else ctx.rng.replay(), torch.enable_grad():
            e = ctx.fn(*leaves)
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t().mm(e.detach().reshape(-1, e.shape[-1]))
        grads: list[torch.Tensor | None] = [None] * len(leaves)
        if any(needs):
            grads = input_grads((e,), leaves, needs, (grad_out.matmul(weight.to(grad_out.dtype)),))
        return (None, None, grad_weight, *grads)


def with_dropout(fn: Callable, p: float) -> Callable:
    """fn followed by dropout(p) in training mode: a prologue for `prologue_linear(..., stochastic=True)`."""
    return lambda *inputs: F.dropout(fn(*inputs), p, True)


def prologue_linear(fn: Callable, inputs: Sequence[torch.Tensor], weight: torch.Tensor,
                    stochastic: bool = False) -> torch.Tensor:
    """F.linear(fn(*inputs), weight) (no bias) that stores `inputs` instead of fn's output.

    fn: element-wise (cheap to replay); stochastic=True when it draws random numbers (dropout), so the
    backward replays it from the same RNG state. Under autocast, use the plain expression instead."""
    if torch.is_autocast_enabled(inputs[0].device.type):
        return F.linear(fn(*inputs), weight)
    return _PrologueLinear.apply(fn, stochastic, weight, *inputs)
