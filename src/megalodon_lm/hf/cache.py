"""`MegalodonCache`: a transformers `Cache` carrying a Megalodon `StreamState`.

The state has a fixed size (it does not grow with the context), so it has no per-layer key/value tensors for
transformers to inspect. `get_seq_length()` is the number of input columns fed so far, pads included (a
left-padded row's stream has consumed fewer real tokens: its own `state.positions`), which is what `generate`
uses to slice the new input ids off the full sequence.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..models.state import StreamState


class MegalodonCache(Cache):
    """Streaming state of a `MegalodonForCausalLM`; `state` is None until the first forward fills it."""

    is_compileable = False

    def __init__(self, state: StreamState | None = None) -> None:
        super().__init__(layers=[])
        if state is not None and not isinstance(state, StreamState):
            raise TypeError(f"MegalodonCache expects a StreamState or None, got {type(state).__name__}")
        self.state = state
        self.columns = 0 if state is None else int(state.positions.max())

    def update(self, state: StreamState, columns: int) -> None:
        """The state after a forward over `columns` more input columns."""
        self.state = state
        self.columns += columns

    def __repr__(self) -> str:
        return f"MegalodonCache(batch_size={self.batch_size}, seq_length={self.get_seq_length()})"

    # ------------------------------------------------------------------ facts transformers asks for
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        # Not "all linear": generate then slices the already-consumed ids off by get_seq_length().
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    # ------------------------------------------------------------------ batch manipulation (beam search etc.)
    def _select(self, index: torch.Tensor) -> None:
        if self.state is not None:
            index = index.to(self.state.device)
            self.state = self.state._map(lambda t: t.index_select(0, index))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state = None
        self.columns = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("a Megalodon streaming state cannot be rolled back (crop)")

    def activate_past_recording(self) -> None:
        return None
