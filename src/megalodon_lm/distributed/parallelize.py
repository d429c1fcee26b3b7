"""Data parallelism (DDP or FSDP2 with one `fully_shard` unit per block), activation checkpointing, and the
loss module that both wrap: the global-token-normalised loss of one micro-batch, plain or chunk-parallel."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ..models import MegalodonLM
from .chunk_parallel import Comm, chunk_parallel_loss
from .env import DistContext

PARALLEL_CHOICES = ("auto", "ddp", "fsdp", "none")


class LossModule(nn.Module):
    """`forward(input_ids, targets, comm)` -> summed cross-entropy of this rank's tokens (a scalar);
    `forward(input_ids)` -> the model's output on whole sequences (evaluation, on every rank).

    DDP and FSDP2 wrap this module rather than the model, so that the chunk-parallel forward (which calls the
    blocks one by one) runs inside the wrapper's forward and its hooks. State-dict keys are "model.<name>".
    """

    def __init__(self, model: MegalodonLM, chunk_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_group = chunk_group

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, comm: Comm | None = None):
        if targets is None:
            return self.model(input_ids)
        if self.chunk_group is not None:
            if comm is None:
                raise ValueError("the chunk-parallel loss needs a Comm to track its sends and receives")
            return chunk_parallel_loss(self.model, input_ids, targets, self.chunk_group, comm)
        logits = self.model(input_ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def resolve_parallel(parallel: str, world_size: int) -> str:
    """auto: DDP with several processes, nothing with one. 'none' with several processes is an error (no
    gradient synchronisation)."""
    if parallel not in PARALLEL_CHOICES:
        raise ValueError(f"--parallel must be one of {', '.join(PARALLEL_CHOICES)}, got {parallel!r}")
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise ValueError(f"--parallel none cannot train on {world_size} processes (gradients would not be "
                         "synchronised); use ddp or fsdp")
    return parallel


def wrap_model(model: MegalodonLM, ctx: DistContext, parallel: str,
               activation_checkpointing: bool = False) -> nn.Module:
    """The module to train: LossModule(model) wrapped by DDP, sharded with FSDP2, or as is.

    Gradients are averaged over all world_size ranks (data and chunk dimensions together); the caller scales
    each rank's summed loss by world_size / (global count of scored tokens), so the average is the gradient of
    the global mean loss. FSDP2 shards over all ranks: one unit per block plus the root (embedding, final norm,
    output); its mixed-precision policy keeps fp32 parameters and reduces gradients in fp32 (bf16 compute
    comes from autocast, as in single-process runs).
    """
    if activation_checkpointing:
        model.gradient_checkpointing = True  # per block, non-reentrant (see MegalodonLM.forward)
    module = LossModule(model, ctx.chunk_group if ctx.cp_size > 1 else None)
    kind = resolve_parallel(parallel, ctx.world_size)
    if kind == "fsdp" and ctx.cp_size > 1:
        # FSDP2's all-gathers and (on gloo, blocking) reduce-scatters are collectives over the chunk ranks too,
        # which run one layer apart in the hand-off wavefront: they would wait on each other.
        raise ValueError("--chunk-parallel with --parallel fsdp is not supported; use --parallel ddp")
    if kind == "ddp":
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Buffers (the TimestepNorm priors) are constant and identical on every rank: no per-step broadcast.
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)
    if kind == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in model.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def unwrap(module: nn.Module) -> LossModule:
    """The LossModule inside a DDP wrapper (FSDP2 modifies modules in place: nothing to unwrap)."""
    return module.module if isinstance(module, DistributedDataParallel) else module
