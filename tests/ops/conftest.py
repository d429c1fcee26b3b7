"""Shared fixtures for the ops tests: location of the shared golden vectors."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository is /work/main and the shared material lives beside it, in /work/shared.
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GOLDEN = SHARED / "testdata" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of the golden float64 vectors; skips the test when ../shared is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"shared golden vectors not found at {GOLDEN} (../shared absent)")
    return GOLDEN


@pytest.fixture(scope="module")
def triton_device():
    """Device for the Triton kernel tests: CUDA when present, else CPU under Triton's interpreter.

    The interpreter is chosen when a kernel is decorated (import time), so the kernel modules are
    (re)loaded with TRITON_INTERPRET=1 set; the variable stays set for the module's tests (the dispatch
    checks it) and is restored afterwards. Skips when triton is not installed.
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
    from triton.runtime.interpreter import InterpretedFunction

    for name in ("megalodon_lm.ops.cema.triton_kernels", "megalodon_lm.ops.timestep_norm.triton_kernels"):
        module = sys.modules.get(name) or importlib.import_module(name)
        if not isinstance(next(v for k, v in vars(module).items() if k.endswith("_kernel")), InterpretedFunction):
            importlib.reload(module)
    try:
        yield torch.device("cpu")
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
