"""Model level: config, the language model, and its streaming state."""

from .config import PRESETS, MegalodonConfig
from .megalodon import MegaBlock, MegalodonLM, MegalodonOutput
from .state import StreamState

__all__ = ["PRESETS", "MegaBlock", "MegalodonConfig", "MegalodonLM", "MegalodonOutput", "StreamState"]
