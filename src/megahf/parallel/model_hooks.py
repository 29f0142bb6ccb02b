"""What megahf adds when one of its models is distributed, attached to the model classes by `megahf.parallel`.

The modeling files are plain transformers code that loads without megahf (Hub remote code); transformers then
shards them from their plans alone. With megahf installed, `attach_parallel_hooks` gives their `PreTrainedModel`
base classes the two hooks transformers calls, so that `from_pretrained(..., distributed_config=...)` and
`megahf.parallel.distribute_model` both:

* refuse a tensor-parallel size that does not divide the model, before anything is sharded or loaded;
* split the output layer along the vocabulary and compute the loss on the shards (`vocab_parallel.py`), the chunked
  training loss (`loss_chunk_size`) included;
* tie a tied output layer before FSDP2 shards it, and save it once (`distribute.py`);
* shard peft LoRA adapters as their base layers (`lora.py`);
* draw the dropout of each rank's attention heads from its own RNG stream, and with
  `DistributedConfig(enable_sequence_parallel=True)` run the norms and dropouts on sequence shards
  (`rng.py`, `sequence_parallel.py`).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .distribute import maybe_distribute_tied, retie_gathered_state_dict
from .lora import lora_tp_plan
from .sequence_parallel import check_sequence_parallel, model_parallel_rng_plan, sequence_parallel_plan
from .vocab_parallel import parallel_chunked_causal_lm_loss, use_vocab_parallel_output


def use_parallel_chunked_loss(model) -> None:
    if hasattr(model, "chunked_loss_function"):
        model.chunked_loss_function = parallel_chunked_causal_lm_loss  # vocabulary shards, FSDP2 units


def tensor_parallel_plan(model, tp_size: int, sequence_parallel: bool) -> dict[str, str]:
    """The model's tensor-parallel plan with megahf's additions (the vocabulary-parallel loss, each rank's dropout
    stream, sequence parallelism, LoRA adapters); refuses a size that does not divide the model."""
    model.config.check_tensor_parallel(tp_size)
    use_vocab_parallel_output(model)
    plan = {**model._tp_plan, **model_parallel_rng_plan(model)}
    if sequence_parallel:
        check_sequence_parallel(model)
        plan.update(sequence_parallel_plan(model))
    return lora_tp_plan(model, plan)


def _maybe_distribute_model(cls, model, distributed_config, mesh_manager):
    if distributed_config is not None:
        use_parallel_chunked_loss(model)
    if distributed_config is not None and (distributed_config.tp_size or 1) > 1:
        model._tp_plan = tensor_parallel_plan(model, distributed_config.tp_size,
                                              distributed_config.enable_sequence_parallel)
    elif distributed_config is not None and distributed_config.enable_sequence_parallel:
        raise ValueError("enable_sequence_parallel needs tp_size >= 2: the sequence is split over the "
                         "tensor-parallel ranks.")
    return maybe_distribute_tied(model, distributed_config, mesh_manager)


def _gather_sharded_state_dict_for_save(self, model_to_save, state_dict, distributed_config, **kwargs):
    # A gathered tied head is a copy of the embedding: re-tie it so that the checkpoint holds it once.
    state_dict = PreTrainedModel.gather_sharded_state_dict_for_save(
        self, model_to_save, state_dict, distributed_config, **kwargs
    )
    return retie_gathered_state_dict(model_to_save, state_dict)


def attach_parallel_hooks(base_class: type[PreTrainedModel]) -> None:
    base_class.maybe_distribute_model = classmethod(_maybe_distribute_model)
    base_class.gather_sharded_state_dict_for_save = _gather_sharded_state_dict_for_save
