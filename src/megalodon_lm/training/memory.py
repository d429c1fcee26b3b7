"""A memory estimate before a model is built: refuse a run that cannot fit instead of being killed mid-way.

Without it, `--preset 7B` on a 24 GB machine is killed by the kernel's OOM killer after minutes, with no
message. The estimate counts what training must hold at once:

- parameters, gradients and AdamW's two moments: 16 bytes per parameter (fp32 master weights, also with bf16
  autocast), divided by the ranks of an FSDP run;
- activations kept for the backward pass: per token and layer 2 (D + Z + E + F) floats (3 F with SwiGLU),
  plus the logits over the vocabulary. The blocks save only the inputs of their norm, CEMA and attention
  regions (modules/lean.py); the tensors autograd actually saved, counted with saved_tensors_hooks at 2K
  tokens, were 21, 55, 109 and 244 KB per token and layer at the tiny, 200M, 1.3B and 7B widths, and the
  formula gives 82-86% of that. Kernel workspaces and the allocator's slack come on top, so the estimate is
  an under-estimate: a run refused here would not have fitted. With activation checkpointing only each
  block's input is kept, plus one block's intermediates.

The available memory is the free GPU memory (`torch.cuda.mem_get_info`) or, on the CPU, MemAvailable capped by
a cgroup limit (containers). `TrainConfig.memory_check = False` (`--no-memory-check`) skips the check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import MegalodonConfig

OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW exp_avg + exp_avg_sq
_GIB = 1 << 30


@dataclass
class MemoryEstimate:
    """Bytes one process needs for training (see the module docstring for what is counted)."""

    parameters: int  # parameters, gradients and optimizer state
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.activations


def estimate_training_memory(mcfg: MegalodonConfig, batch_size: int, seq_len: int, *, bf16: bool = False,
                             activation_checkpointing: bool = False, shards: int = 1) -> MemoryEstimate:
    """Estimate the memory of one training process for `batch_size` sequences of `seq_len` tokens.

    shards: FSDP ranks the parameters and optimizer state are split over (1 for single-process and DDP runs).
    """
    D, Z, E, F = mcfg.model_dim, mcfg.z_dim, mcfg.value_dim, mcfg.ffn_hidden_dim
    per_token_layer = 2 * (D + Z + E) + (3 if mcfg.swiglu else 2) * F
    width = 2 if bf16 else 4
    tokens = batch_size * seq_len
    if activation_checkpointing:
        blocks = tokens * D * 4 * mcfg.num_layers + tokens * per_token_layer * width
    else:
        blocks = tokens * per_token_layer * width * mcfg.num_layers
    logits = tokens * mcfg.effective_output_size * 4  # the fp32 log-probabilities the loss saves
    params = mcfg.num_parameters() * OPTIMIZER_BYTES_PER_PARAM // max(1, shards)
    return MemoryEstimate(parameters=params, activations=blocks + logits + tokens * D * 4)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1), None without a limit."""
    root = Path("/sys/fs/cgroup")
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, usage = _read_int(root / limit_file), _read_int(root / usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):  # v1 reports "no limit" as ~2^63
            return max(0, limit - usage)
    return None


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` for this process, None when it cannot be told."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = None
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = cgroup if free is None else min(free, cgroup)
    return free


def check_memory(estimate: MemoryEstimate, device: torch.device, processes: int = 1,
                 what: str = "this model") -> None:
    """ValueError (one line) when `processes` x the estimate exceeds the available memory of `device`.

    processes: training processes sharing this memory (the ranks of a CPU run on one machine)."""
    free = available_memory(device)
    need = estimate.total * processes
    if free is None or need <= free:
        return
    ranks = f" x {processes} processes" if processes > 1 else ""
    raise ValueError(
        f"{what} does not fit in memory: training needs about {need / _GIB:.1f} GiB{ranks} "
        f"({estimate.parameters / _GIB:.1f} GiB for parameters, gradients and AdamW state, at least "
        f"{estimate.activations / _GIB:.1f} GiB of activations) but {free / _GIB:.1f} GiB is available on "
        f"{device.type}; use a smaller preset, --batch-size or --seq-len, --activation-checkpointing, or "
        "--no-memory-check to try anyway")
