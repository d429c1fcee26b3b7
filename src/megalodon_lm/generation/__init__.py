"""Text generation: chunked constant-memory prefill, streaming decode, sampling and saved stream states."""

from .decoding import as_prompt_batch, generate, prefill, stream_generate
from .state_io import STATE_FORMAT_VERSION, StateFileInfo, load_state, read_state_info, save_state

__all__ = [
    "STATE_FORMAT_VERSION",
    "StateFileInfo",
    "as_prompt_batch",
    "generate",
    "load_state",
    "prefill",
    "read_state_info",
    "save_state",
    "stream_generate",
]
