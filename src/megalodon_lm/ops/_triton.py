"""Optional Triton support: is it importable, and may a tensor go to a Triton kernel.

`import triton` stays out of the package's import path: a CPU-only install without triton never sees it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Probed once without importing triton (that costs a second): a plain constant, so torch.compile traces the
# dispatch below without a graph break.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the `triton` package is installed."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter (it is read when a kernel is decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def check_triton_input(x: torch.Tensor, what: str) -> None:
    """ValueError unless `x` can go to a Triton kernel: triton importable and x on CUDA (or the interpreter on)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: the triton path takes float32/bfloat16/float16 inputs, got {x.dtype}")
    if not triton_available():
        raise ValueError(f"{what}: the triton path was requested but triton is not installed (pip install triton)")
    if x.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"{what}: the triton path needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def use_triton_auto(x: torch.Tensor) -> bool:
    """The `auto` rule: Triton for CUDA tensors of a kernel dtype when triton imports, PyTorch paths otherwise."""
    return x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and triton_available()
