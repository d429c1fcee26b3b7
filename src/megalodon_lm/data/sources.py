"""Training text sources: resolving paths/globs to files, reading documents, the default corpus, val split.

A plain text file (optionally .gz/.xz) is one document of raw bytes. A `.jsonl` file has one document per
non-empty line: `{"text": ...}` for language modelling, or `{"prompt": ..., "response": ...}` for
fine-tuning (prompt tokens are later masked from the loss).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import lzma
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".text")
COMPRESSED_SUFFIXES = (".gz", ".xz")
# Directory names of the standard library's own test suites (test, tests, idlelib/idle_test, lib2to3/tests).
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_STDLIB_FILE_BYTES = 1024


@dataclass
class Document:
    """One training document. `text` and `prompt` are UTF-8 (or raw) bytes; `index` is its line in a .jsonl."""

    text: bytes
    source: str
    index: int
    prompt: bytes | None = None


def _base_suffix(path: Path) -> tuple[str, str]:
    """(content suffix, compression suffix or ""): "a.jsonl.gz" -> (".jsonl", ".gz")."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), ""


def is_text_file(path: Path) -> bool:
    """Whether a directory scan picks up `path`: a known text suffix, optionally .gz/.xz compressed."""
    return _base_suffix(path)[0] in TEXT_SUFFIXES


def is_jsonl(path: Path) -> bool:
    """Whether `path` is read as JSON lines (one document per line): .jsonl, .jsonl.gz, .jsonl.xz."""
    return _base_suffix(Path(path))[0] == ".jsonl"


def open_binary(path: Path) -> IO[bytes]:
    """Open for reading bytes, decompressing .gz and .xz transparently."""
    compression = _base_suffix(path)[1]
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _scan_directory(d: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(d):
        dirs[:] = [x for x in dirs if not x.startswith(".")]  # hidden folders (.git, .venv, ...)
        found.extend(Path(root) / f for f in files if not f.startswith(".") and is_text_file(Path(f)))
    return found


def _is_empty(path: Path) -> bool:
    if path.stat().st_size == 0:
        return True
    if _base_suffix(path)[1]:  # a compressed empty file still has a header: look inside
        with open_binary(path) as f:
            return f.read(1) == b""
    return False


def resolve_sources(paths: Sequence[str | Path]) -> list[Path]:
    """Files for a list of files, directories (recursive, text suffixes, no hidden files) and glob patterns.

    Returns absolute paths, sorted and de-duplicated. Raises ValueError for an entry that does not exist or
    matches no file, and when every resolved file is empty.
    """
    if isinstance(paths, (str, Path)):  # a lone path is an easy mistake: treat it as a list of one
        paths = [paths]
    files: set[Path] = set()
    for entry in paths:
        p = Path(entry)
        if p.is_file():
            files.add(p.resolve())
            continue
        if p.is_dir():
            matched = _scan_directory(p)
        elif any(c in str(entry) for c in "*?["):
            matched = []
            for m in sorted(glob.glob(str(entry), recursive=True)):
                mp = Path(m)
                matched.extend(_scan_directory(mp) if mp.is_dir() else [mp] if mp.is_file() else [])
        else:
            raise ValueError(f"data path not found: {entry}")
        if not matched:
            raise ValueError(f"data path not found: {entry} (matches no file with suffix "
                             f"{', '.join(TEXT_SUFFIXES)}, optionally {'/'.join(COMPRESSED_SUFFIXES)})")
        files.update(m.resolve() for m in matched)
    result = sorted(files)
    if not result:
        raise ValueError("data is empty: no data paths given")
    if all(_is_empty(f) for f in result):
        shown = ", ".join(str(f) for f in result[:5]) + (", ..." if len(result) > 5 else "")
        raise ValueError(f"data is empty: all {len(result)} file(s) are empty: {shown}")
    return result


def _utf8(value: str) -> bytes:
    # JSON may carry lone surrogates ("\ud800"), which strict UTF-8 cannot encode.
    return value.encode("utf-8", errors="replace")


def _iter_jsonl(path: Path, f: IO[bytes]) -> Iterator[Document]:
    for index, line in enumerate(f):
        if not line.strip():
            continue
        where = f"{path}:{index + 1}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            yield Document(text=_utf8(record["text"]), source=str(path), index=index)
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(
            record.get("response"), str
        ):
            yield Document(text=_utf8(record["response"]), source=str(path), index=index,
                           prompt=_utf8(record["prompt"]))
        else:
            raise ValueError(f"{where}: expected a JSON object with a string 'text' field, or string 'prompt' "
                             "and 'response' fields")


def iter_documents(path: Path) -> Iterator[Document]:
    """Documents of one file: a whole text file (raw bytes; none if empty), or one per .jsonl line."""
    path = Path(path)
    with open_binary(path) as f:
        if is_jsonl(path):
            yield from _iter_jsonl(path, f)
        else:
            data = f.read()
            if data:
                yield Document(text=data, source=str(path), index=0)


def stdlib_root() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus() -> list[Path]:
    """The standard library's .py files of at least 1 KB, without test suites and site-packages, sorted."""
    root = stdlib_root()
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not d.startswith(".")]
        for name in files:
            p = Path(dirpath) / name
            if name.endswith(".py") and not name.startswith(".") and p.stat().st_size >= _MIN_STDLIB_FILE_BYTES:
                found.append(p)
    if not found:
        raise ValueError(f"default corpus is empty: no .py files of at least {_MIN_STDLIB_FILE_BYTES} bytes under "
                         f"{root} (a Python without standard library sources?); pass data paths instead")
    return sorted(found)


def path_key(path: Path) -> str:
    """The name a file is split by: its path relative to the stdlib root, else the path string (posix)."""
    path = Path(path)
    root = stdlib_root()
    # Both spellings of the root: resolve_sources returns resolved paths, default_corpus does not.
    for base in (root, root.resolve()):
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            pass
    return path.as_posix()


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic coin flip: True for about `fraction` of all keys (sha256, not Python's salted hash)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction must be in [0, 1], got {fraction}")
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


def is_validation_path(path: Path, fraction: float = 0.02) -> bool:
    """Whether a file belongs to the validation split (about `fraction` of files, same on every machine)."""
    return in_validation(path_key(path), fraction)
