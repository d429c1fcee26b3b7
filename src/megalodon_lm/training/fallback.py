"""Choosing a checkpoint to continue from: the newest one that verifies, with every skipped one reported.

A resume tries the checkpoint `latest` names, then older ones (`resume_candidates`); each that fails
verification (manifest, JSON, finite tensors: training.checkpoint / training.manifest) is reported in one
line and the next is tried (`choose_resume_checkpoint`). The non-finite-loss message and `load_run`'s hint name the
newest checkpoint that verifies (`newest_verified_checkpoint`), not merely the newest one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import (
    CHECKPOINTS_DIR,
    MODEL_FILE,
    TRAINER_STATE_FILE,
    _complete_checkpoints,
    is_sharded,
    latest_checkpoint,
)
from .loading import corrupt_error, read_scheduler_state, read_trainer_state, read_weights
from .manifest import CorruptCheckpointError, checkpoint_files, is_finite_number, verify_manifest


def check_resume_state(ckpt_dir: str | Path, state: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of a checkpoint a run resumes from: it must hold the step, tokens and elapsed time."""
    for key in ("step", "tokens"):
        if isinstance(state.get(key), bool) or not isinstance(state.get(key), int) or state[key] < 0:
            raise corrupt_error(Path(ckpt_dir), f"{TRAINER_STATE_FILE} has no valid {key!r}")
    if not is_finite_number(state.get("elapsed")) or state["elapsed"] < 0:
        raise corrupt_error(Path(ckpt_dir), f"{TRAINER_STATE_FILE} has no valid 'elapsed'")
    return state


def check_checkpoint(ckpt_dir: str | Path) -> None:
    """Verify a checkpoint without loading it into a model: the manifest (all files), the trainer state, and
    finite weights when it has a single-file model (CorruptCheckpointError otherwise)."""
    ckpt = Path(ckpt_dir)
    verify_manifest(ckpt, present=[n for n in checkpoint_files(ckpt) if n != MODEL_FILE or not is_sharded(ckpt)])
    check_resume_state(ckpt, read_trainer_state(ckpt))
    read_scheduler_state(ckpt)
    if (ckpt / MODEL_FILE).is_file():
        read_weights(ckpt, verify=False)


def newest_verified_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint that passes `check_checkpoint` (the one a failed run can fall back to), or None."""
    for ckpt in resume_candidates(run_dir):
        try:
            check_checkpoint(ckpt)
        except (CorruptCheckpointError, OSError):
            continue
        return ckpt
    return None


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in the order a resume tries them: the one `latest` names, then older ones.

    Checkpoints numbered above `latest` are left out: they belong to a stretch of the run that was abandoned
    (a resume fell back past them) and will be written again.
    """
    complete = _complete_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    limit = {p: step for step, p in complete}[latest]
    return [latest, *(p for step, p in reversed(complete) if step < limit)]


def choose_resume_checkpoint(run_dir: str | Path, report: Callable[[str], None]) -> Path:
    """The checkpoint a resume continues from: the first of `resume_candidates` that passes `check_checkpoint`.

    Each one refused is reported in one line (`report("warning: ...")`), and so is the one finally chosen when
    it is not the newest; none left is a `CorruptCheckpointError` listing why each failed."""
    problems = []
    for ckpt in resume_candidates(run_dir):
        try:
            check_checkpoint(ckpt)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            report(f"warning: {exc}")
            continue
        if problems:
            report(f"resuming from {ckpt.name}, the newest checkpoint that verifies")
        return ckpt
    if not problems:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    raise CorruptCheckpointError(f"no loadable checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}: "
                                 + "; ".join(problems))


def verified_weights(ckpt: Path) -> bool:
    try:
        read_weights(ckpt)
    except (CorruptCheckpointError, OSError):
        return False
    return True
