"""Fixtures of the reliability tests: the training tests' tiny runs, a finished run to damage, read-only paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from training.conftest import cache_dir, single_thread, text_file  # noqa: F401 - shared fixtures

from .helpers import STEPS, tiny_run


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, text_file, cache_dir) -> Path:  # noqa: F811 - the imported fixtures
    """A finished tiny run with verified checkpoints at steps 2, 4 and 6 (`latest` = 6)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tiny_run(text_file, out, cache_dir, max_steps=STEPS)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of `finished_run` that a test may damage."""
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst
