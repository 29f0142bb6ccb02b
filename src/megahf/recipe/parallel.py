"""How the processes split the work and the batch: pipeline stages x tensor parallel x FSDP x replicas, micro and
global batch.

The launch config says how many processes start, and, when it is accelerate's `distributed_type: FSDP`, that the
data-parallel ranks shard (read as fsdp_size where this says 0: `megahf.parallel.launch_config`);
`megahf.training.setup.build_layout` fits these sizes to that world size."""

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
                         "(1: no sharding; must divide the data-parallel size; 0: what the launch config says, i.e. "
                         "every data-parallel rank under an accelerate config of distributed_type: FSDP, else 1).",
                         default=0)
    sequence_parallel: bool = arg(
        "Megatron's sequence parallelism: the norms, dropouts and residual stream between the tensor-parallel layers "
        "hold 1/tensor_parallel_size of the sequence on each rank (needs tensor_parallel_size >= 2 and a seq_length "
        "divisible by it).", default=False)
    data_parallel_size: int = arg("Ranks with distinct batches = world size / (tensor_parallel_size x "
                                  "pipeline_parallel_size), checked at launch (0: derived).", default=0)
    pipeline_parallel_size: int = arg(
        "Pipeline stages (Megatron's --pipeline-model-parallel-size): the layers are split over this many groups of "
        "ranks, the outermost dimension of the layout; each optimizer step runs its micro-batches (global batch / "
        "(micro_batch_size x data-parallel size)) through them on pipeline_schedule.", default=1)
    virtual_pipeline_size: int = arg(
        "Model chunks per pipeline rank (Megatron's virtual pipeline stages): 2 or more with interleaved-1f1b and "
        "interleaved-zb (the bubble shrinks by this factor), 1 otherwise.", default=1)
    pipeline_schedule: str = arg(
        "How the micro-batches flow through the stages (torch.distributed.pipelining's schedules): 1f1b, gpipe, "
        "interleaved-1f1b, interleaved-zb (zero bubble: the weight gradients fill the bubble).", default="1f1b")

    def validate(self) -> None:
        need_at_least(self, 1, "micro_batch_size", "tensor_parallel_size", "pipeline_parallel_size",
                      "virtual_pipeline_size")
        need_at_least(self, 0, "fsdp_size", "gradient_accumulation_steps", "global_batch_size", "data_parallel_size")
        need(self, not self.sequence_parallel or self.tensor_parallel_size >= 2, "sequence_parallel",
             f"it splits the sequence over the tensor-parallel ranks, and tensor_parallel_size="
             f"{self.tensor_parallel_size}; set tensor_parallel_size to 2 or more, or sequence_parallel to false")
        need(self, self.global_batch_size % self.micro_batch_size == 0, "global_batch_size",
             f"it must be a multiple of micro_batch_size={self.micro_batch_size}")
        self._validate_pipeline()

    def _validate_pipeline(self) -> None:
        schedules = ", ".join(PIPELINE_SCHEDULES)
        need(self, self.pipeline_schedule in PIPELINE_SCHEDULES, "pipeline_schedule", f"use one of {schedules}")
        chunks = PIPELINE_SCHEDULES[self.pipeline_schedule]
        v = self.virtual_pipeline_size
        if chunks == 1:
            need(self, v == 1, "virtual_pipeline_size",
                 f"pipeline_schedule={self.pipeline_schedule} runs one model chunk per rank; set "
                 "virtual_pipeline_size: 1, or pipeline_schedule: interleaved-1f1b")
        else:
            need(self, v >= 2, "virtual_pipeline_size",
                 f"pipeline_schedule={self.pipeline_schedule} interleaves several model chunks per rank; set "
                 "virtual_pipeline_size to 2 or more, or pipeline_schedule: 1f1b")
        if self.pipeline_parallel_size == 1:
            need(self, v == 1, "virtual_pipeline_size",
                 "it splits the stages of a pipeline, and pipeline_parallel_size=1; set pipeline_parallel_size to "
                 "2 or more, or virtual_pipeline_size: 1")


# Model chunks per pipeline rank each schedule runs (0: two or more).
PIPELINE_SCHEDULES = {"1f1b": 1, "gpipe": 1, "interleaved-1f1b": 0, "interleaved-zb": 0}


__all__ = ["PIPELINE_SCHEDULES", "ParallelRecipe"]
