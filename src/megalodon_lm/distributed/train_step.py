"""One distributed optimizer step's forward/backward: each rank's shard of the global batch, the loss
normalised by the global count of scored tokens, gradients averaged over the whole mesh by DDP/FSDP2."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..data.dataset import sample_batch
from .chunk_parallel import Comm
from .env import DistContext


def check_chunk_split(seq_len: int, cp_size: int, chunk_size: int) -> None:
    if cp_size > 1 and seq_len % (cp_size * chunk_size):
        raise ValueError(f"--seq-len {seq_len} must be divisible by --chunk-parallel x chunk_size = {cp_size} x "
                         f"{chunk_size} = {cp_size * chunk_size} (each rank's piece is a whole number of chunks)")


def local_batch(corpus, global_batch: int, seq_len: int, index: int, seed: int,
                ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows and columns of the global batch `index` (x, y: (global_batch / dp, seq_len / K)).

    The global batch is what one process with batch `global_batch` draws (`sample_batch`), whatever the
    number of ranks: data-parallel rank d takes rows [d b, (d + 1) b), chunk rank c the columns
    [c P, (c + 1) P). A run therefore computes the same thing at any world size, and can resume on another.
    """
    if global_batch % ctx.dp_size:
        raise ValueError(f"the global batch ({global_batch} sequences) is not divisible by the {ctx.dp_size} "
                         "data-parallel ranks")
    b, p = global_batch // ctx.dp_size, seq_len // ctx.cp_size
    x, y = sample_batch(corpus, global_batch, seq_len, index, seed)
    rows, cols = slice(ctx.dp_rank * b, (ctx.dp_rank + 1) * b), slice(ctx.cp_rank * p, (ctx.cp_rank + 1) * p)
    return x[rows, cols].contiguous(), y[rows, cols].contiguous()


def distributed_backward(module: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         ctx: DistContext, autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Forward/backward of this rank's micro-batches; returns the global mean loss per scored token.

    Every rank's summed loss is scaled by world_size / n_scored_global (the wrappers average gradients over
    world_size ranks), so the result equals one process on the whole global batch.
    """
    device = ctx.device
    n_local = sum(int((y != -100).sum()) for _, y in batches)
    counts = torch.tensor([float(n_local)], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    n_total = max(1.0, float(counts[0]))
    scale = ctx.world_size / n_total
    total = torch.zeros((), dtype=torch.float64, device=device)
    is_ddp = isinstance(module, DistributedDataParallel)
    for i, (x, y) in enumerate(batches):
        comm = Comm()
        # DDP: synchronise gradients once, on the last micro-batch.
        sync = contextlib.nullcontext() if not is_ddp or i == len(batches) - 1 else module.no_sync()
        with sync:
            with autocast():
                loss = module(x.to(device), y.to(device), comm)
            (loss * scale).backward()
        comm.wait()
        total += loss.detach().double()
    dist.all_reduce(total)
    return float(total) / n_total
