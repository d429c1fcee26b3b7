"""Reading torch.distributed.checkpoint (DCP) directories without executing anything they contain.

DCP's stock `FileSystemReader` reads ``.metadata`` with `pickle.load`, and its `DefaultLoadPlanner` restores
non-tensor values (an optimizer's ``param_groups``: floats, tuples, ...) with ``torch.load(weights_only=False)``.
A crafted file therefore runs arbitrary code on every rank that loads it. Here:

- `SafeFileSystemReader` reads ``.metadata`` with `MetadataUnpickler`, which resolves only the plain data
  classes DCP writes (``torch.distributed.checkpoint.metadata``, ``_StorageInfo``, ``torch.Size``, dtypes,
  layouts, paths) and refuses every other global before anything is called; the result is then checked to be a
  `Metadata` whose shards are plain file names inside the checkpoint directory.
- `SafeLoadPlanner` restores non-tensor values with ``torch.load(weights_only=True)``.

Tensor shards were already read with ``weights_only=True`` by DCP itself. Use `safe_load` instead of
`dcp.load` wherever a checkpoint comes from disk.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from ..training.manifest import CorruptCheckpointError

_METADATA = "torch.distributed.checkpoint.metadata"
# (module, name) pairs the metadata of DCP's FileSystemWriter references (torch 2.4 - 2.13); all are plain data
# classes, enums or value constructors: calling them with any arguments runs no user-controlled code.
ALLOWED_GLOBALS = frozenset({
    (_METADATA, "Metadata"), (_METADATA, "MetadataIndex"), (_METADATA, "StorageMeta"),
    (_METADATA, "TensorProperties"), (_METADATA, "TensorStorageMetadata"), (_METADATA, "BytesStorageMetadata"),
    (_METADATA, "ChunkStorageMetadata"), (_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, cls) for module in ("pathlib", "pathlib._local")
      for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
})
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)  # torch.float32 etc. are pickled by name


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint file asks to construct something other than checkpoint metadata: refused, nothing ran."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any other global (os.system, builtins.eval, ...) is refused by name."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to load {self.path}: it references {module}.{name}, which is not checkpoint metadata "
            "(a tampered or foreign file; nothing in it was run)")


def _check_relative(name: Any, path: Path) -> None:
    # A shard name leading elsewhere (../, an absolute path) would make the reader open files outside dcp/.
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CorruptCheckpointError(f"{path}: shard file name {name!r} is not a file inside the checkpoint")


def read_metadata(path: str | Path) -> Metadata:
    """The `Metadata` of a DCP ``.metadata`` file, read with `MetadataUnpickler` and checked for shape."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # truncated or garbled pickle: EOFError, UnpicklingError, TypeError, ...
        raise CorruptCheckpointError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CorruptCheckpointError(f"{path} holds {type(metadata).__name__}, not checkpoint metadata")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CorruptCheckpointError(f"{path} has no shard table")
    for info in storage.values():
        _check_relative(getattr(info, "relative_path", None), path)
        for field in ("offset", "length"):
            value = getattr(info, field, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CorruptCheckpointError(f"{path}: shard {field} {value!r} is not a byte count")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose ``.metadata`` goes through `read_metadata` (no arbitrary unpickling).

    metadata: the checkpoint's metadata already read by `read_metadata` (`safe_load` reads it first, so that a
    refusal is raised as such: DCP's load swallows a reader's exception and retries with per-rank metadata)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is not None and kwargs.get("rank") is None:
            metadata = self._metadata
        else:
            metadata = read_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` restoring non-tensor values with ``weights_only=True`` (plain containers, numbers,
    strings: what an optimizer's param_groups hold)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as exc:  # weights_only refuses any other global: one line, no traceback
            raise UnsafeCheckpointError(f"refusing a non-tensor value {read_item.dest_index.fqn!r} of the "
                                        f"checkpoint: {str(exc).splitlines()[0]}") from exc
        # DefaultLoadPlanner.load_bytes, minus its own torch.load
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def root_cause(exc: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException (itself when there is none)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            return inner
    return exc


def safe_load(state_dict: dict[str, Any], checkpoint_dir: str | Path, **kwargs: Any) -> None:
    """`dcp.load` with `SafeFileSystemReader` and `SafeLoadPlanner` (kwargs: no_dist, process_group, ...).

    Any failure is a `CorruptCheckpointError` with one line (DCP itself reports one traceback per rank)."""
    metadata = read_metadata(Path(checkpoint_dir) / ".metadata")  # refused or damaged: raised here, one line
    try:
        dcp.load(state_dict, storage_reader=SafeFileSystemReader(str(checkpoint_dir), metadata),
                 planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as exc:
        cause = root_cause(exc)
        if isinstance(cause, CorruptCheckpointError):
            raise cause.with_traceback(None) from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise CorruptCheckpointError(f"cannot load the sharded checkpoint {checkpoint_dir}: "
                                     f"{type(cause).__name__}: {first}") from None
