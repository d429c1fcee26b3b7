"""Sharded checkpoints with torch.distributed.checkpoint (DCP), in the run directory's usual layout.

A distributed run writes ``checkpoints/step_NNNNNNNN/`` holding ``dcp/`` (every rank's shards of the model and
optimizer, plus DCP's ``.metadata``), ``rng_rank<r>.safetensors`` (each rank's RNG states), ``scheduler.json``
and ``trainer_state.json`` (the completeness marker, written last by rank 0). DCP reshards on load, so a run
resumes at any world size and with DDP or FSDP2. `consolidate` turns such a checkpoint into the single-file
``model.safetensors`` that generation, evaluation and the Hugging Face export read; a distributed run does
this for its final checkpoint automatically.

Safety and integrity as for single-file checkpoints (training.checkpoint): rank 0 writes a manifest (size and
SHA-256 of every shard) last and verifies it before a load; DCP's metadata is read without general unpickling
(distributed.safe_dcp); the weights must be finite to be saved or loaded. Decisions that can fail on one rank
(a full disk, a damaged file) are agreed on by all ranks, so every rank raises the same one-line error instead
of some waiting forever in a collective.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..fileio import save_safetensors
from ..models import MegalodonConfig, MegalodonLM
from ..training.checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    SCHEDULER_FILE,
    SHARDED_DIR,
    TMP_PREFIX,
    TRAINER_STATE_FILE,
    CheckpointWriteError,
    _fsync_path,
    _remove,
    _rng_tensors,
    _step_dir_name,
    _to_json,
    checkpoint_write_message,
    is_sharded,
    latest_checkpoint,
    publish_checkpoint,
    remove_debris,
    unaliased_cpu,
)
from ..training.loading import read_rng_file, read_scheduler_state, read_trainer_state, restore_rng
from ..training.manifest import (
    CorruptCheckpointError,
    NonFiniteError,
    checkpoint_files,
    file_digest,
    first_non_finite,
    optimizer_tensors,
    read_manifest,
    verify_manifest,
    write_manifest,
)
from .env import DistContext
from .safe_dcp import root_cause, safe_load

MODEL_PREFIX = "model."  # LossModule holds the MegalodonLM as `model`
_WRITE_ERRORS = (CheckpointException, OSError, RuntimeError, SafetensorError)


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.safetensors"


def _all_ok(ok: bool, ctx: DistContext) -> bool:
    """True on every rank when `ok` is true on every rank."""
    flag = torch.tensor([int(ok)], device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag[0])


def _from_main(value: Any, ctx: DistContext) -> Any:
    """Rank 0's `value` (a small int or string) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def _main_step(ctx: DistContext, fn) -> None:
    """Run `fn` on rank 0; a failure there is raised on every rank (rank 0: the original exception, the others:
    a CheckpointWriteError with its message), so no rank is left waiting in a collective."""
    error, original = "", None
    if ctx.is_main:
        try:
            fn()
        except Exception as exc:
            error, original = str(exc) or type(exc).__name__, exc
    error = _from_main(error, ctx)
    if original is not None:
        raise original
    if error:
        raise CheckpointWriteError(error)


def save_sharded(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler_state: dict[str, Any] | None, trainer_state: dict[str, Any], keep_last: int | None,
                 ctx: DistContext) -> Path:
    """Collective: every rank writes its shards; rank 0 completes the checkpoint like `save_checkpoint`."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    name = _step_dir_name(step)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    if not _all_ok(first_non_finite(model_sd) is None, ctx):
        raise NonFiniteError(f"the weights hold NaN or infinity at step {step}: not saved")
    tmp = ckpt_root / f"{TMP_PREFIX}{name}-{_from_main(os.getpid(), ctx)}"  # rank 0's pid marks whose debris

    def fail(exc: BaseException) -> CheckpointWriteError:
        _remove(tmp)
        return CheckpointWriteError(checkpoint_write_message(name, ckpt_root, exc))

    def prepare() -> None:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            remove_debris(ckpt_root)
            tmp.mkdir()
        except OSError as exc:
            raise fail(exc) from exc

    _main_step(ctx, prepare)
    failure: BaseException | None = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
        save_safetensors(_rng_tensors(), str(tmp / _rng_file(ctx.rank)))
        _fsync_path(tmp / _rng_file(ctx.rank))
    except _WRITE_ERRORS as exc:
        failure = root_cause(exc)
    if not _all_ok(failure is None, ctx):
        if ctx.is_main:
            _remove(tmp)
        reason = failure if failure is not None else OSError(0, "another rank could not write its shards")
        raise CheckpointWriteError(checkpoint_write_message(name, ckpt_root, reason))

    def complete() -> None:
        try:
            if scheduler_state is not None:
                (tmp / SCHEDULER_FILE).write_text(_to_json(scheduler_state), encoding="utf-8")
            (tmp / TRAINER_STATE_FILE).write_text(_to_json(trainer_state), encoding="utf-8")
            for f in [*tmp.iterdir(), *(tmp / SHARDED_DIR).iterdir()]:
                _fsync_path(f)
            write_manifest(tmp)
            _fsync_path(tmp)
        except (OSError, RuntimeError) as exc:
            raise fail(exc) from exc
        publish_checkpoint(tmp, ckpt_root, name, keep_last)

    _main_step(ctx, complete)
    return ckpt_root / name


def _check_files(ckpt: Path, ctx: DistContext, verify: bool) -> dict[str, Any]:
    """Rank 0 verifies the manifest (when `verify`) and the trainer state; every rank gets the state or the same
    error."""
    error, state = "", None
    if ctx.is_main:
        try:
            if verify:
                verify_manifest(ckpt, present=[n for n in checkpoint_files(ckpt) if n != MODEL_FILE])
            state = read_trainer_state(ckpt)
            read_scheduler_state(ckpt)
        except (CorruptCheckpointError, OSError) as exc:  # every rank then raises the same one line
            error = str(exc) if isinstance(exc, CorruptCheckpointError) else f"cannot read {ckpt}: {exc}"
    error, state = _from_main((error, state), ctx)
    if error:
        raise CorruptCheckpointError(error)
    return state


def load_sharded(ckpt_dir: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ctx: DistContext, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: restore model and optimizer (resharded to this world size), and this rank's RNG states when
    the checkpoint was written by as many ranks. Returns (trainer_state, scheduler_state).

    A damaged checkpoint raises the same `CorruptCheckpointError` on every rank, before or after the load
    (non-finite values). verify=False skips the manifest (the caller has just checked it)."""
    ckpt = Path(ckpt_dir)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a single-process checkpoint; resume it without torchrun (or start a new "
                         "distributed run from its weights with --init-from)")
    trainer_state = _check_files(ckpt, ctx, verify)
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    safe_load(state, ckpt / SHARDED_DIR)
    finite = first_non_finite(state["model"]) is None and first_non_finite(optimizer_tensors(state["optim"])) is None
    if not _all_ok(finite, ctx):
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: its weights or optimizer state hold NaN or "
                                     "infinity")
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = ckpt / _rng_file(ctx.rank)
    if trainer_state.get("world_size") == ctx.world_size and rng.is_file():
        restore_rng(read_rng_file(ckpt, rng.name), ckpt)
    return trainer_state, read_scheduler_state(ckpt)


def consolidate(ckpt_dir: str | Path, model_config: MegalodonConfig | None = None) -> Path:
    """One process, no process group: gather a sharded checkpoint's weights into `model.safetensors` next to
    its shards (written atomically, then added to the manifest). Returns the file's path.

    The shards are verified against the manifest first and read without general unpickling; damaged or
    tampered ones raise `CorruptCheckpointError` (one line)."""
    ckpt = Path(ckpt_dir)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    files = read_manifest(ckpt)
    if files is not None:  # the shards must verify; a model.safetensors being replaced need not
        verify_manifest(ckpt, [n for n in files if n != MODEL_FILE])
    if model_config is None:
        model_config = MegalodonConfig.from_json(ckpt.parent.parent / MODEL_CONFIG_FILE)
    with torch.device("meta"):
        model = MegalodonLM(model_config)
    target = {MODEL_PREFIX + k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    state = {"model": target}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": the intended single-process load
        warnings.simplefilter("ignore", UserWarning)
        safe_load(state, ckpt / SHARDED_DIR, no_dist=True)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state["model"].items()}
    bad = first_non_finite(weights)
    if bad is not None:
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: its weights hold NaN or infinity ({bad})")
    out = ckpt / MODEL_FILE
    tmp = ckpt / f"{TMP_PREFIX}{MODEL_FILE}-{os.getpid()}"
    try:
        save_safetensors(unaliased_cpu(weights), str(tmp), metadata={"format": "pt"})
        _fsync_path(tmp)
        if files is not None:  # the new file joins the manifest; the others were verified above
            size, digest = file_digest(tmp)
            files = {**files, MODEL_FILE: {"size": size, "sha256": digest}}
        os.replace(tmp, out)
        if files is not None:
            write_manifest(ckpt, known=files)
    except (OSError, RuntimeError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"cannot write {out}: {exc}") from exc
    _fsync_path(ckpt)
    return out


def consolidate_run(run_dir: str | Path) -> Path:
    """Consolidate the latest checkpoint of a run directory (see `consolidate`)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}")
    return consolidate(ckpt)
