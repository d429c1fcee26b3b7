"""`--device` for every command: auto (the default: CUDA when available, else the CPU), cpu, cuda or cuda:N."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device for a `--device` value; ValueError for a malformed name or an absent CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was requested but CUDA is not available")
    return device
