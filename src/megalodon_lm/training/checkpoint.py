"""The run directory: configs, checkpoints and crash-safe saving.

Layout (format version 1)::

    RUN_DIR/
      run.json                 {"format_version": 1, "megalodon_lm_version": ..., "created": ISO time}
      model_config.json        MegalodonConfig.to_json
      train_config.json        the resolved training configuration (a dict given by the caller)
      tokenizer/               written by the caller via megalodon_lm.data.tokenizer.save_tokenizer
      checkpoints/
        step_00000100/         model.safetensors    model.state_dict(), aliased tensors as copies
                               optimizer.pt         optimizer.state_dict(), loadable with weights_only=True
                               scheduler.json       the LR scheduler's state (absent when there is none)
                               trainer_state.json   the caller's dict: step, tokens, elapsed, data position, ...
                               rng.safetensors      "cpu": torch CPU RNG state; "cuda:<i>": each CUDA device's
        latest                 text file naming the newest complete checkpoint directory
      (a distributed run's step_* holds dcp/ shards and rng_rank<r>.safetensors instead of model.safetensors,
       optimizer.pt and rng.safetensors; see megalodon_lm.distributed.checkpoint_dcp)
      metrics.jsonl, ...       see megalodon_lm.training.metrics

A checkpoint is written into ``checkpoints/.tmp-step_NNNNNNNN-<pid>/``, fsynced and renamed into place, so a
``step_*`` directory is always complete; ``latest`` is replaced atomically afterwards. Anything named ``.tmp-*``
is debris of an interrupted save: readers ignore it and the next save removes it. Only one process (rank 0)
may save into a run directory at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..fileio import save_safetensors
from ..models import MegalodonConfig, MegalodonLM

RUN_FORMAT_VERSION = 1

RUN_FILE = "run.json"
MODEL_CONFIG_FILE = "model_config.json"
TRAIN_CONFIG_FILE = "train_config.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
SHARDED_DIR = "dcp"  # torch.distributed.checkpoint shards of a distributed run (megalodon_lm.distributed)

TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"step_(\d+)")


# ---------------------------------------------------------------------- small file helpers
def _fsync_path(path: Path) -> None:
    """fsync a file or directory by path; directories cannot be opened for fsync on some platforms."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    # Resolved configs commonly hold paths; anything else unknown is a caller bug worth surfacing.
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def _to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"


def _atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either the old or the new file, never a partial one."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------- run directory
def _read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """run.json as a dict, None when absent; an unreadable file or unknown format is a ValueError."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != RUN_FORMAT_VERSION:
        raise ValueError(
            f"{path} has run format_version {version!r}; this megalodon-lm reads format {RUN_FORMAT_VERSION} "
            "(the run was written by a different version of megalodon-lm)"
        )
    return info


def _check_writable(run_dir: Path) -> None:
    # os.access() is unreliable (root, ACLs, read-only mounts): actually create and delete a file.
    try:
        fd, name = tempfile.mkstemp(dir=run_dir, prefix=f"{TMP_PREFIX}write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"output directory is not writable: {run_dir} ({exc.strerror or exc})") from exc


def init_run_dir(run_dir: str | Path, model_config: MegalodonConfig, train_config: dict[str, Any],
                 resume: bool) -> Path:
    """Create (or validate, when resuming) a run directory and write its run/model/train config files.

    Refuses a directory that already has checkpoints unless `resume`. With `resume`, an existing run is
    validated (format version) and left untouched; a directory without run.json is initialised as new.
    """
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path exists and is not a directory: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {path}: {exc.strerror or exc}") from exc
    _check_writable(path)

    if resume:
        if _read_run_info(path) is not None:
            return path
    else:
        newest = latest_checkpoint(path)
        if newest is not None:
            raise ValueError(
                f"output directory {path} already has checkpoints (newest: {newest.name}); "
                "pass --resume to continue that run, or choose another --out"
            )

    from .. import __version__  # lazy: the package __init__ may import this module

    run_info = {
        "format_version": RUN_FORMAT_VERSION,
        "megalodon_lm_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (path / CHECKPOINTS_DIR).mkdir(exist_ok=True)
    _atomic_write_text(path / MODEL_CONFIG_FILE, model_config.to_json() + "\n")
    _atomic_write_text(path / TRAIN_CONFIG_FILE, _to_json(train_config))
    # run.json last: its presence marks a fully initialised run directory.
    _atomic_write_text(path / RUN_FILE, _to_json(run_info))
    return path


# ---------------------------------------------------------------------- finding checkpoints
def _step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_sharded(ckpt_dir: str | Path) -> bool:
    """A distributed run's checkpoint: torch.distributed.checkpoint shards instead of (or besides) one file."""
    return (Path(ckpt_dir) / SHARDED_DIR / ".metadata").is_file()


def _is_complete(ckpt_dir: Path) -> bool:
    has_weights = (ckpt_dir / MODEL_FILE).is_file() or is_sharded(ckpt_dir)
    return has_weights and (ckpt_dir / TRAINER_STATE_FILE).is_file()


def _complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete step_* checkpoint, oldest first; .tmp-* debris is skipped."""
    found = []
    if ckpt_root.is_dir():
        for entry in ckpt_root.iterdir():
            match = _STEP_RE.fullmatch(entry.name)
            if match and entry.is_dir() and _is_complete(entry):
                found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every complete checkpoint directory of a run, oldest step first."""
    return [p for _, p in _complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named in `latest` if complete, else the highest-numbered complete one, else None."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    try:
        name = (ckpt_root / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        name = ""
    # Only a plain step_* name is trusted: `latest` must not lead outside checkpoints/.
    if _STEP_RE.fullmatch(name) and _is_complete(ckpt_root / name):
        return ckpt_root / name
    complete = _complete_checkpoints(ckpt_root)
    return complete[-1][1] if complete else None


# ---------------------------------------------------------------------- saving
def unaliased_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies in which no two entries share storage.

    safetensors refuses aliased tensors (tied weights, views into a fused buffer); giving each alias its own
    copy keeps every key, so a strict load assigns the same values to all of them again.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _rng_tensors() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    # Only an initialised CUDA context has states worth saving; querying otherwise would initialise it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            states[f"cuda:{i}"] = torch.cuda.get_rng_state(i)
    return states


def _prune(ckpt_root: Path, keep_last: int | None, just_written: Path) -> None:
    if keep_last is None:
        return
    others = [p for _, p in reversed(_complete_checkpoints(ckpt_root)) if p != just_written]
    for old in others[keep_last - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler_state: dict[str, Any] | None, trainer_state: dict[str, Any],
                    keep_last: int | None = 3) -> Path:
    """Write `checkpoints/step_NNNNNNNN` atomically, point `latest` at it and prune old checkpoints.

    keep_last: how many complete checkpoints to keep, the new one included (None keeps all).
    Returns the new checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for debris in ckpt_root.glob(f"{TMP_PREFIX}*"):
        _remove(debris)

    name = _step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    save_safetensors(unaliased_cpu(model.state_dict()), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    if scheduler_state is not None:
        (tmp / SCHEDULER_FILE).write_text(_to_json(scheduler_state), encoding="utf-8")
    save_safetensors(_rng_tensors(), str(tmp / RNG_FILE))
    # trainer_state.json marks completeness, so it is written last.
    (tmp / TRAINER_STATE_FILE).write_text(_to_json(trainer_state), encoding="utf-8")
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)

    return publish_checkpoint(tmp, ckpt_root, name, keep_last)


def publish_checkpoint(tmp: Path, ckpt_root: Path, name: str, keep_last: int) -> Path:
    """Move a fully written (fsynced) temporary checkpoint directory into place as `name`, point LATEST at it
    and prune old ones; returns the final directory."""
    final = ckpt_root / name
    if final.exists():
        # Re-saving a step (e.g. after a resume): rename() cannot replace a non-empty directory.
        stale = ckpt_root / f"{TMP_PREFIX}old-{name}-{os.getpid()}"
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_path(ckpt_root)
    _atomic_write_text(ckpt_root / LATEST_FILE, name + "\n")
    _prune(ckpt_root, keep_last, final)
    return final


# ---------------------------------------------------------------------- loading
def _device_str(device: str | torch.device) -> str:
    return str(torch.device(device))


def load_model_weights(ckpt_dir: str | Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> None:
    """Load a checkpoint's model.safetensors strictly into `model` (no RNG or optimizer side effects)."""
    path = Path(ckpt_dir) / MODEL_FILE
    if not path.is_file() and is_sharded(ckpt_dir):
        raise FileNotFoundError(f"{Path(ckpt_dir)} holds sharded weights only: write {MODEL_FILE} with "
                                f"`megalodon-lm consolidate {Path(ckpt_dir).parent.parent}`")
    if not path.is_file():
        raise FileNotFoundError(f"no model weights ({MODEL_FILE}) in {Path(ckpt_dir)}")
    model.load_state_dict(load_file(str(path), device=_device_str(map_location)), strict=True)


def _restore_rng(path: Path) -> None:
    if not path.is_file():
        return
    states = load_file(str(path))
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if torch.cuda.is_available():
        # A checkpoint from a machine with more GPUs restores the devices that exist here.
        for i in range(torch.cuda.device_count()):
            if f"cuda:{i}" in states:
                torch.cuda.set_rng_state(states[f"cuda:{i}"], i)


def load_checkpoint(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore weights (strict), optimizer state and RNG states; return (trainer_state, scheduler_state).

    Nothing is unpickled beyond tensors and plain containers (torch.load with weights_only=True).
    """
    ckpt = Path(ckpt_dir)
    if not _is_complete(ckpt):
        raise FileNotFoundError(f"not a complete checkpoint directory: {ckpt}")
    load_model_weights(ckpt, model, map_location)
    if optimizer is not None:
        opt_path = ckpt / OPTIMIZER_FILE
        if not opt_path.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} has no optimizer state ({OPTIMIZER_FILE})")
        optimizer.load_state_dict(torch.load(opt_path, map_location=map_location, weights_only=True))
    _restore_rng(ckpt / RNG_FILE)
    trainer_state = json.loads((ckpt / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    sched_path = ckpt / SCHEDULER_FILE
    scheduler_state = json.loads(sched_path.read_text(encoding="utf-8")) if sched_path.is_file() else None
    return trainer_state, scheduler_state


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             step: int | None = None) -> tuple[MegalodonLM, Any]:
    """(model in eval mode on `device`, tokenizer) from a run directory's latest or given-step checkpoint.

    The model is a MegalodonLM, or a LlamaLM for a run of `--arch llama`."""
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

    model = model_from_run_dir(path, MegalodonConfig.from_json(config_path))
    load_model_weights(ckpt, model)
    model.eval().to(device)
    return model, load_tokenizer(path / TOKENIZER_DIR)
