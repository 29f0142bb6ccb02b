"""How the processes split the work and the batch: tensor parallel x FSDP x replicas, micro and global batch.

The launch config only says how many processes start; `megahf.training.setup.build_layout` fits these sizes to
that world size."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import need, need_at_least
from .help import arg


@dataclass
class ParallelRecipe:
    micro_batch_size: int = arg("Samples per data-parallel rank per forward pass.", default=8)
    gradient_accumulation_steps: int = arg(
        "Micro-batches accumulated into one optimizer step (0: derived from global_batch_size, else 1).", default=0)
    global_batch_size: int = arg(
        "Samples per optimizer step over all ranks = micro_batch_size x data-parallel size x gradient "
        "accumulation, checked at launch (0: whatever the other two give).", default=0)
    tensor_parallel_size: int = arg("Tensor-parallel ranks per model replica (Megatron's --tensor-model-parallel-"
                                    "size); must divide the heads, query groups, FFN and padded vocabulary.",
                                    default=1)
    fsdp_size: int = arg("Data-parallel ranks over which FSDP2 shards parameters, gradients and optimizer state "
                         "(1: no sharding; must divide the data-parallel size).", default=1)
    sequence_parallel: bool = arg(
        "Megatron's sequence parallelism: the norms, dropouts and residual stream between the tensor-parallel layers "
        "hold 1/tensor_parallel_size of the sequence on each rank (needs tensor_parallel_size >= 2 and a seq_length "
        "divisible by it).", default=False)
    data_parallel_size: int = arg("Ranks with distinct batches = world size / tensor_parallel_size, checked at "
                                  "launch (0: derived).", default=0)

    def validate(self) -> None:
        need_at_least(self, 1, "micro_batch_size", "tensor_parallel_size", "fsdp_size")
        need_at_least(self, 0, "gradient_accumulation_steps", "global_batch_size", "data_parallel_size")
        need(self, not self.sequence_parallel or self.tensor_parallel_size >= 2, "sequence_parallel",
             f"it splits the sequence over the tensor-parallel ranks, and tensor_parallel_size="
             f"{self.tensor_parallel_size}; set tensor_parallel_size to 2 or more, or sequence_parallel to false")
        need(self, self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
             f"it must be a multiple of micro_batch_size={self.micro_batch_size}")


__all__ = ["ParallelRecipe"]
