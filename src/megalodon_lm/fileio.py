"""Writing safetensors files with the same permissions as every other file we write.

safetensors creates its files with mode 0600 (owner only), while `open()` gives 0666 minus the umask (usually
0644). A run directory whose weights alone are unreadable by the group surprises whoever shares it, so every
safetensors file we write gets the ordinary mode.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def default_file_mode() -> int:
    """0666 minus the process umask: the mode `open(path, "w")` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, then the ordinary file mode (see the module docstring)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, default_file_mode())


def normalize_modes(directory: str | Path, pattern: str = "*.safetensors") -> None:
    """Give files that a library wrote into `directory` (e.g. transformers' save_pretrained) the ordinary mode."""
    mode = default_file_mode()
    for path in Path(directory).glob(pattern):
        if path.is_file():
            os.chmod(path, mode)
