"""A small training loop for the synthetic probes (passkey, MQAR): any model with MegalodonLM's call convention.

Batches come from `batch_fn(step) -> (x, y)` (targets aligned with the logits, -100 = not scored), so a probe's
training is a pure function of its seed. AdamW, linear warm-up then cosine decay to 10%, gradient clipping at 1.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to base_lr over `warmup` steps, then cosine to 0.1 * base_lr at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_probe(model: nn.Module, batch_fn: Callable[[int], Batch], steps: int, lr: float, warmup: int = 10,
                weight_decay: float = 0.0, log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Train `model` in place for `steps` steps; returns {"final_loss", "seconds", "tokens"}.

    The loss is the mean cross-entropy over the scored targets of each batch.
    """
    if steps < 1 or not lr > 0 or warmup < 0:
        raise ValueError(f"steps must be >= 1, lr > 0 and warmup >= 0, got {steps}, {lr}, {warmup}")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    model.train()
    loss_value, tokens, t0 = float("nan"), 0, time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, min(warmup, steps - 1), steps)
        x, y = batch_fn(step)
        logits = model(x.to(device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=-100)
        if not torch.isfinite(loss):
            raise RuntimeError(f"probe training: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value, tokens = float(loss.detach()), tokens + x.numel()
        if log is not None and ((step + 1) % max(1, steps // 5) == 0 or step + 1 == steps):
            log(f"  probe step {step + 1}/{steps} loss {loss_value:.4f}")
    model.eval()
    return {"final_loss": loss_value, "seconds": time.perf_counter() - t0, "tokens": tokens}


@torch.no_grad()
def scored_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax == target, NLL in nats) at the scored positions of (B, L) inputs, as (B, n) tensors.

    Every row must have the same number n of scored targets (true for the probes' fixed layouts).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(x.to(device)).logits.float().cpu()
    model.train(was_training)
    mask = y != -100
    n = int(mask[0].sum())
    if not bool((mask.sum(1) == n).all()):
        raise ValueError("every row must have the same number of scored targets")
    picked = logits[mask].view(x.shape[0], n, -1)
    tgt = y[mask].view(x.shape[0], n)
    nll = F.cross_entropy(picked.flatten(0, 1), tgt.flatten(), reduction="none").view(x.shape[0], n)
    return picked.argmax(-1) == tgt, nll
