"""Fixtures of the serve tests: a tiny random run directory and in-process apps over it."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")

from megalodon_lm.serve.app import create_app  # noqa: E402
from megalodon_lm.serve.loading import load_model_dir  # noqa: E402
from megalodon_lm.serve.service import ServeSettings, Service  # noqa: E402

from .helpers import make_run_dir  # noqa: E402


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("serve") / "run")


@pytest.fixture(scope="session")
def loaded(run_dir):
    return load_model_dir(run_dir)


@pytest.fixture
def make_app(loaded, tmp_path):
    """make_app(db=None, model=None, **settings) -> a Starlette app over a Service (fresh db by default)."""

    def make(db=None, model=None, **settings):
        m, tok = model or loaded
        service = Service(m, tok, db or tmp_path / "sessions.sqlite3", ServeSettings(model_id="tiny", **settings))
        return create_app(service)

    return make
