"""The import hook of `megalodon_lm.integrations`: runs after the hooked module, never breaks its import."""

from __future__ import annotations

import importlib
import sys

import pytest

from megalodon_lm import integrations


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    """A module `megalodon_fake_registry` on sys.path, not yet imported."""
    name = "megalodon_fake_registry"
    (tmp_path / f"{name}.py").write_text("REGISTRY = {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_hook_runs_after_the_module_executed(fake_module, monkeypatch):
    seen = []

    def hook():
        seen.append(dict(sys.modules[fake_module].REGISTRY))  # the module body has run: REGISTRY exists
        sys.modules[fake_module].REGISTRY["megalodon"] = True

    monkeypatch.setitem(integrations.HOOKS, fake_module, hook)
    module = importlib.import_module(fake_module)
    assert seen == [{}] and module.REGISTRY == {"megalodon": True}
    assert module.__loader__.get_source(fake_module) == "REGISTRY = {}\n"  # loader features pass through


def test_failing_hook_warns_and_the_import_succeeds(fake_module, monkeypatch):
    def broken():
        raise RuntimeError("registry moved")

    monkeypatch.setitem(integrations.HOOKS, fake_module, broken)
    with pytest.warns(UserWarning, match="could not register with megalodon_fake_registry .*registry moved"):
        module = importlib.import_module(fake_module)
    assert module.REGISTRY == {}
