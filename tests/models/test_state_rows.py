"""StreamState.stack / select: streams with different histories batched together and taken apart again."""

from __future__ import annotations

import pytest
import torch

from megalodon_lm import StreamState

from .helpers import CHUNK, nano_model, random_ids, rel_err

SMALL = dict(model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, norm_num_groups=4)


@torch.no_grad()
def test_stack_then_select_continues_each_stream_exactly():
    """Two streams at different positions and chunk offsets, stacked into one batch, fed one more piece
    together, then selected apart: each equals its own whole-sequence forward."""
    model = nano_model(seed=0, **SMALL)
    ids = random_ids(2, 3 * CHUNK, seed=2)
    cut = (CHUNK + 5, 2 * CHUNK - 3)  # different positions, different offsets inside the chunk
    states = [model(ids[i:i + 1, :cut[i]], return_state=True).state for i in range(2)]
    both = StreamState.stack(states)
    assert both.batch_size == 2 and both.positions.tolist() == list(cut)
    width = 3 * CHUNK - max(cut)
    piece = torch.stack([ids[i, cut[i]:cut[i] + width] for i in range(2)])
    out = model(piece, state=both, return_state=True)
    for i in range(2):
        whole = model(ids[i:i + 1, :cut[i] + width]).logits[:, cut[i]:]
        assert rel_err(out.logits[i:i + 1], whole) < 1e-5
        alone = out.state.select([i], chunk_size=CHUNK)
        assert alone.positions.tolist() == [cut[i] + width]
        assert alone.layers[0].attn_k.shape[1] == (cut[i] + width) % CHUNK  # trimmed to its own partial chunk
        nxt = ids[i:i + 1, :4]
        ref = model(nxt, state=model(ids[i:i + 1, :cut[i] + width], return_state=True).state).logits
        assert rel_err(model(nxt, state=alone).logits, ref) < 1e-5


def test_stack_errors_and_select_copies():
    model = nano_model(seed=0, **SMALL)
    s = model.init_state(2)
    with pytest.raises(ValueError, match="at least one"):
        StreamState.stack([])
    one = s.select([1])
    one.positions += 5
    assert s.positions.tolist() == [0, 0]  # a copy, not a view
    short = StreamState(s.layers[:1], s.final_norm, s.positions)
    with pytest.raises(ValueError, match="numbers of layers"):
        StreamState.stack([s, short])
