"""Chunk parallelism: one training sequence split into K contiguous pieces on K ranks, with the stream state
handed from rank to rank (the paper's 32K-token training on 2 GPUs).

Rank r of the chunk group holds positions [r P, (r + 1) P) of every sequence, P a multiple of chunk_size, so
the attention cache is empty at piece boundaries and the only state that crosses ranks is, per layer, the
TimestepNorm (count, mean, var) and the complex CEMA state, plus the final norm's statistics. Rank r receives
that state from r - 1 and sends its own to r + 1 through autograd functions, so the backward pass sends the
state gradients back from r + 1 to r and every gradient equals one process on the whole sequence.

What overlaps with what:
- Rank r posts the receives for all layers at the start of its forward and waits for layer i only right before
  layer i, and sends layer i's state (non-blocking) as soon as layer i is done. The ranks therefore run as a
  wavefront: rank r computes layer i while rank r - 1 computes layer i + 1, and one forward takes
  (num_layers + K - 1) layer times instead of K x num_layers.
- The receive of each state gradient is posted during the forward, right after the state is sent, so it lands
  while this rank runs the backward of later layers; the backward of layer i waits for it only there.
- Gradient sends are non-blocking; all pending communication is completed after the backward (`Comm.wait`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models import MegalodonLM
from ..modules.mega import MegaLayerState, StreamInfo

_TAGS_PER_STATE = 3  # payload, count, payload gradient


class Comm:
    """Outstanding non-blocking sends/receives of one micro-batch, and the buffers they use."""

    def __init__(self) -> None:
        self.works: list[dist.Work] = []
        self.keep: list[torch.Tensor] = []  # buffers of in-flight sends must outlive them

    def isend(self, t: torch.Tensor, dst: int, group, tag: int) -> None:
        t = t.detach().contiguous()
        self.keep.append(t)
        self.works.append(dist.isend(t, dst, group=group, tag=tag))

    def wait(self) -> None:
        """Complete every outstanding operation (call after the backward)."""
        for w in self.works:
            w.wait()
        self.works.clear()
        self.keep.clear()


class _SendState(torch.autograd.Function):
    """Forward: send `payload` to the next rank; returns a zero scalar to add to the loss. Backward: the
    gradient of `payload` is the one the next rank sends back (its receive was posted in the forward)."""

    @staticmethod
    def forward(ctx, payload, dst, group, tag, comm):
        comm.isend(payload, dst, group, tag)
        ctx.grad = torch.empty_like(payload)
        ctx.work = dist.irecv(ctx.grad, dst, group=group, tag=tag + 2)
        return payload.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_dummy):
        ctx.work.wait()
        grad, ctx.grad = ctx.grad, None
        return grad, None, None, None, None


class _RecvState(torch.autograd.Function):
    """Forward: the payload received from the previous rank. Backward: send its gradient back there."""

    @staticmethod
    def forward(ctx, anchor, received, src, group, tag, comm):
        ctx.src, ctx.group, ctx.tag, ctx.comm = src, group, tag, comm
        return received.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.comm.isend(grad, ctx.src, ctx.group, ctx.tag + 2)
        return None, None, None, None, None, None


def _pack(norm: tuple[torch.Tensor, ...], cema: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """TimestepNorm mean/var (B, G) and the complex CEMA state (B, D, N) as one flat real tensor."""
    parts = [norm[1].reshape(-1), norm[2].reshape(-1)]
    if cema is not None:
        parts.append(torch.view_as_real(cema).reshape(-1))
    return torch.cat([p.to(dtype) for p in parts])


def _unpack(flat: torch.Tensor, count: torch.Tensor, tmpl_norm, tmpl_cema: torch.Tensor | None):
    mean_t, var_t = tmpl_norm[1], tmpl_norm[2]
    n = mean_t.numel()
    norm = (count, flat[:n].view_as(mean_t).to(mean_t.dtype), flat[n : 2 * n].view_as(var_t).to(var_t.dtype))
    if tmpl_cema is None:
        return norm, None
    real = flat[2 * n :].view(*tmpl_cema.shape, 2).to(torch.view_as_real(tmpl_cema).dtype)
    return norm, torch.view_as_complex(real.contiguous())


class _Receiver:
    """Receives posted up front for every layer's (and the final norm's) incoming state."""

    def __init__(self, template, src: int, group, comm: Comm, n_layers: int, dtype: torch.dtype) -> None:
        self.template, self.src, self.group, self.comm, self.dtype = template, src, group, comm, dtype
        self.pending = {}
        for i in range(n_layers + 1):
            ls = template.layers[i] if i < n_layers else None
            norm = ls.norm if ls is not None else template.final_norm
            flat = torch.empty_like(_pack(norm, None if ls is None else ls.cema, dtype))
            count = torch.empty_like(norm[0])
            tag = _TAGS_PER_STATE * i
            self.pending[i] = (flat, count, dist.irecv(flat, src, group=group, tag=tag),
                               dist.irecv(count, src, group=group, tag=tag + 1))

    def get(self, i: int, anchor: torch.Tensor):
        flat, count, w_flat, w_count = self.pending.pop(i)
        w_flat.wait()
        w_count.wait()
        if torch.is_grad_enabled():
            flat = _RecvState.apply(anchor, flat, self.src, self.group, _TAGS_PER_STATE * i, self.comm)
        ls = self.template.layers[i] if i < len(self.template.layers) else None
        return _unpack(flat, count, ls.norm if ls is not None else self.template.final_norm,
                       None if ls is None else ls.cema)


def _send(i: int, norm, cema, dst: int, group, comm: Comm, dtype) -> torch.Tensor | None:
    """Send one state to the next rank; returns the zero scalar that carries its gradient (or None)."""
    tag = _TAGS_PER_STATE * i
    flat = _pack(norm, cema, dtype)
    comm.isend(norm[0], dst, group, tag + 1)
    if torch.is_grad_enabled() and flat.requires_grad:
        return _SendState.apply(flat, dst, group, tag, comm)
    comm.isend(flat, dst, group, tag)
    return None


def chunk_parallel_loss(model: MegalodonLM, input_ids: torch.Tensor, targets: torch.Tensor, group,
                        comm: Comm) -> torch.Tensor:
    """Summed cross-entropy of this rank's piece (B, P) of every sequence, with the incoming state from the
    previous chunk rank; the state hand-off terms (zeros carrying gradients) are included in the result.

    `group` is the chunk process group (its ranks in sequence order). Call `comm.wait()` after the backward.
    """
    cfg = model.config
    B, P = input_ids.shape
    if P % cfg.chunk_size:
        raise ValueError(f"each rank's piece ({P} tokens) must be a multiple of chunk_size {cfg.chunk_size}")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    first, last = rank == 0, rank == size - 1
    device = input_ids.device
    template = model.init_state(B, device)
    dtype = template.final_norm[1].dtype
    n_layers = len(model.layers)
    recv = None if first else _Receiver(template, dist.get_global_rank(group, rank - 1), group, comm, n_layers, dtype)
    dst = None if last else dist.get_global_rank(group, rank + 1)
    anchor = torch.zeros(0, device=device, requires_grad=True)  # makes received states part of the graph

    positions = torch.full((B,), rank * P, dtype=torch.long, device=device)
    info = StreamInfo(None, torch.full((B,), P, device=device), positions % cfg.chunk_size, not last)
    x = model.embed(input_ids)
    if model.emb_scale != 1.0:
        x = x * model.emb_scale
    x = F.dropout(x, cfg.dropout, model.training)
    freqs = model.rope.freqs
    handoff = []
    for i, block in enumerate(model.layers):
        ls = None
        if recv is not None:
            norm, cema = recv.get(i, anchor)
            ls = MegaLayerState(norm, cema, template.layers[i].attn_k, template.layers[i].attn_v)
        if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
            x, new_ls = checkpoint(block, x, ls, info, freqs, use_reentrant=False)
        else:
            x, new_ls = block(x, ls, info, freqs)
        if dst is not None:
            handoff.append(_send(i, new_ls.norm, new_ls.cema, dst, group, comm, dtype))
    final_in = None if recv is None else recv.get(n_layers, anchor)[0]
    x, final_stats = model.output.final_norm(x, final_in, None)
    if dst is not None:
        handoff.append(_send(n_layers, final_stats, None, dst, group, comm, dtype))
    logits = F.linear(x, model.output_weight)
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    for h in handoff:
        if h is not None:
            loss = loss + h
    return loss
