"""The zero-shot evaluations under a launcher (torchrun, `accelerate launch`): tensor parallel x data parallel.

* `--tensor-parallel-size` ranks hold one model replica, loaded with transformers' `distributed_config` as training
  loads it (`megahf.parallel`: the layout, the vocabulary-parallel output layer); the rest of the world is data
  parallel. The tensor-parallel ranks of a replica are consecutive (transformers' mesh puts `tp` innermost).
* The examples (LAMBADA passages, WikiText windows) are cut into `data_parallel_size` contiguous slices of
  near-equal length, the same on every rank whatever its number; replica r scores slice r.
* Every rank gathers the per-example results of every replica and reduces them in example order, so the figures
  do not depend on the world size: LAMBADA's flags are counted, WikiText's per-window float64 NLLs are summed in
  window order (one process sums them in the same order).

One process (no launcher) is rank 0 of a world of 1, and none of this talks to anyone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig

from ..parallel.layout import LayoutError, ParallelLayout, resolve_layout
from ..parallel.ranks import is_distributed, rank
from .common import EvaluationError


@dataclass(frozen=True)
class EvaluationLayout:
    """Where this process stands: `layout` (world, tensor parallel, data parallel) and its replica's slice."""

    layout: ParallelLayout
    rank: int

    @property
    def tensor_parallel_size(self) -> int:
        return self.layout.tensor_parallel_size

    @property
    def data_parallel_size(self) -> int:
        return self.layout.data_parallel_size

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def tensor_parallel_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    def distributed_config(self):
        """transformers' `DistributedConfig` for the model (None when each rank holds a whole model)."""
        return self.layout.distributed_config()

    def my_slice(self, num_items: int) -> slice:
        """This replica's contiguous slice of `num_items` examples (the lengths differ by at most one)."""
        r, n = self.data_parallel_rank, self.data_parallel_size
        return slice(num_items * r // n, num_items * (r + 1) // n)


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(model: str | os.PathLike, tensor_parallel_size: int, world: int | None = None) -> ParallelLayout:
    """Refuse, before any process group or weight exists, a tensor-parallel size that does not divide the model's
    heads (and the other sharded sizes) or the number of processes."""
    tp = tensor_parallel_size
    if tp < 1:
        raise EvaluationError(f"--tensor-parallel-size {tp}: must be at least 1")
    world = world_size() if world is None else world
    if tp > 1:
        config = AutoConfig.from_pretrained(model)
        check = getattr(config, "check_tensor_parallel", None)
        if check is None:
            raise EvaluationError(f"--tensor-parallel-size {tp}: --model {model} is a {config.model_type}, not a "
                                  "megahf model; tensor-parallel evaluation needs a megahf MegatronGPT (convert it "
                                  "first) or --tensor-parallel-size 1")
        try:
            check(tp)
        except ValueError as error:
            raise EvaluationError(f"--tensor-parallel-size {tp} does not fit --model {model}: "
                                  f"{str(error).replace('tp_size=', 'tensor_parallel_size=')}") from None
    try:
        return resolve_layout(world_size=world, tensor_parallel_size=tp)
    except LayoutError as error:
        raise EvaluationError(f"--tensor-parallel-size {tp}: {error}") from None


def start(layout: ParallelLayout, device: str) -> tuple[EvaluationLayout, bool]:
    """Join the launcher's process group (gloo on CPU, nccl on GPUs) unless one exists; returns this process's
    layout and whether this call created the group (then `finish` destroys it)."""
    created = False
    if layout.world_size > 1 and not is_distributed():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        created = True
    where = EvaluationLayout(layout=layout, rank=rank())
    return where, created


def check_mesh(model, where: EvaluationLayout) -> None:
    """The model's tensor-parallel group must be the consecutive ranks `my_slice` assumes (transformers' mesh has
    `tp` innermost; this fails loudly should that ever change)."""
    mesh = getattr(model, "_device_mesh", None)
    if where.tensor_parallel_size == 1 or mesh is None:
        return
    tp_mesh = mesh["tp"]
    first = where.data_parallel_rank * where.tensor_parallel_size
    expected = list(range(first, first + where.tensor_parallel_size))
    if tp_mesh.mesh.flatten().tolist() != expected:
        raise RuntimeError(f"rank {where.rank}: the tensor-parallel group is {tp_mesh.mesh.tolist()}, expected "
                           f"{expected}; megahf's evaluation assumes transformers' mesh puts tp innermost")


def gather_in_order(local: list[Any], where: EvaluationLayout) -> list[Any]:
    """Every replica's `local` results (one per example of its slice), concatenated in example order, on every
    rank. The tensor-parallel ranks of a replica hold the same results; the first one's are taken."""
    if where.layout.world_size == 1:
        return list(local)
    gathered: list[Any] = [None] * where.layout.world_size
    dist.all_gather_object(gathered, (where.data_parallel_rank, where.tensor_parallel_rank, local))
    ordered = sorted(((dp, values) for dp, tp, values in gathered if tp == 0), key=lambda item: item[0])
    return [value for _, values in ordered for value in values]


def finish(created: bool) -> None:
    """Leave the process group this evaluation created (no barrier: after an error the others may never come)."""
    if created and is_distributed():
        dist.destroy_process_group()


__all__ = ["EvaluationLayout", "check_layout", "check_mesh", "finish", "gather_in_order", "start", "world_size"]
