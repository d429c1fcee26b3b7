"""Input and state checks for `MegalodonLM.forward`: clear errors instead of failures deep inside."""

from __future__ import annotations

import torch

from ..ops.varlen import check_cu_seqlens
from .config import MegalodonConfig
from .state import StreamState


def _check_int_tensor(name: str, t: torch.Tensor, shape: tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {t.dtype}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def check_inputs(
    input_ids: torch.Tensor,
    targets: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    vocab_size: int,
) -> torch.Tensor | None:
    """Validate the call; returns the (B, L) bool mask of real tokens, or None when all are real."""
    _check_int_tensor("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if B == 0 or L == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); need at least one token per row")
    if targets is not None:
        _check_int_tensor("targets", targets, (B, L))
    if attention_mask is None and torch.compiler.is_compiling():
        # Value checks read tensor contents (a host sync, a graph break under torch.compile): a compiled
        # model checks shapes and dtypes only; eager calls check everything.
        return None
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got values in [{lo}, {hi}]")
    if targets is not None:
        bad = (targets != -100) & ((targets < 0) | (targets >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"targets must be -100 or lie in [0, {vocab_size}); found {int(targets[bad][0])}")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention_mask must have shape {(B, L)}, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    valid = attention_mask.to(device=input_ids.device) != 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError("attention_mask must be right padding: no real token (1) may follow a pad (0) in a row")
    return None if bool(valid.all()) else valid


def check_packed_call(
    cu_seqlens: torch.Tensor, n_tokens: int, device: torch.device, has_state: bool, return_state: bool,
    has_mask: bool, last_logits_only: bool,
) -> torch.Tensor:
    """cu_seqlens is for whole-sequence training/prefill of packed documents; returns it on `device`."""
    if has_state or return_state:
        raise ValueError("cu_seqlens (packed documents) does not support streaming: pass neither state nor "
                         "return_state=True")
    if has_mask:
        raise ValueError("cu_seqlens and attention_mask cannot be combined: make padding its own document")
    if last_logits_only:
        raise ValueError("cu_seqlens and last_logits_only cannot be combined")
    check_cu_seqlens(cu_seqlens, n_tokens)
    return cu_seqlens.to(device)


def check_state(state: StreamState, cfg: MegalodonConfig, batch_size: int, device: torch.device) -> None:
    """The state must come from a model with this config, for this batch size, on this device."""
    if not isinstance(state, StreamState):
        raise TypeError(f"state must be a StreamState (from out.state), got {type(state).__name__}")
    if state.batch_size != batch_size:
        raise ValueError(f"state is for batch size {state.batch_size}, but input_ids has batch size {batch_size}")
    if len(state.layers) != cfg.num_layers:
        raise ValueError(f"state has {len(state.layers)} layers, the model has {cfg.num_layers}")
    if state.positions.device != device:
        raise ValueError(f"state is on {state.positions.device}, input_ids on {device}; use state.to(device)")
    B, D, N, G = batch_size, cfg.model_dim, cfg.cema_ndim, cfg.norm_num_groups
    H, dz, dv = cfg.num_heads, cfg.head_dim, cfg.value_head_dim
    max_offset = int((state.positions % cfg.chunk_size).max())
    for i, ls in enumerate(state.layers):
        expect = {"norm mean": (ls.norm[1], (B, G)), "norm var": (ls.norm[2], (B, G)),
                  "CEMA state": (ls.cema, (B, D, N))}
        for what, (t, shape) in expect.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"state layer {i} {what} has shape {tuple(t.shape)}, this model needs {shape} "
                                 "(a state from another config?)")
        k, v = ls.attn_k, ls.attn_v
        bad_k = k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, H, dz)
        if bad_k or tuple(v.shape) != (B, k.shape[1], H, dv):
            raise ValueError(f"state layer {i} attention cache has shapes {tuple(k.shape)}/{tuple(v.shape)}, this "
                             f"model needs (B={B}, n, H={H}, {dz}) and (B, n, H, {dv})")
        if k.shape[1] < max_offset or k.shape[1] >= cfg.chunk_size:
            raise ValueError(f"state layer {i} caches {k.shape[1]} tokens but positions need {max_offset} "
                             f"(chunk_size {cfg.chunk_size}): a state from another config?")
    if tuple(state.final_norm[1].shape) != (B, G):
        raise ValueError(f"state final norm has shape {tuple(state.final_norm[1].shape)}, this model needs {(B, G)}")
