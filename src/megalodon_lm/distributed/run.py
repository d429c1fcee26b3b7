"""The training loop's view of a distributed run: what `megalodon_lm.training.trainer` calls under torchrun.

Rank 0 alone writes the run directory (configs, tokenizer, metrics, the final consolidation and sample); every
rank takes part in the forward/backward, the optimizer step, evaluation and sharded checkpoints. Decisions
that depend on a rank's clock or signals (--max-time, the schedule horizon, SIGTERM) are agreed on through
rank 0, so all ranks leave the loop at the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..models import MegalodonLM
from .checkpoint_dcp import consolidate, load_sharded, save_sharded
from .env import DistContext, check_same_config, destroy, init_from_env
from .parallelize import resolve_parallel, unwrap, wrap_model
from .train_step import check_chunk_split, distributed_backward, local_batch

# Options that only change how a rank displays progress may differ between ranks.
PER_RANK_OPTIONS = frozenset({"progress"})


class NullMetrics:
    """Ranks other than 0 log nothing."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class DistributedRun:
    """Process group, mesh, wrapped model and the collective pieces of one training run."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.ctx: DistContext = init_from_env(cfg.chunk_parallel, cfg.device)
        try:
            check_same_config(cfg.to_dict(), PER_RANK_OPTIONS)
            self.kind = resolve_parallel(cfg.parallel, self.ctx.world_size)
            if cfg.compile:
                raise ValueError("--compile is supported in single-process runs only (not under torchrun yet)")
            if self.kind == "fsdp" and self.ctx.cp_size > 1:
                raise ValueError("--chunk-parallel with --parallel fsdp is not supported; use --parallel ddp")
        except BaseException:
            destroy()
            raise
        self.global_batch = cfg.batch_size * self.ctx.dp_size
        self.module: torch.nn.Module | None = None

    # ------------------------------------------------------------------ roles and agreement
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. tokenising into the shared cache), then the others."""
        if not self.is_main:
            dist.barrier()
        yield
        if self.is_main:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0])

    def from_main(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.broadcast(t, 0)
        return int(t[0])

    # ------------------------------------------------------------------ model and steps
    def check_model(self, model_config) -> None:
        check_chunk_split(self.cfg.seq_len, self.ctx.cp_size, model_config.chunk_size)

    def wrap(self, model: MegalodonLM) -> torch.nn.Module:
        self.module = wrap_model(model.to(self.device), self.ctx, self.kind, self.cfg.activation_checkpointing)
        return self.module

    @property
    def eval_module(self) -> torch.nn.Module:
        """What `evaluate` calls: the LossModule (model outputs for targets=None), outside DDP."""
        return unwrap(self.module)

    def resume_batch(self, trainer_state: dict[str, Any]) -> None:
        """A resumed run keeps its global batch, whatever the number of data-parallel ranks now."""
        self.global_batch = int(trainer_state.get("global_batch", self.global_batch))
        if self.global_batch % self.ctx.dp_size:
            raise ValueError(f"the resumed run's global batch ({self.global_batch} sequences) is not divisible by "
                             f"the {self.ctx.dp_size} data-parallel ranks")

    def backward(self, data, step: int, autocast) -> float:
        cfg = self.cfg
        batches = [local_batch(data, self.global_batch, cfg.seq_len, step * cfg.grad_accum + m, cfg.seed, self.ctx)
                   for m in range(cfg.grad_accum)]
        return distributed_backward(self.module, batches, self.ctx, autocast)

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "world_size": self.ctx.world_size, "global_batch": self.global_batch,
                "parallel": self.kind, "chunk_parallel": self.ctx.cp_size}

    def save(self, run_dir: Path, step: int, optimizer, scheduler_state, trainer_state, keep_last) -> Path:
        return save_sharded(run_dir, step, self.module, optimizer, scheduler_state,
                            self.trainer_state(trainer_state), keep_last, self.ctx)

    def load(self, ckpt: Path, optimizer, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
        state, sched = load_sharded(ckpt, self.module, optimizer, self.ctx, verify)
        self.resume_batch(state)
        return state, sched

    def finish(self, ckpt: Path) -> MegalodonLM | None:
        """Rank 0 consolidates the final checkpoint and returns a plain model holding its weights (for the
        end-of-training sample); other ranks return None."""
        model = None
        if self.is_main:
            consolidate(ckpt)
            from ..training.loading import load_model_weights

            model = MegalodonLM(unwrap(self.module).model.config)
            load_model_weights(ckpt, model)
            model.eval()
        dist.barrier()
        return model

    def close(self) -> None:
        destroy()
