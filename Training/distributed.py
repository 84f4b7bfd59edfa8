"""torch.distributed for the training scripts: started by ``torchrun`` (NCCL on GPUs, gloo on
CPU), or a single process when no launcher set ``WORLD_SIZE``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

from SAMMed3DMoELib.device import select_device
from SAMMed3DMoELib.errors import SAMMed3DError


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, and its compute device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``PORT``) or run alone. Each rank uses ``cuda:LOCAL_RANK`` when the device is
    CUDA; the backend is NCCL on CUDA and gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = select_device(device)
    if target.type == "cuda" and world > 1:
        if local_rank >= torch.cuda.device_count():
            raise SAMMed3DError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                                "start at most one process per GPU (torchrun --nproc_per_node)")
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, target)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_gather_objects(ctx: DistContext, obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(ctx: DistContext, values: List[float]) -> List[float]:
    """Elementwise sum of a list of numbers over the ranks."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
