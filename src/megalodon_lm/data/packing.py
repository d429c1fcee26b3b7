"""Document masking for training windows: split EOS-separated documents with `cu_seqlens`.

A training window (a row of `sample_batch`) is a slice of the token stream, where documents are joined as
doc tokens + [EOS]. With document masking, a new document starts at every row start and right after every
EOS; the EOS belongs to the document it ends. The target at an EOS position (the next document's first
token) stays scored, as without masking: the prediction there sees only the ending document, and keeping
it makes masked and unmasked losses count the same targets.
"""

from __future__ import annotations

import torch


def document_cu_seqlens(x: torch.Tensor, eos_id: int) -> torch.Tensor:
    """x: (B, L) token ids -> cu_seqlens (n_docs + 1,) int64 over the B*L tokens; documents never cross rows."""
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (batch, length) tensor, got shape {tuple(x.shape)}")
    B, L = x.shape
    starts = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    starts[:, 0] = True
    starts[:, 1:] = x[:, :-1] == eos_id
    first = starts.flatten().nonzero().view(-1)
    return torch.cat([first, first.new_tensor([B * L])])


class DocumentMaskedForward:
    """Wraps a model (or its compiled form): `f(x)` is `model(x, cu_seqlens=document_cu_seqlens(x, eos_id))`."""

    def __init__(self, model, eos_id: int) -> None:
        self.model, self.eos_id = model, eos_id

    def __call__(self, x: torch.Tensor):
        return self.model(x, cu_seqlens=document_cu_seqlens(x, self.eos_id))
