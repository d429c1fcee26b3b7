"""megalodon-lm: Megalodon long-context language models in plain PyTorch (exact, streaming, CPU-friendly)."""

from .models import PRESETS, MegalodonConfig, MegalodonLM, MegalodonOutput, StreamState

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "MegalodonConfig",
    "MegalodonLM",
    "MegalodonOutput",
    "StreamState",
    "TrainConfig",
    "__version__",
    "generate",
    "load_run",
    "load_state",
    "save_state",
    "stream_generate",
    "train",
]

_LAZY = {"train": "training", "load_run": "training", "TrainConfig": "training", "generate": "generation",
         "stream_generate": "generation", "save_state": "generation", "load_state": "generation"}


def __getattr__(name: str):
    """Training and generation entry points load on first use (they pull in the data and tokenizer stack)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# transformers, PEFT and lm-eval learn about this package when (and if) they are imported: nothing loads now.
from .integrations import install as _install_integrations  # noqa: E402

_install_integrations()
