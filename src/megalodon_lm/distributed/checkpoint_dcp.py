"""Sharded checkpoints with torch.distributed.checkpoint (DCP), in the run directory's usual layout.

A distributed run writes ``checkpoints/step_NNNNNNNN/`` holding ``dcp/`` (every rank's shards of the model and
optimizer, plus DCP's ``.metadata``), ``rng_rank<r>.safetensors`` (each rank's RNG states), ``scheduler.json``
and ``trainer_state.json`` (the completeness marker, written last by rank 0). DCP reshards on load, so a run
resumes at any world size and with DDP or FSDP2. `consolidate` turns such a checkpoint into the single-file
``model.safetensors`` that generation, evaluation and the Hugging Face export read; a distributed run does
this for its final checkpoint automatically.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
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
    _fsync_path,
    _remove,
    _rng_tensors,
    _step_dir_name,
    _to_json,
    is_sharded,
    latest_checkpoint,
    publish_checkpoint,
    unaliased_cpu,
)
from .env import DistContext

MODEL_PREFIX = "model."  # LossModule holds the MegalodonLM as `model`


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.safetensors"


def save_sharded(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler_state: dict[str, Any] | None, trainer_state: dict[str, Any], keep_last: int | None,
                 ctx: DistContext) -> Path:
    """Collective: every rank writes its shards; rank 0 completes the checkpoint like `save_checkpoint`."""
    ckpt_root = Path(run_dir) / CHECKPOINTS_DIR
    name = _step_dir_name(step)
    tmp = ckpt_root / f"{TMP_PREFIX}{name}-dist"
    if ctx.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for debris in ckpt_root.glob(f"{TMP_PREFIX}*"):
            _remove(debris)
        tmp.mkdir()
    dist.barrier()
    model_sd, optim_sd = get_state_dict(module, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / SHARDED_DIR))
    save_safetensors(_rng_tensors(), str(tmp / _rng_file(ctx.rank)))
    _fsync_path(tmp / _rng_file(ctx.rank))
    dist.barrier()
    final = ckpt_root / name
    if ctx.is_main:
        if scheduler_state is not None:
            (tmp / SCHEDULER_FILE).write_text(_to_json(scheduler_state), encoding="utf-8")
        (tmp / TRAINER_STATE_FILE).write_text(_to_json(trainer_state), encoding="utf-8")
        for f in [*tmp.iterdir(), *(tmp / SHARDED_DIR).iterdir()]:
            _fsync_path(f)
        _fsync_path(tmp)
        publish_checkpoint(tmp, ckpt_root, name, keep_last)
    dist.barrier()
    return final


def load_sharded(ckpt_dir: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ctx: DistContext) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Collective: restore model and optimizer (resharded to this world size), and this rank's RNG states when
    the checkpoint was written by as many ranks. Returns (trainer_state, scheduler_state)."""
    ckpt = Path(ckpt_dir)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a single-process checkpoint; resume it without torchrun (or start a new "
                         "distributed run from its weights with --init-from)")
    model_sd, optim_sd = get_state_dict(module, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = json.loads((ckpt / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    rng = ckpt / _rng_file(ctx.rank)
    if trainer_state.get("world_size") == ctx.world_size and rng.is_file():
        states = load_file(str(rng))
        torch.set_rng_state(states["cpu"])
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                if f"cuda:{i}" in states:
                    torch.cuda.set_rng_state(states[f"cuda:{i}"], i)
    sched = ckpt / SCHEDULER_FILE
    return trainer_state, json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else None


def consolidate(ckpt_dir: str | Path, model_config: MegalodonConfig | None = None) -> Path:
    """One process, no process group: gather a sharded checkpoint's weights into `model.safetensors` next to
    its shards (written atomically). Returns the file's path."""
    ckpt = Path(ckpt_dir)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is not a sharded checkpoint (no {SHARDED_DIR}/.metadata)")
    if model_config is None:
        model_config = MegalodonConfig.from_json(ckpt.parent.parent / MODEL_CONFIG_FILE)
    with torch.device("meta"):
        model = MegalodonLM(model_config)
    target = {MODEL_PREFIX + k: torch.empty_like(v, device="cpu") for k, v in model.state_dict().items()}
    state = {"model": target}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": the intended single-process load
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(ckpt / SHARDED_DIR), no_dist=True)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state["model"].items()}
    out = ckpt / MODEL_FILE
    tmp = ckpt / f"{TMP_PREFIX}{MODEL_FILE}-{os.getpid()}"
    save_safetensors(unaliased_cpu(weights), str(tmp), metadata={"format": "pt"})
    _fsync_path(tmp)
    os.replace(tmp, out)
    _fsync_path(ckpt)
    return out


def consolidate_run(run_dir: str | Path) -> Path:
    """Consolidate the latest checkpoint of a run directory (see `consolidate`)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}")
    return consolidate(ckpt)
