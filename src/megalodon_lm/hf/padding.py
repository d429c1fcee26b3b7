"""Padding anywhere in a row (transformers pads on the left for generation) on top of `MegalodonLM`'s
right-padding support: move each row's real tokens to the front, run, put the outputs back.

A row's stream consumes its real tokens in order and skips every pad, so a padded row computes what the
row computes alone: pads touch no TimestepNorm statistics, no CEMA state and no attention cache.
"""

from __future__ import annotations

import torch


def real_tokens(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B, length) bool, True = real token, for the last `length` mask columns; None when all are real.

    transformers passes the mask of the whole sequence so far (past + current columns).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D (batch, length), got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns, fewer than the {length} input ids")
    valid = attention_mask[:, attention_mask.shape[1] - length:] != 0
    return None if bool(valid.all()) else valid


def left_align_order(valid: torch.Tensor) -> torch.Tensor | None:
    """(B, L) column order that puts each row's real tokens first, in order, pads after; None if already so."""
    if not bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        return None
    return torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices


def gather_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, L, ...) with row b's columns taken in `order[b]` (B, L)."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def scatter_columns(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `gather_columns`: column j of x goes back to column order[b, j]."""
    index = order.view(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.empty_like(x).scatter_(1, index, x)


def restore(x: torch.Tensor, order: torch.Tensor | None, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-position outputs (B, L, ...) of the left-aligned call back in the caller's columns, 0 at the pads."""
    if order is not None:
        x = scatter_columns(x, order)
    if valid is not None:
        x = x.masked_fill(~valid.view(*valid.shape, *([1] * (x.dim() - 2))), 0)
    return x
