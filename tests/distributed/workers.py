"""Functions run inside the spawned ranks (module level, so that spawn can import them)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megalodon_lm.models import MegalodonConfig, MegalodonLM

# Tiny, but with every piece that carries state: 2 layers, 2 heads, several norm groups and CEMA dims.
TINY = dict(vocab_size=48, num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=64,
            chunk_size=8, norm_num_groups=4)


def tiny_model(seed: int = 0, **overrides) -> MegalodonLM:
    torch.manual_seed(seed)
    return MegalodonLM(MegalodonConfig.from_preset("nano", **{**TINY, **overrides}))


def global_batch(batch: int, seq_len: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and targets, some targets ignored (-100), for the whole global batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, TINY["vocab_size"], (batch, seq_len), generator=g)
    y = torch.randint(0, TINY["vocab_size"], (batch, seq_len), generator=g)
    y[torch.rand(batch, seq_len, generator=g) < 0.2] = -100
    return x, y


def reference_grads(batch: int, seq_len: int, micro: int = 1,
                    dtype: torch.dtype = torch.float32) -> tuple[float, dict[str, torch.Tensor]]:
    """One process on the whole global batch: mean loss over scored targets and every gradient."""
    model = tiny_model().to(dtype)
    x, y = global_batch(batch * micro, seq_len)
    logits = model(x).logits
    n = int((y != -100).sum())
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                             reduction="sum") / n
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


def full_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.full_tensor() if hasattr(g, "full_tensor") else g


def grads_worker(rank: int, world: int, out: Path, cases: list[tuple]) -> None:
    """Per case (name, parallel, cp, batch, seq_len, micro[, dtype, activation checkpointing]): one distributed
    backward over the global batch (`micro` micro-batches); rank 0 saves loss and full gradients to
    <out>/<name>.pt."""
    from megalodon_lm.distributed.env import init_from_env
    from megalodon_lm.distributed.parallelize import wrap_model
    from megalodon_lm.distributed.train_step import distributed_backward

    for name, parallel, cp, batch, seq_len, micro, *extra in cases:
        dtype, ac = (extra + [torch.float32, False][len(extra):])[:2]
        ctx = init_from_env(cp, "cpu")  # the process group once, a mesh per case
        model = tiny_model().to(dtype)
        module = wrap_model(model, ctx, parallel, activation_checkpointing=ac)
        x, y = global_batch(batch * micro, seq_len)
        b, p = batch // ctx.dp_size, seq_len // ctx.cp_size
        batches = []
        for m in range(micro):
            rows = slice(m * batch + ctx.dp_rank * b, m * batch + (ctx.dp_rank + 1) * b)
            cols = slice(ctx.cp_rank * p, (ctx.cp_rank + 1) * p)
            batches.append((x[rows, cols], y[rows, cols]))
        loss = distributed_backward(module, batches, ctx, contextlib.nullcontext)
        grads = {n: full_grad(q).clone() for n, q in model.named_parameters()}
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, out / f"{name}.pt")


def train_worker(rank: int, world: int, out: Path, options: dict) -> None:
    """`megalodon_lm.train` on every rank (what `torchrun -m megalodon_lm train` runs)."""
    import megalodon_lm

    megalodon_lm.train(None, **options)


def per_rank_train_worker(rank: int, world: int, out: Path, options_by_rank: list[dict]) -> None:
    """Like `train_worker`, with each rank's own options (to test mismatches)."""
    import megalodon_lm

    megalodon_lm.train(None, **options_by_rank[rank])


def dying_worker(rank: int, world: int, out: Path) -> None:
    """Two DDP steps; rank 1 dies abruptly after the first. Rank 0 must raise, not hang."""
    import os

    from megalodon_lm.distributed.env import init_from_env
    from megalodon_lm.distributed.parallelize import wrap_model
    from megalodon_lm.distributed.train_step import distributed_backward

    ctx = init_from_env(1, "cpu")
    module = wrap_model(tiny_model(), ctx, "ddp")
    x, y = global_batch(2, 16)
    batch = [(x[rank : rank + 1], y[rank : rank + 1])]
    distributed_backward(module, batch, ctx, contextlib.nullcontext)
    if rank == 1:
        os._exit(3)
    distributed_backward(module, batch, ctx, contextlib.nullcontext)
