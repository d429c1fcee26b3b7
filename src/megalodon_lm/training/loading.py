"""Loading checkpoints, every file checked first: the manifest, the JSON structure, finite tensors.

A damaged file is a `CorruptCheckpointError` with one line naming the checkpoint and the problem, raised
before the model, optimizer or RNG is touched (`load_checkpoint`), instead of a deserialiser's traceback or
silently wrong weights. Checkpoints without a manifest (written by earlier versions) load unverified, their
tensors still checked to be finite. Nothing is unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..models import MegalodonConfig, MegalodonLM
from .checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    TOKENIZER_DIR,
    TRAINER_STATE_FILE,
    _complete_checkpoints,
    _is_complete,
    _read_run_info,
    _step_dir_name,
    is_sharded,
    latest_checkpoint,
)
from .manifest import CorruptCheckpointError, first_non_finite, optimizer_tensors, verify_manifest


def read_model_config(path: str | Path) -> MegalodonConfig:
    """A run's model_config.json; unreadable, invalid JSON or invalid fields are a ValueError naming the file."""
    try:
        return MegalodonConfig.from_json(Path(path))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


class CheckpointMismatchError(CorruptCheckpointError, RuntimeError):
    """Weights whose names or shapes do not fit the model (another architecture, or a damaged config)."""


def _device_str(device: str | torch.device) -> str:
    return str(torch.device(device))


def corrupt_error(ckpt: Path, what: str, exc: BaseException | None = None) -> CorruptCheckpointError:
    detail = "" if exc is None else f" ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})"
    return CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {what}{detail}")


def read_trainer_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """trainer_state.json as a dict (CorruptCheckpointError when unreadable or not a JSON object)."""
    ckpt = Path(ckpt_dir)
    try:
        state = json.loads((ckpt / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt_error(ckpt, f"{TRAINER_STATE_FILE} is unreadable", exc) from exc
    if not isinstance(state, dict):
        raise corrupt_error(ckpt, f"{TRAINER_STATE_FILE} is not a JSON object")
    return state


def read_scheduler_state(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """scheduler.json as a dict, None when the checkpoint has none."""
    path = Path(ckpt_dir) / SCHEDULER_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt_error(Path(ckpt_dir), f"{SCHEDULER_FILE} is unreadable", exc) from exc
    if not isinstance(state, dict):
        raise corrupt_error(Path(ckpt_dir), f"{SCHEDULER_FILE} is not a JSON object")
    return state


def read_weights(ckpt_dir: str | Path, map_location: str | torch.device = "cpu",
                 verify: bool = True) -> dict[str, torch.Tensor]:
    """model.safetensors, checked against the manifest (when `verify` and there is one) and for finiteness."""
    ckpt = Path(ckpt_dir)
    path = ckpt / MODEL_FILE
    if not path.is_file() and is_sharded(ckpt):
        raise FileNotFoundError(f"{ckpt} holds sharded weights only: write {MODEL_FILE} with "
                                f"`megalodon-lm consolidate {ckpt.parent.parent}`")
    if not path.is_file():
        raise FileNotFoundError(f"no model weights ({MODEL_FILE}) in {ckpt}")
    if verify:
        verify_manifest(ckpt, [MODEL_FILE])
    try:
        weights = load_file(str(path), device=_device_str(map_location))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise corrupt_error(ckpt, f"{MODEL_FILE} is unreadable", exc) from exc
    bad = first_non_finite(weights)
    if bad is not None:
        raise corrupt_error(ckpt, f"{MODEL_FILE} holds NaN or infinity ({bad})")
    return weights


def _load_strict(ckpt: Path, module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: not the model of model_config.json
        first = (str(exc).strip().splitlines() or ["?"])[-1].strip()
        raise CheckpointMismatchError(f"checkpoint {ckpt}: {MODEL_FILE} does not fit the model ({first})") from exc


def load_model_weights(ckpt_dir: str | Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> None:
    """Load a checkpoint's model.safetensors strictly into `model` (no RNG or optimizer side effects).

    The file is verified against the manifest and must hold finite values (`CorruptCheckpointError`)."""
    _load_strict(Path(ckpt_dir), model, read_weights(ckpt_dir, map_location))


def read_rng_file(ckpt: Path, name: str = RNG_FILE) -> dict[str, torch.Tensor] | None:
    """A checkpoint's RNG-state file (None when absent), checked to hold byte tensors."""
    path = ckpt / name
    if not path.is_file():
        return None
    try:
        states = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise corrupt_error(ckpt, f"{name} is unreadable", exc) from exc
    if any(t.dtype != torch.uint8 or t.dim() != 1 for t in states.values()):
        raise corrupt_error(ckpt, f"{name} does not hold RNG states")
    return states


def restore_rng(states: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Set the CPU (and the existing CUDA devices') RNG states saved in a checkpoint."""
    try:
        if "cpu" in states:
            torch.set_rng_state(states["cpu"])
        if torch.cuda.is_available():
            # A checkpoint from a machine with more GPUs restores the devices that exist here.
            for i in range(torch.cuda.device_count()):
                if f"cuda:{i}" in states:
                    torch.cuda.set_rng_state(states[f"cuda:{i}"], i)
    except RuntimeError as exc:
        raise corrupt_error(ckpt, f"{RNG_FILE} does not hold valid RNG states", exc) from exc


def read_optimizer(ckpt: Path, map_location) -> dict[str, Any]:
    opt_path = ckpt / OPTIMIZER_FILE
    if not opt_path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} has no optimizer state ({OPTIMIZER_FILE})")
    try:
        state = torch.load(opt_path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated/empty (EOFError, RuntimeError), or a non-tensor global (UnpicklingError)
        raise corrupt_error(ckpt, f"{OPTIMIZER_FILE} is unreadable", exc) from exc
    if not isinstance(state, dict) or "param_groups" not in state:
        raise corrupt_error(ckpt, f"{OPTIMIZER_FILE} is not an optimizer state")
    bad = first_non_finite(optimizer_tensors(state))
    if bad is not None:
        raise corrupt_error(ckpt, f"{OPTIMIZER_FILE} holds NaN or infinity ({bad})")
    return state


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu",
                    verify: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights (strict), optimizer state and RNG states; return (trainer_state, scheduler_state).

    Every file is checked first (manifest, JSON structure, finite tensors): a damaged checkpoint raises
    `CorruptCheckpointError` (one line) before the model, optimizer or RNG is touched. Nothing is unpickled
    beyond tensors and plain containers (torch.load with weights_only=True).
    """
    ckpt = Path(ckpt_dir)
    if not _is_complete(ckpt):
        raise FileNotFoundError(f"not a complete checkpoint directory: {ckpt}")
    if verify:  # False: the caller has just verified it (training.fallback.check_checkpoint)
        verify_manifest(ckpt, present=[MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, TRAINER_STATE_FILE, RNG_FILE])
    trainer_state, scheduler_state = read_trainer_state(ckpt), read_scheduler_state(ckpt)
    weights = read_weights(ckpt, map_location, verify=False)
    opt_state = read_optimizer(ckpt, map_location) if optimizer is not None else None
    rng = read_rng_file(ckpt)
    _load_strict(ckpt, model, weights)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise corrupt_error(ckpt, f"{OPTIMIZER_FILE} does not fit the model's parameters", exc) from exc
    if rng is not None:
        restore_rng(rng, ckpt)
    return trainer_state, scheduler_state


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             step: int | None = None) -> tuple[MegalodonLM, Any]:
    """(model in eval mode on `device`, tokenizer) from a run directory's latest or given-step checkpoint.

    The model is a MegalodonLM, or a LlamaLM for a run of `--arch llama`. A checkpoint that fails verification
    raises `CorruptCheckpointError` naming the newest verified one to pass as `step` instead."""
    path = Path(run_dir)
    config_path = path / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a megalodon-lm run directory (no {MODEL_CONFIG_FILE})")
    _read_run_info(path)
    if step is None:
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint in {path / CHECKPOINTS_DIR}")
    else:
        ckpt = path / CHECKPOINTS_DIR / _step_dir_name(step)
        if not _is_complete(ckpt):
            steps = [s for s, _ in _complete_checkpoints(path / CHECKPOINTS_DIR)]
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {path} (available steps: {steps})")

    from ..data.tokenizer import load_tokenizer  # lazy: the data module is optional for checkpointing
    from ..models.llama_baseline import model_from_run_dir  # a run of `--arch llama` loads its LlamaLM

    model = model_from_run_dir(path, read_model_config(config_path))
    try:
        load_model_weights(ckpt, model)
    except CorruptCheckpointError as exc:
        from .fallback import resume_candidates, verified_weights

        good = [c for c in resume_candidates(path) if c != ckpt and verified_weights(c)]
        hint = (f"; the newest verified checkpoint is {good[0].name} (use --step {int(good[0].name[5:])})"
                if good else "; no verified checkpoint is left")
        raise CorruptCheckpointError(f"{exc}{hint}") from exc
    model.eval().to(device)
    return model, load_tokenizer(path / TOKENIZER_DIR)
