"""Grouped, causal, stateful TimestepNorm ops: naive reference, loop-free fast path, dispatch."""

from __future__ import annotations

import os

import torch

from .._triton import use_triton_auto
from .naive import timestep_norm_naive
from .prefix import timestep_norm_prefix
from .prefix_fn import timestep_norm_prefix_fn
from .triton import timestep_norm_triton  # registers the custom ops; triton is imported on first call

__all__ = ["timestep_norm", "timestep_norm_naive", "timestep_norm_prefix", "timestep_norm_prefix_fn",
           "timestep_norm_triton"]


def timestep_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    valid: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    lean: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatching TimestepNorm (see `timestep_norm_naive` for the contract).

    MEGALODON_NORM_IMPL=naive|prefix|triton forces a path. Default (auto): the Triton kernels for
    float32/bf16/fp16 CUDA inputs with float32 statistics when triton imports; elsewhere the Welford step for
    a single token, where it is the cheapest exact path, prefix sums otherwise. With cu_seqlens (packed
    documents, each from the given start state) the naive per-document loop when forced, else the segmented
    prefix sums (never Triton).
    lean=True: the prefix path with a hand-written backward that stores only x and per-group running
    statistics (`timestep_norm_prefix_fn`; same numbers).
    """
    impl = os.environ.get("MEGALODON_NORM_IMPL", "auto")
    if cu_seqlens is not None:
        path = timestep_norm_naive if impl == "naive" else timestep_norm_prefix
        return path(x, weight, bias, num_groups, eps, count, mean, var, valid, cu_seqlens)
    if impl == "triton" or (impl == "auto" and mean.dtype == torch.float32 and use_triton_auto(x)):
        return timestep_norm_triton(x, weight, bias, num_groups, eps, count, mean, var, valid)
    if impl == "naive" or (impl == "auto" and x.shape[1] == 1):
        return timestep_norm_naive(x, weight, bias, num_groups, eps, count, mean, var, valid)
    if impl not in ("auto", "prefix"):
        raise ValueError(f"MEGALODON_NORM_IMPL must be 'auto', 'naive', 'prefix' or 'triton', got {impl!r}")
    if lean:
        return timestep_norm_prefix_fn(x, weight, bias, num_groups, eps, count, mean, var, valid)
    return timestep_norm_prefix(x, weight, bias, num_groups, eps, count, mean, var, valid)
