"""Shared fixtures for the ops tests: location of the shared golden vectors."""

from __future__ import annotations

from pathlib import Path

import pytest

# The repository is /work/main and the shared material lives beside it, in /work/shared.
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
GOLDEN = SHARED / "testdata" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Directory of the golden float64 vectors; skips the test when ../shared is absent."""
    if not GOLDEN.is_dir():
        pytest.skip(f"shared golden vectors not found at {GOLDEN} (../shared absent)")
    return GOLDEN
