"""Output paths checked before the work that fills them, and written so that a failure loses nothing.

A command that computes for minutes and then cannot write its result (``eval ppl --out`` naming a directory,
a path under a regular file, a read-only directory) has wasted the work. Commands therefore check their
output paths up front (`check_output_file`, `check_output_dir`: one-line ValueError) and write files with
`write_text_atomic` (a temporary file renamed into place: an interrupted write leaves the old file or none).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_creatable_in(path: Path, flag: str, target: Path) -> None:
    """`path` (an existing ancestor of `target`) must be a directory we can create files in."""
    if not path.is_dir():
        raise ValueError(f"{flag} {target}: {path} is not a directory")
    try:  # os.access() is unreliable (root, ACLs, read-only mounts): create and delete a file
        fd, name = tempfile.mkstemp(dir=path, prefix=".tmp-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"{flag} {target}: cannot write in {path} ({exc.strerror or exc})") from exc


def check_output_file(path: str | Path, flag: str = "--out") -> Path:
    """ValueError unless `path` can be written as a file (missing parent directories will be created)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {target} is a directory; give a file name")
    _check_creatable_in(_nearest_existing(target.parent), flag, target)
    return target


def check_output_dir(path: str | Path, flag: str = "OUT_DIR") -> Path:
    """ValueError unless `path` is, or can be created as, a directory we can write in."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{flag} {target} exists and is not a directory")
    _check_creatable_in(_nearest_existing(target), flag, target)
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` (creating parent directories) via a temporary file renamed into place.

    An OSError (a full disk) becomes a one-line ValueError; the temporary file is removed and an existing
    file at `path` is left as it was."""
    target = Path(path)
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return target
