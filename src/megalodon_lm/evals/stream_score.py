"""Log-likelihood of token rows of any length: a ragged batch streamed through the state, piece by piece.

`score_rows(model, rows, n_scored)` scores the last `n_scored[i]` tokens of `rows[i]`, each predicted from
everything before it in its row (no truncation, no sliding window: the constant-size state carries the
prefix). Rows are right-padded into one batch and fed `piece_tokens` columns per forward; pieces with no
scored position project no logits (`last_logits_only`), so memory is bounded by the piece, not the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.megalodon import MegalodonLM
from ..models.state import StreamState


@dataclass
class RowScore:
    """Sum of log-probabilities (nats) of the scored tokens, and whether greedy decoding gives all of them."""

    logprob: float
    is_greedy: bool


def _check(rows: Sequence[Sequence[int]], n_scored: Sequence[int], piece_tokens: int) -> None:
    if len(rows) != len(n_scored):
        raise ValueError(f"{len(rows)} rows but {len(n_scored)} n_scored values")
    if piece_tokens < 1:
        raise ValueError(f"piece_tokens must be >= 1, got {piece_tokens}")
    for i, (row, n) in enumerate(zip(rows, n_scored, strict=True)):
        if not 0 <= n <= len(row) - 1:
            raise ValueError(f"row {i}: {n} scored tokens, but a row of {len(row)} tokens has at most "
                             f"{len(row) - 1} predicted tokens (its first token is context)")


@torch.inference_mode()
def score_rows(model: MegalodonLM, rows: Sequence[Sequence[int]], n_scored: Sequence[int],
               piece_tokens: int = 2048) -> list[RowScore]:
    """One `RowScore` per row: its last `n_scored[i]` tokens given all the tokens before them."""
    _check(rows, n_scored, piece_tokens)
    device = model.embed.weight.device
    B = len(rows)
    lengths = torch.tensor([len(r) - 1 for r in rows])  # inputs: every token but the last
    width = int(lengths.max())
    tokens = torch.zeros(B, width + 1, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    first = lengths - torch.tensor(list(n_scored))  # first scored input column of each row
    logprob = torch.zeros(B, dtype=torch.float64)
    greedy = torch.ones(B, dtype=torch.bool)
    state: StreamState | None = None
    start = 0
    while start < width:
        end = min(start + piece_tokens, width)
        scored = (first < end) & (first < lengths)  # rows with scored columns before `end`
        split = int(first[scored].min()) if bool(scored.any()) else end
        if start < split < end:  # feed the unscored columns first: they project no logits
            end = split
        seg_len = (lengths - start).clamp(0, end - start)
        real = torch.arange(end - start) < seg_len[:, None]
        mask = None if bool(real.all()) else real.to(device)
        project = bool(((first < end) & (first < lengths)).any())
        out = model(tokens[:, start:end].to(device), state=state, return_state=True, attention_mask=mask,
                    last_logits_only=not project)
        state = out.state
        if project:
            cols = torch.arange(start, end)
            take = real & (cols[None, :] >= first[:, None])  # (B, w) scored positions of this piece
            logp = torch.log_softmax(out.logits.float(), -1).cpu()
            target = tokens[:, start + 1:end + 1]
            picked = logp.gather(-1, target[..., None]).squeeze(-1)
            logprob += (picked.double() * take).sum(1)
            greedy &= ~((logp.argmax(-1) != target) & take).any(1)
        start = end
    return [RowScore(float(lp), bool(g)) for lp, g in zip(logprob, greedy, strict=True)]
