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
                               manifest.json        every file's size and SHA-256 (training.manifest), written last
        latest                 text file naming the newest complete checkpoint directory
      .lock                    the writer's lock (training.run_lock): one training process per run directory
      (a distributed run's step_* holds dcp/ shards and rng_rank<r>.safetensors instead of model.safetensors,
       optimizer.pt and rng.safetensors; see megalodon_lm.distributed.checkpoint_dcp)
      metrics.jsonl, ...       see megalodon_lm.training.metrics

A checkpoint is written into ``checkpoints/.tmp-step_NNNNNNNN-<pid>/``, fsynced, given its manifest and renamed
into place, so a ``step_*`` directory is always complete; ``latest`` is replaced atomically afterwards. Anything
named ``.tmp-*`` is debris of an interrupted save: readers ignore it, and a save removes the debris of its own
process and of processes that no longer run (never another live process's). Only the process holding the run
lock (rank 0 under torchrun) saves into a run directory. A save that fails (a full disk) removes its partial
directory and raises `CheckpointWriteError`: the previous checkpoint stays as it was.

Loading (training.loading) verifies the manifest and that the weights are finite (`CorruptCheckpointError`
otherwise, one line); checkpoints written before manifests existed load unverified, with the finiteness check.
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
from safetensors import SafetensorError

from ..fileio import save_safetensors
from ..models import MegalodonConfig
from .manifest import NonFiniteError, first_non_finite, write_manifest

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
_DEBRIS_PID_RE = re.compile(r"-(\d+)$")  # .tmp-<what>-<pid of the writing process>
_LOW_DISK = 64 << 20  # below this many free bytes, a failed write is reported as a full disk


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is intact."""


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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a partial temporary behind
        raise
    _fsync_path(path.parent)


def read_json_file(path: str | Path) -> Any:
    """A JSON file's content; unreadable or invalid JSON is a ValueError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


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
    info = read_json_file(path)
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


def ensure_run_dir(run_dir: str | Path) -> Path:
    """Create `run_dir` (and its parents) if needed and check that it is a writable directory (ValueError)."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path exists and is not a directory: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create output directory {path}: {exc.strerror or exc}") from exc
    _check_writable(path)
    return path


def init_run_dir(run_dir: str | Path, model_config: MegalodonConfig, train_config: dict[str, Any],
                 resume: bool) -> Path:
    """Create (or validate, when resuming) a run directory and write its run/model/train config files.

    Refuses a directory that already has checkpoints unless `resume`. With `resume`, an existing run is
    validated (format version) and left untouched; a directory without run.json is initialised as new.
    """
    path = ensure_run_dir(run_dir)

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): leave its files alone
    return True


def remove_debris(ckpt_root: Path) -> None:
    """Remove `.tmp-*` entries written by this process or by processes that no longer run.

    A live process's temporary (another writer that ignores the run lock, e.g. an older megalodon-lm) is
    left alone; readers ignore `.tmp-*` either way.
    """
    if not ckpt_root.is_dir():
        return
    for debris in ckpt_root.glob(f"{TMP_PREFIX}*"):
        match = _DEBRIS_PID_RE.search(debris.name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            _remove(debris)


def write_failure(exc: BaseException, where: Path) -> str:
    """A one-line reason for a failed write: the OS error, or a full disk behind torch's opaque messages."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return text
    return f"No space left on device ({free:,} bytes free)" if free < _LOW_DISK else text


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
    weights = unaliased_cpu(model.state_dict())
    bad = first_non_finite(weights)
    if bad is not None:  # such a checkpoint would only be pruned into the place of a good one
        raise NonFiniteError(f"the weights hold NaN or infinity ({bad}) at step {step}: not saved")
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    name = _step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        remove_debris(ckpt_root)
        tmp.mkdir()
        save_safetensors(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler_state is not None:
            (tmp / SCHEDULER_FILE).write_text(_to_json(scheduler_state), encoding="utf-8")
        save_safetensors(_rng_tensors(), str(tmp / RNG_FILE))
        # trainer_state.json marks completeness, the manifest (hashes of everything else) comes last.
        (tmp / TRAINER_STATE_FILE).write_text(_to_json(trainer_state), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync_path(f)
        write_manifest(tmp)
        _fsync_path(tmp)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, (OSError, RuntimeError, SafetensorError)):
            raise CheckpointWriteError(checkpoint_write_message(name, ckpt_root, exc)) from exc
        raise
    return publish_checkpoint(tmp, ckpt_root, name, keep_last)


def checkpoint_write_message(name: str, ckpt_root: Path, exc: BaseException) -> str:
    previous = latest_checkpoint(ckpt_root.parent)
    kept = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
    return (f"cannot write checkpoint {name} in {ckpt_root}: {write_failure(exc, ckpt_root)} "
            f"({kept}; the partial checkpoint was removed)")


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
    try:
        _atomic_write_text(ckpt_root / LATEST_FILE, name + "\n")
    except OSError as exc:  # the checkpoint itself is complete; `latest` still names the previous one
        raise CheckpointWriteError(f"checkpoint {final} was written but {ckpt_root / LATEST_FILE} could not be "
                                   f"updated: {write_failure(exc, ckpt_root)}") from exc
    _prune(ckpt_root, keep_last, final)
    return final


# Loading lives in training/loading.py; its entry points stay importable from here.
_LOADING = frozenset({"load_checkpoint", "load_model_weights", "load_run", "read_weights", "read_trainer_state",
                      "read_scheduler_state", "CheckpointMismatchError"})


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
