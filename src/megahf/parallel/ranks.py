"""Who this process is in a launch, and waiting for the others: the helpers every multi-process step uses.
Each works without a process group too (one process is rank 0 of 1)."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank; before the process group exists, the launcher's RANK (0 without a launcher), so that
    what rank 0 alone prints or writes early in a run is not done by every process."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def is_rank_zero() -> bool:
    return rank() == 0


def is_local_rank_zero() -> bool:
    """The first process on this machine (before or after the process group exists)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sum_over_ranks(value: float) -> float:
    """The sum of every rank's `value` (in float64), on every rank."""
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def broadcast_from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


__all__ = ["barrier", "broadcast_from_rank_zero", "is_distributed", "is_local_rank_zero", "is_rank_zero",
           "local_world_size", "rank", "sum_over_ranks"]
