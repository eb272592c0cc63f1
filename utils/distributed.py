"""One process per device under `torchrun`, or a single process: the same code either way.

    ctx = init_distributed("cuda")   # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPU, gloo on CPU
    ctx.print("only rank 0 prints")
    total = all_reduce_sum(torch.tensor(...))
    close_distributed()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils.hardware import resolve_device


@dataclass(frozen=True)
class DistContext:
    """rank / world_size / local_rank of this process and its device (cuda:<local_rank> on GPU nodes)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1), else a single-process context.

    Under torchrun each process gets cuda:<LOCAL_RANK> on GPU (NCCL) or the CPU (gloo).
    """
    dev = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             f"use --nproc_per_node={torch.cuda.device_count()} or fewer.")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", **kwargs)
    return DistContext(rank, world_size, local_rank, dev)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (in place; `t` itself on a single process)."""
    if _active():
        dist.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] on a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
