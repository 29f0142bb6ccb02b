"""How a run's processes are arranged: pipeline stages x (replicas x FSDP) x tensor parallel, and the batch each step
takes.

Megatron's terms: the data-parallel size is the number of ranks that see distinct batches, world / (tp x pp); FSDP
shards
parameters, gradients and optimizer state over `fsdp_size` of them (Megatron's distributed optimizer), and the
rest are replicas (HSDP when both are above 1). The global batch is micro batch x data-parallel size x gradient
accumulation, in samples per optimizer step; under pipeline parallelism the accumulated micro-batches are the ones
that flow through the stages in one step (Megatron's number of micro-batches). Rank order, outermost first: pipeline
stage, replica, FSDP shard, tensor-parallel rank (Megatron's: the tensor-parallel ranks of a stage are neighbours,
the stages the farthest apart).

    layout = resolve_layout(world_size=4, tensor_parallel_size=2, fsdp_size=2, micro_batch_size=4,
                            global_batch_size=32)  # -> data_parallel_size 2, gradient_accumulation_steps 4

Every error names the recipe key, its value and the fix, and is raised before any process group or model exists.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """The parallel sizes or batch sizes do not fit the world size (the message names key, value and fix)."""


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tensor_parallel_size: int
    fsdp_size: int
    data_parallel_size: int  # ranks with distinct batches = world / (tp x pp) = fsdp x replicas
    micro_batch_size: int
    gradient_accumulation_steps: int  # under pipeline parallelism: the micro-batches of one step
    sequence_parallel: bool = False  # Megatron's: norms and dropouts on sequence shards of the TP ranks
    pipeline_parallel_size: int = 1
    virtual_pipeline_size: int = 1  # model chunks per pipeline rank
    pipeline_schedule: str = "1f1b"

    @property
    def replicas(self) -> int:
        return self.data_parallel_size // self.fsdp_size

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.data_parallel_size * self.gradient_accumulation_steps

    @property
    def pipelined(self) -> bool:
        return self.pipeline_parallel_size > 1

    @property
    def sharded(self) -> bool:
        """Whether transformers shards the model (TP and/or FSDP2); otherwise accelerate replicates it (DDP). A
        pipelined layout is neither: megahf's pipeline builds every stage (`pipeline.py`)."""
        return not self.pipelined and (self.tensor_parallel_size > 1 or self.fsdp_size > 1)

    def distributed_config(self):
        """transformers' `DistributedConfig` for a sharded layout (None for plain data parallelism)."""
        if not self.sharded:
            return None
        from transformers.distributed import DistributedConfig  # here: the recipe checks need no torch

        return DistributedConfig(tp_size=self.tensor_parallel_size, fsdp_size=self.fsdp_size,
                                 dp_replicate_size=self.replicas, enable_sequence_parallel=self.sequence_parallel)

    def describe(self) -> str:
        parts = [f"{self.world_size} process{'es' if self.world_size > 1 else ''}"]
        if self.pipelined:
            chunks = f", {self.virtual_pipeline_size} chunks per rank" if self.virtual_pipeline_size > 1 else ""
            parts.append(f"pipeline parallel {self.pipeline_parallel_size} ({self.pipeline_schedule}{chunks})")
        if self.tensor_parallel_size > 1:
            parts.append(f"tensor parallel {self.tensor_parallel_size}"
                         + (" (sequence parallel)" if self.sequence_parallel else ""))
        if self.fsdp_size > 1:
            parts.append(f"FSDP2 {self.fsdp_size}")
        if self.replicas > 1:
            parts.append(f"{'HSDP' if self.fsdp_size > 1 else 'DDP'} replicas {self.replicas}")
        steps = "micro-batches through the pipeline" if self.pipelined else "accumulation"
        return (f"{' x '.join(parts)}; global batch {self.global_batch_size} = micro {self.micro_batch_size} x "
                f"data parallel {self.data_parallel_size} x {steps} {self.gradient_accumulation_steps}")


def resolve_layout(
    world_size: int,
    tensor_parallel_size: int = 1,
    fsdp_size: int = 1,
    data_parallel_size: int = 0,
    micro_batch_size: int = 1,
    gradient_accumulation_steps: int = 0,
    global_batch_size: int = 0,
    sequence_parallel: bool = False,
    pipeline_parallel_size: int = 1,
    virtual_pipeline_size: int = 1,
    pipeline_schedule: str = "1f1b",
) -> ParallelLayout:
    """Check the sizes against `world_size` and derive what was left at 0 (data_parallel_size,
    gradient_accumulation_steps from global_batch_size, or 1)."""
    tp, fsdp, pp = tensor_parallel_size, fsdp_size, pipeline_parallel_size
    if sequence_parallel and tp < 2:
        raise LayoutError(f"sequence_parallel=True splits the sequence over the tensor-parallel ranks but "
                          f"tensor_parallel_size={tp}; set tensor_parallel_size to 2 or more")
    if world_size % tp:
        raise LayoutError(
            f"the world size {world_size} is not a multiple of tensor_parallel_size={tp}; launch a multiple of {tp} "
            f"processes or set tensor_parallel_size to a divisor of {world_size}"
        )
    if world_size % (tp * pp):
        raise LayoutError(
            f"the world size {world_size} is not a multiple of pipeline_parallel_size={pp} x tensor_parallel_size="
            f"{tp} = {pp * tp}; launch a multiple of {pp * tp} processes or change pipeline_parallel_size"
        )
    dp = world_size // (tp * pp)
    model_parallel = f"tensor_parallel_size={tp}" + (f" x pipeline_parallel_size={pp}" if pp > 1 else "")
    if data_parallel_size and data_parallel_size != dp:
        raise LayoutError(
            f"data_parallel_size={data_parallel_size} does not fit {world_size} processes at {model_parallel} "
            f"(which leave {dp} data-parallel ranks); set data_parallel_size to {dp}, or 0 to derive it"
        )
    if dp % fsdp:
        raise LayoutError(
            f"fsdp_size={fsdp} does not divide the data-parallel size {dp} (= {world_size} processes / "
            f"{model_parallel}); use an fsdp_size that divides {dp}, or launch {fsdp * tp * pp} x k processes"
        )
    per_step = micro_batch_size * dp
    if global_batch_size:
        if global_batch_size % per_step:
            raise LayoutError(
                f"global_batch_size={global_batch_size} is not a multiple of micro_batch_size={micro_batch_size} x "
                f"data-parallel size {dp} = {per_step}; use a multiple of {per_step} or change micro_batch_size"
            )
        derived = global_batch_size // per_step
        if gradient_accumulation_steps and gradient_accumulation_steps != derived:
            raise LayoutError(
                f"global_batch_size={global_batch_size} != micro_batch_size={micro_batch_size} x data-parallel size "
                f"{dp} x gradient_accumulation_steps={gradient_accumulation_steps}; set gradient_accumulation_steps "
                f"to {derived}, or 0 to derive it"
            )
        gradient_accumulation_steps = derived
    micro_batches = gradient_accumulation_steps or 1
    if pp > 1:
        _check_micro_batches(micro_batches, pp, pipeline_schedule, per_step)
    return ParallelLayout(world_size=world_size, tensor_parallel_size=tp, fsdp_size=fsdp, data_parallel_size=dp,
                          micro_batch_size=micro_batch_size, gradient_accumulation_steps=micro_batches,
                          sequence_parallel=sequence_parallel, pipeline_parallel_size=pp,
                          virtual_pipeline_size=virtual_pipeline_size, pipeline_schedule=pipeline_schedule)


def _check_micro_batches(micro_batches: int, pp: int, schedule: str, per_step: int) -> None:
    """Every stage must have work in the steady state: at least as many micro-batches as stages (Megatron's rule),
    and for the schedules that run several chunks per rank, rounds of exactly `pp` micro-batches."""
    if micro_batches < pp:
        raise LayoutError(
            f"pipeline_parallel_size={pp} needs at least {pp} micro-batches per step, and the global batch gives "
            f"{micro_batches} (global_batch_size / (micro_batch_size x data-parallel size) = global_batch_size / "
            f"{per_step}); set global_batch_size to at least {pp * per_step}, or lower micro_batch_size"
        )
    if schedule.startswith("interleaved") and micro_batches % pp:
        raise LayoutError(
            f"pipeline_schedule={schedule} runs the micro-batches in rounds of pipeline_parallel_size={pp}, and the "
            f"global batch gives {micro_batches}; set global_batch_size to a multiple of {pp * per_step}"
        )


__all__ = ["LayoutError", "ParallelLayout", "resolve_layout"]
