"""megalodon-lm: Megalodon long-context language models in plain PyTorch (exact, streaming, CPU-friendly)."""

from .models import PRESETS, MegalodonConfig, MegalodonLM, MegalodonOutput, StreamState

__version__ = "0.1.0"

__all__ = ["PRESETS", "MegalodonConfig", "MegalodonLM", "MegalodonOutput", "StreamState", "__version__"]
