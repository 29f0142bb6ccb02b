"""Make the processes a launcher started into one training job, on CPU as on GPUs."""

from __future__ import annotations

import os

import torch

from ..parallel.accelerate_cpu import allow_parallelism_config_on_cpu
from ..parallel.layout import ParallelLayout
from ..recipe import RecipeError
from .cpu_malloc import keep_freed_memory
from .log import say


def prepare_processes(layout: ParallelLayout) -> None:
    """Make a multi-process CPU launch (plain torchrun) a real gloo run, and let a tensor-parallel model train
    there. Without ACCELERATE_USE_CPU accelerate would see `DistributedType.NO` in every process and each would
    train alone, silently. On CPU, also keep freed memory for reuse between steps (`cpu_malloc`)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise RecipeError(
            "the launch config enables accelerate's FSDP plugin (distributed_type: FSDP), which would shard the model "
            "a second time: megahf shards it from the recipe's fsdp_size and tensor_parallel_size; launch with a "
            "MULTI_GPU config such as recipes/accelerate/fsdp2.yaml"
        )
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
