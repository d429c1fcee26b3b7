"""Helpers of the reliability tests: tiny runs through the real CLI entry point (in-process, so the whole folder
stays within seconds), the one-line error check, and read-only directories that hold even for root."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from training.conftest import tiny_options, torch_threads

from megalodon_lm.cli import main
from megalodon_lm.training.checkpoint import latest_checkpoint

STEPS = 6  # checkpoints at 2, 4, 6


def tiny_run(data: Path, out: Path, cache: Path, **overrides: Any):
    import megalodon_lm

    options = tiny_options(data, out, cache, **{"max_steps": STEPS, "save_every": 2, "keep_last": 10, **overrides})
    with torch_threads(1):
        return megalodon_lm.train(None, **options)


def train_argv(data: Path, out: Path, cache: Path, **overrides: Any) -> list[str]:
    """`megalodon-lm train` arguments of a tiny run (the [model] overrides go through a TOML file)."""
    options = tiny_options(data, out, cache, **{"max_steps": STEPS, "save_every": 2, "keep_last": 10, **overrides})
    text = "[model]\n" + "".join(f"{k} = {v}\n" for k, v in options.pop("model").items())
    toml = Path(cache).parent / f"model-{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml"  # not under out
    toml.write_text(text)
    argv = ["train", "--config", str(toml)]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`megalodon-lm ARGV` in this process with one torch thread -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    with torch_threads(1):
        code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str, pattern: str | None = None, progress: bool = False) -> str:
    """The stderr of a failed command: exactly one line, `megalodon-lm: error: ...` (no traceback).

    progress: the command also logs progress lines to stderr (eval ppl off a terminal): only its own
    `megalodon-lm:` lines count, and there must be no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if progress:
        lines = [line for line in lines if line.startswith("megalodon-lm:")]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("megalodon-lm: error: "), lines[0]
    if pattern is not None:
        import re

        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


def final_weights(run_dir: Path) -> dict:
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- read-only directories
def _inside(path: Any, root: Path) -> bool:
    try:
        p = Path(os.fsdecode(path) if not isinstance(path, int) else "")
    except TypeError:
        return False
    if not str(p):
        return False
    p = p if p.is_absolute() else Path.cwd() / p
    return p == root or root in p.parents


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` (an existing directory) is read-only for the block.

    chmod suffices for an ordinary user; root ignores permissions, so there every Python-level way of creating,
    opening for writing or renaming a file under `path` fails with EROFS instead (a read-only mount)."""
    root = Path(path).resolve()
    root.chmod(0o555)
    monkeypatch = pytest.MonkeyPatch()
    try:
        probe = root / ".probe"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            simulated = True
        except OSError:
            simulated = False
        if simulated:
            _inject_erofs(root, monkeypatch)
        yield
    finally:
        monkeypatch.undo()
        root.chmod(0o755)


def _inject_erofs(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(target: Any) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(target))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    real_replace, real_rename = os.replace, os.rename
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file, root):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(file, flags, *args, **kwargs):
        if flags & writing and _inside(file, root):
            refuse(file)
        return real_os_open(file, flags, *args, **kwargs)

    def fake_mkdir(file, *args, **kwargs):
        if _inside(file, root):
            refuse(file)
        return real_mkdir(file, *args, **kwargs)

    def guard_move(real):
        def move(src, dst, *args, **kwargs):
            if _inside(src, root) or _inside(dst, root):
                refuse(dst)
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "replace", guard_move(real_replace))
    monkeypatch.setattr(os, "rename", guard_move(real_rename))
