"""Process-group setup from torchrun's environment, the (data x chunk) device mesh, cross-rank checks.

torchrun (and SLURM via `srun torchrun ...`) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_from_env` reads them, so single- and multi-node runs differ only in how torchrun is started. Every
collective runs under a timeout (MEGALODON_DIST_TIMEOUT seconds, default 600), so a dead rank or a rank that
never arrives surfaces as an error instead of a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

DEFAULT_TIMEOUT_S = 600.0


def is_torchrun() -> bool:
    """True when this process was started by torchrun (or anything else that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def dist_timeout() -> timedelta:
    raw = os.environ.get("MEGALODON_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError as exc:
        raise ValueError(f"MEGALODON_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from exc
    if seconds <= 0:
        raise ValueError(f"MEGALODON_DIST_TIMEOUT must be positive, got {raw!r}")
    return timedelta(seconds=seconds)


@dataclass
class DistContext:
    """Where this process sits: global rank, and its coordinates on the (data, chunk) mesh.

    Chunk ranks are contiguous: global rank = dp_rank * cp_size + cp_rank, so on a node with 8 GPUs and
    K = 2 the two halves of a sequence live on neighbouring devices.
    """

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int
    mesh: DeviceMesh  # dims ("data", "chunk")
    device: torch.device
    p2p_group: dist.ProcessGroup | None = None  # this rank's chunk ranks, used only for the state hand-off


    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def chunk_group(self) -> dist.ProcessGroup:
        """The chunk ranks of this rank, in sequence order, for point-to-point sends only.

        A group of its own: gloo implements some collectives with tagged point-to-point messages, so sharing
        a group with FSDP's all-gathers could mix the two streams of messages.
        """
        return self.p2p_group if self.p2p_group is not None else self.mesh.get_group("chunk")

    @property
    def data_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("data")

    def barrier(self) -> None:
        dist.barrier()


def init_from_env(chunk_parallel: int = 1, device: str = "auto") -> DistContext:
    """Initialise the default process group from torchrun's variables and build the (data, chunk) mesh.

    Backend: NCCL on CUDA, gloo on CPU. `chunk_parallel` (K) must divide the world size; the data-parallel
    size is world_size / K.
    """
    if not is_torchrun():
        raise RuntimeError("not started by torchrun: RANK and WORLD_SIZE are not set")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if chunk_parallel < 1 or world % chunk_parallel:
        raise ValueError(f"--chunk-parallel {chunk_parallel} must be >= 1 and divide the number of processes "
                         f"({world})")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=dist_timeout(),
                                **({"device_id": dev} if use_cuda else {}))
    mesh = init_device_mesh(dev.type, (world // chunk_parallel, chunk_parallel), mesh_dim_names=("data", "chunk"))
    p2p = None
    if chunk_parallel > 1:
        for d in range(world // chunk_parallel):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(d * chunk_parallel, (d + 1) * chunk_parallel)), timeout=dist_timeout())
            if d == rank // chunk_parallel:
                p2p = group
    return DistContext(rank, world, local_rank, mesh.get_local_rank("data"), world // chunk_parallel,
                       mesh.get_local_rank("chunk"), chunk_parallel, mesh, dev, p2p)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(options: dict[str, Any], ignore: frozenset[str] = frozenset()) -> None:
    """Every rank must run the same configuration: compare digests, name the differing options.

    Run-time options that may legitimately differ per rank (e.g. progress display) go in `ignore`.
    """
    mine = {k: v for k, v in options.items() if k not in ignore}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (_digest(mine), mine))
    ref_digest, ref = gathered[0]
    for rank, (digest, other) in enumerate(gathered):
        if digest != ref_digest:
            keys = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise ValueError(f"rank {rank}'s configuration differs from rank 0's in: {', '.join(keys)} "
                             "(every rank must be started with the same options)")


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
