"""`last_logits_only=True`: the logits of each row's last real position, as in a full forward."""

import pytest
import torch

from megalodon_lm import MegalodonConfig, MegalodonLM


def test_last_logits_only_matches_full_forward_and_streams():
    torch.manual_seed(0)
    model = MegalodonLM(MegalodonConfig.from_preset("nano", chunk_size=16)).eval()
    x = torch.randint(0, 256, (3, 41))
    mask = torch.ones(3, 41, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        full = model(x, attention_mask=mask, return_state=True)
        last = model(x, attention_mask=mask, return_state=True, last_logits_only=True)
    assert last.logits.shape == (3, 1, 256)
    for row, n in enumerate((41, 25, 3)):
        ref = full.logits[row, n - 1]
        assert float((last.logits[row, 0] - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(last.state.positions, full.state.positions)


def test_last_logits_only_refuses_targets():
    model = MegalodonLM(MegalodonConfig.from_preset("nano", chunk_size=16))
    x = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="last_logits_only"):
        model(x, targets=x, last_logits_only=True)
