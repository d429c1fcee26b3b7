"""Stream states on disk: generate by parts (`save_state` now, `load_state` later, maybe elsewhere).

A state file is a safetensors file of `StreamState.to_dict()` (complex CEMA states as real (..., 2)) with
string metadata: the format and its version, the batch size, and optionally the model config (JSON), the
pending tokens of a generation (JSON list, one per row, see `generate`) and, as the extra tensor
`generate.rng_state`, a sampling generator's state so that sampling continues exactly too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..fileio import save_safetensors
from ..models import MegalodonLM, StreamState
from ..models.validation import check_state
from ..training.checkpoint import unaliased_cpu

STATE_FORMAT = "megalodon-lm-stream-state"
STATE_FORMAT_VERSION = 1
EXTRA_PREFIX = "generate."  # entries that are not part of the StreamState
RNG_KEY = EXTRA_PREFIX + "rng_state"


@dataclass
class StateFileInfo:
    """What a state file says about itself, besides the state tensors."""

    format_version: int
    batch_size: int
    config: dict[str, Any] | None  # the saving model's MegalodonConfig.to_dict(), when it was given
    next_tokens: list[int] | None  # pending token per row, when saved by a generation
    rng_state: torch.Tensor | None  # uint8 CPU torch.Generator state, when saved


def save_state(
    state: StreamState,
    path: str | os.PathLike,
    model: MegalodonLM | None = None,
    *,
    next_tokens: torch.Tensor | list[int] | None = None,
    rng: torch.Generator | None = None,
) -> Path:
    """Write `state` to `path` (atomically: a reader sees the old file or the new one). Returns the path.

    model: record its config, so that `load_state(path, model)` can refuse a different model.
    next_tokens: (B,) pending tokens of a generation (the last generated token of each row).
    rng: a CPU torch.Generator whose state is stored for exact continuation of sampling.
    """
    if not isinstance(state, StreamState):
        raise TypeError(f"save_state expects a StreamState, got {type(state).__name__}")
    tensors = state.to_dict()
    metadata = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION),
                "batch_size": str(state.batch_size)}
    if model is not None:
        metadata["config"] = model.config.to_json()
    if next_tokens is not None:
        pending = [int(t) for t in torch.as_tensor(next_tokens).reshape(-1).tolist()]
        if len(pending) != state.batch_size:
            raise ValueError(f"next_tokens has {len(pending)} entries, the state has {state.batch_size} rows")
        metadata["next_tokens"] = json.dumps(pending)
    if rng is not None:
        tensors[RNG_KEY] = rng.get_state()
    out = Path(path)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    try:
        save_safetensors(unaliased_cpu(tensors), str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _open(path: str | os.PathLike, device: str) -> tuple[Any, dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"state file not found: {p}")
    try:
        handle = safe_open(str(p), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{p} is not a readable safetensors state file: {exc}") from exc
    meta = handle.metadata() or {}
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{p} is not a megalodon-lm stream state file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(STATE_FORMAT_VERSION):
        raise ValueError(f"{p} has state format_version {meta.get('format_version')!r}; this megalodon-lm reads "
                         f"version {STATE_FORMAT_VERSION}")
    return handle, meta


def read_state_info(path: str | os.PathLike) -> StateFileInfo:
    """The metadata (and stored RNG state) of a state file, without loading the state."""
    handle, meta = _open(path, "cpu")
    rng = handle.get_tensor(RNG_KEY) if RNG_KEY in handle.keys() else None
    config = json.loads(meta["config"]) if "config" in meta else None
    pending = json.loads(meta["next_tokens"]) if "next_tokens" in meta else None
    return StateFileInfo(int(meta["format_version"]), int(meta.get("batch_size", -1)), config, pending, rng)


def _config_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """'field: file X, model Y; ...' for every differing field ('' when equal)."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: file {saved.get(k)!r}, model {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    return "; ".join(diffs)


def load_state(path: str | os.PathLike, model: MegalodonLM | None = None,
               device: str | torch.device = "cpu") -> StreamState:
    """Read a state written by `save_state` onto `device`.

    With `model`: a state saved with a different config is refused (ValueError naming the fields), and the
    tensors' shapes are checked against the model (also for files saved without a config).
    """
    handle, meta = _open(path, "cpu")
    if model is not None and "config" in meta:
        diff = _config_mismatch(json.loads(meta["config"]), model.config.to_dict())
        if diff:
            raise ValueError(f"state file {path} was saved from a model with a different config ({diff})")
    tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith(EXTRA_PREFIX)}
    state = StreamState.from_dict(tensors).to(device)
    if model is not None:
        check_state(state, model.config, state.batch_size, state.device)
    return state
