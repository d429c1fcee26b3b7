"""Session-wide test setup.

Triton's CPU interpreter is chosen when `triton` (its standard library included) and the kernels are first
decorated, i.e. at import time, and other tests (transformers, via torch) import triton early. So on a
machine without CUDA, TRITON_INTERPRET=1 is set here, before any test module is collected, for the Triton
kernel tests in tests/ops to run on CPU tensors. No other code path reads it: `auto` dispatch never picks
Triton for CPU tensors, and no test compiles Triton code through inductor on CPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
