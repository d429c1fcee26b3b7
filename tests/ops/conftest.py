"""Shared fixtures for the ops tests: location of the golden vectors, the Triton device."""

from __future__ import annotations

from pathlib import Path

import pytest

# tests/ops/conftest.py -> tests/testdata/golden (committed with the tests; see its README.md).
GOLDEN = Path(__file__).resolve().parents[1] / "testdata" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of the golden float64 vectors. They are part of the repository, so a missing file fails."""
    return GOLDEN


@pytest.fixture(scope="module")
def triton_device():
    """Device for the Triton kernel tests: CUDA when present, else CPU under Triton's interpreter.

    The interpreter is chosen when triton and a kernel are decorated (import time); tests/conftest.py sets
    TRITON_INTERPRET=1 before anything imports triton. Kernel modules imported without it are reloaded;
    triton itself cannot be, so that case fails with an explanation. Skips when triton is not installed.
    """
    import importlib
    import os
    import sys

    import torch

    from megalodon_lm.ops._triton import triton_available

    if not triton_available():
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        yield torch.device("cuda")
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.sum, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it): "
                    "its interpreter cannot run the kernels in this process")
    for name in ("megalodon_lm.ops.cema.triton_kernels", "megalodon_lm.ops.timestep_norm.triton_kernels",
                 "megalodon_lm.ops.fused.triton_kernels"):
        module = sys.modules.get(name) or importlib.import_module(name)
        if not isinstance(module.__dict__[next(k for k in vars(module) if k.endswith("_kernel"))],
                          InterpretedFunction):
            importlib.reload(module)
    try:
        yield torch.device("cpu")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
