"""`MegalodonLM`: embedding -> Megalodon blocks -> TimestepNorm -> output projection, with streaming.

Module and parameter names follow the reference inventory (docs/architecture.md §1.7), so a reference
world-size-1 consolidated state dict loads with `load_state_dict(..., strict=True)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..modules.ffn import NormalizedFeedForwardNetwork
from ..modules.init import init_embedding, init_linear
from ..modules.mega import MegaLayerState, MovingAverageGatedAttention, StreamInfo
from ..modules.rotary import RotaryEmbedding
from ..modules.timestep_norm import TimestepNorm
from .config import MegalodonConfig
from .state import StreamState
from .validation import check_inputs, check_packed_call, check_state


@dataclass
class MegalodonOutput:
    """logits (B, L, V) float32 (float64 for a float64 model); loss scalar or None; state or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    state: StreamState | None = None


class MegaBlock(nn.Module):
    """One Megalodon block: MEGA sub-layer, then the normalised FFN whose residual is the block input."""

    def __init__(self, cfg: MegalodonConfig, layer_id: int) -> None:
        super().__init__()
        self.mega = MovingAverageGatedAttention(cfg)
        self.nffn = NormalizedFeedForwardNetwork(cfg, layer_id)

    def forward(self, x, state, info, freqs):
        y, new_state = self.mega(x, state, info, freqs)
        return self.nffn(y, residual=x), new_state


class MegalodonOutputLayer(nn.Module):
    """Final TimestepNorm then a bias-free projection D -> V (absent when tied to the embedding)."""

    def __init__(self, cfg: MegalodonConfig) -> None:
        super().__init__()
        self.final_norm = TimestepNorm(cfg.model_dim, cfg.norm_num_groups, cfg.norm_eps)
        self.output = None if cfg.share_emb else nn.Linear(cfg.model_dim, cfg.effective_output_size, bias=False)


class MegalodonLM(nn.Module):
    """Megalodon causal language model with exact streaming.

    `model(input_ids, targets=None, state=None, return_state=False, attention_mask=None)`:
    input_ids (B, L) integer; targets (B, L) aligned with the logits (no shift), -100 = ignored;
    attention_mask (B, L), 1 = real token, 0 = right padding of this segment. Returns a
    `MegalodonOutput`. Pass `out.state` back in to continue each row's stream exactly.

    Packed documents: `model(input_ids, targets, cu_seqlens=cu)` with cu (n_docs + 1,) int32/int64 the
    cumulative document lengths over the B*L tokens read row-major (FlashAttention's varlen convention;
    see docs/varlen.md). Each document is computed exactly as if it were alone: fresh CEMA state and
    TimestepNorm statistics, its own attention chunk grid and RoPE origin. No streaming state, padding
    mask or last_logits_only with it.
    """

    def __init__(self, config: MegalodonConfig) -> None:
        super().__init__()
        if not isinstance(config, MegalodonConfig):
            raise TypeError(f"MegalodonLM expects a MegalodonConfig, got {type(config).__name__}")
        self.config = config
        cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        self.layers = nn.ModuleList(MegaBlock(cfg, i) for i in range(cfg.num_layers))
        self.output = MegalodonOutputLayer(cfg)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.effective_rope_base)
        self.emb_scale = math.sqrt(cfg.model_dim) if cfg.scale_emb else 1.0
        self.gradient_checkpointing = cfg.layerwise_ckpt
        self._register_load_state_dict_pre_hook(self._drop_tied_output)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Reference initialisation (§1.6 and §2.2) of every parameter."""
        cfg = self.config
        init_embedding(self.embed.weight, cfg.model_dim)
        if self.output.output is not None:
            init_embedding(self.output.output.weight, cfg.model_dim)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module is not self.output.output:
                init_linear(module, cfg.init_mode)
            elif module is not self and hasattr(module, "reset_parameters") and not isinstance(
                module, (nn.Linear, nn.Embedding)
            ):
                module.reset_parameters()

    def _drop_tied_output(self, state_dict, prefix, *args) -> None:
        """A tied reference checkpoint may carry the shared matrix twice; keep the embedding's copy."""
        if self.output.output is None:
            state_dict.pop(prefix + "output.output.weight", None)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.output.output is None else self.output.output.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> StreamState:
        """The state of B fresh streams (what a forward with state=None starts from)."""
        cfg = self.config
        device = self.embed.weight.device if device is None else device
        dt = self.output.final_norm.initial_stats(1)[1].dtype
        cdt = torch.complex128 if dt == torch.float64 else torch.complex64
        layers = []
        for block in self.layers:
            stats = tuple(t.to(device) for t in block.mega.timenorm.initial_stats(batch_size))
            layers.append(MegaLayerState(
                stats,
                torch.zeros(batch_size, cfg.model_dim, cfg.cema_ndim, dtype=cdt, device=device),
                torch.zeros(batch_size, 0, cfg.num_heads, cfg.head_dim, dtype=dt, device=device),
                torch.zeros(batch_size, 0, cfg.num_heads, cfg.value_head_dim, dtype=dt, device=device),
            ))
        final = tuple(t.to(device) for t in self.output.final_norm.initial_stats(batch_size))
        return StreamState(layers, final, torch.zeros(batch_size, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: StreamState | None = None,
        return_state: bool = False,
        attention_mask: torch.Tensor | None = None,
        *,
        last_logits_only: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> MegalodonOutput:
        """See the class docstring. `last_logits_only=True` projects only each row's last real position:
        logits (B, 1, V), for prefilling long prompts without materialising (B, L, V) logits."""
        if last_logits_only and targets is not None:
            raise ValueError("last_logits_only=True computes no loss: pass targets=None")
        valid = check_inputs(input_ids, targets, attention_mask, self.config.vocab_size)
        B, L = input_ids.shape
        if cu_seqlens is not None:
            cu_seqlens = check_packed_call(cu_seqlens, B * L, input_ids.device, state is not None, return_state,
                                           attention_mask is not None, last_logits_only)
        if state is not None:
            check_state(state, self.config, B, input_ids.device)
        need_state = return_state or state is not None
        lengths = valid.sum(1) if valid is not None else torch.full((B,), L, device=input_ids.device)
        positions = state.positions if state is not None else torch.zeros_like(lengths)
        # No state: every row starts a chunk; offsets=None lets attention skip a host-synchronising grouping.
        offsets = None if state is None else positions % self.config.chunk_size
        info = StreamInfo(valid, lengths, offsets, need_state, cu_seqlens)

        x = self.embed(input_ids)
        if self.emb_scale != 1.0:
            x = x * self.emb_scale
        x = F.dropout(x, self.config.dropout, self.training)
        freqs = self.rope.freqs
        new_layers = []
        for i, block in enumerate(self.layers):
            ls = None if state is None else state.layers[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, new_ls = checkpoint(block, x, ls, info, freqs, use_reentrant=False)
            else:
                x, new_ls = block(x, ls, info, freqs)
            new_layers.append(new_ls)
        x, final_stats = self.output.final_norm(x, None if state is None else state.final_norm, valid, cu_seqlens)
        if last_logits_only:
            last = (lengths - 1).clamp(min=0)
            x = x[torch.arange(B, device=x.device), last].unsqueeze(1)
        logits = F.linear(x, self.output_weight)
        logits = logits.double() if logits.dtype == torch.float64 else logits.float()

        loss = None
        if targets is not None:
            tgt = targets if valid is None else targets.masked_fill(~valid, -100)
            loss = F.cross_entropy(logits.reshape(B * L, -1), tgt.reshape(B * L), ignore_index=-100)
        new_state = StreamState(new_layers, final_stats, positions + lengths) if need_state else None
        return MegalodonOutput(logits=logits, loss=loss, state=new_state)
