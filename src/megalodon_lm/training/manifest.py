"""Checkpoint manifests: every file's size and SHA-256, written last, checked before anything is loaded.

``manifest.json`` in a checkpoint directory::

    {"format_version": 1, "files": {"model.safetensors": {"size": 123, "sha256": "..."}, "dcp/.metadata": ...}}

It lists every regular file of the checkpoint (sub-directories included, ``.tmp-*`` debris excluded) and is
written after all of them, just before the directory is renamed into place. `verify_manifest` re-hashes the
files a loader is about to read: a truncated, garbled or swapped file is reported in one line
(`CorruptCheckpointError`) instead of surfacing as a deserialiser traceback or, worse, as silently wrong
weights. Checkpoints written before manifests existed have none: they load unverified (their weights are still
checked to be finite).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..runtime import available_cpus

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_TMP_PREFIX = ".tmp-"  # the run directory's debris prefix (training.checkpoint.TMP_PREFIX)
_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint (or one of its files) is damaged, modified or unusable; the message is one line."""


class NonFiniteError(ValueError):
    """Weights or optimizer state hold NaN or infinity."""


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def digests(paths: list[Path]) -> list[tuple[int, str]]:
    """`file_digest` of each path, several files at once (hashlib releases the GIL on large reads)."""
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), available_cpus(), 8)) as pool:
        return list(pool.map(file_digest, paths))


def checkpoint_files(ckpt_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under `ckpt_dir` but the manifest and .tmp-* debris."""
    names = []
    for path in sorted(ckpt_dir.rglob("*")):
        rel = path.relative_to(ckpt_dir)
        if path.is_file() and rel.as_posix() != MANIFEST_FILE and not any(
                part.startswith(_TMP_PREFIX) for part in rel.parts):
            names.append(rel.as_posix())
    return names


def write_manifest(ckpt_dir: str | Path, known: Mapping[str, dict] | None = None) -> Path:
    """Hash every file of `ckpt_dir` and write ``manifest.json`` (fsynced) last; returns its path.

    known: entries already verified or computed by the caller (relative path -> {"size", "sha256"}), reused
    instead of hashing those files again.
    """
    ckpt = Path(ckpt_dir)
    names = checkpoint_files(ckpt)
    todo = [n for n in names if not (known and n in known)]
    files = {n: dict(known[n]) for n in names if known and n in known}
    for name, (size, digest) in zip(todo, digests([ckpt / n for n in todo]), strict=True):
        files[name] = {"size": size, "sha256": digest}
    path = ckpt / MANIFEST_FILE
    tmp = ckpt / f"{_TMP_PREFIX}{MANIFEST_FILE}-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format_version": MANIFEST_VERSION, "files": files}, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_manifest(ckpt_dir: str | Path) -> dict[str, dict] | None:
    """The manifest's file table, None when the checkpoint has no manifest (written by an older version)."""
    ckpt = Path(ckpt_dir)
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {MANIFEST_FILE} is unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("format_version") != MANIFEST_VERSION:
        raise CorruptCheckpointError(f"checkpoint {ckpt}: {MANIFEST_FILE} has an unknown format")
    files = data.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()):
        raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {MANIFEST_FILE} has no valid file table")
    return files


def verify_manifest(ckpt_dir: str | Path, names: Iterable[str] | None = None, present: Iterable[str] = ()) -> bool:
    """Check files against the manifest: every listed file, or only `names` (relative paths) when given.

    present: files the caller is about to read; each that exists must be listed (an unlisted file is
    unverified). Returns False when there is no manifest (an older checkpoint: nothing to verify), True when
    every file checked matches; raises `CorruptCheckpointError` naming the first file that is missing, of the
    wrong size or hash, or unlisted.
    """
    ckpt = Path(ckpt_dir)
    files = read_manifest(ckpt)
    if files is None:
        return False
    for name in present:
        if name not in files and (ckpt / name).is_file():
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {name} is not in its manifest")
    wanted = sorted(files) if names is None else list(names)
    for name in wanted:
        if name not in files:
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {name} is not in its manifest")
        if not (ckpt / name).is_file():
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {name} is missing")
    for name, (size, digest) in zip(wanted, digests([ckpt / n for n in wanted]), strict=True):
        entry = files[name]
        if size != entry["size"]:
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {name} has {size:,} bytes, its manifest "
                                         f"says {entry['size']:,} (truncated or modified)")
        if digest != entry["sha256"]:
            raise CorruptCheckpointError(f"checkpoint {ckpt} is corrupt: {name} does not match its SHA-256 in the "
                                         "manifest (modified or damaged)")
    return True


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or +-inf, None when all are finite."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: this rank's part
            if not bool(torch.isfinite(local).all()):
                return name
    return None


def optimizer_tensors(state: Mapping) -> dict[str, torch.Tensor]:
    """The tensors of an optimizer state_dict's "state" as a flat name -> tensor dict (for finiteness checks)."""
    out = {}
    for pid, slots in (state.get("state") or {}).items():
        if isinstance(slots, Mapping):
            out.update({f"state.{pid}.{k}": v for k, v in slots.items() if isinstance(v, torch.Tensor)})
    return out


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
