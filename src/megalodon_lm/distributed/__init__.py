"""Distributed training on torch.distributed: torchrun setup and the (data x chunk) device mesh, DDP / FSDP2
wrapping with optional activation checkpointing, chunk parallelism (Megalodon's state hand-off from rank to
rank), and sharded checkpoints with torch.distributed.checkpoint. See docs/distributed.md."""

from .chunk_parallel import chunk_parallel_loss
from .env import DistContext, check_same_config, init_from_env, is_torchrun
from .parallelize import LossModule, wrap_model

__all__ = ["DistContext", "LossModule", "check_same_config", "chunk_parallel_loss", "init_from_env", "is_torchrun",
           "wrap_model"]
