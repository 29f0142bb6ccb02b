"""Make the processes a launcher started into one training job, on CPU as on GPUs."""

from __future__ import annotations

import os

import torch

from ..parallel.accelerate_cpu import allow_parallelism_config_on_cpu
from ..parallel.launch_config import hand_over_sharding
from ..parallel.layout import ParallelLayout
from .cpu_malloc import keep_freed_memory
from .log import say


def prepare_processes(layout: ParallelLayout) -> None:
    """Make a multi-process CPU launch (plain torchrun) a real gloo run, and let a tensor-parallel model train
    there. Without ACCELERATE_USE_CPU accelerate would see `DistributedType.NO` in every process and each would
    train alone, silently. A launch config of `distributed_type: FSDP` has been read into `layout` (`build_layout`):
    accelerate's own FSDP plugin is turned off, as it would shard the model a second time. On CPU, also keep freed
    memory for reuse between steps (`cpu_malloc`)."""
    hand_over_sharding()
    if torch.cuda.is_available():
        return
    tuned = keep_freed_memory()
    if tuned:
        say(tuned)
    if layout.world_size == 1:
        return
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    if layout.tensor_parallel_size > 1:
        allow_parallelism_config_on_cpu()


__all__ = ["prepare_processes"]
