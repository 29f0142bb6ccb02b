"""Shard a model over a tensor-parallel x FSDP2 mesh from transformers' `DistributedConfig`.

Two things transformers 5.24 does not do, in one place:

* `from_config` takes no `distributed_config`: `distribute_model` shards a randomly initialised model. Built with the
  same seed on every rank, the full model is identical everywhere, so each rank keeps its own slice of it and the
  sharded model equals the single-process one exactly.
* Under FSDP2 a tied output layer must be tied BEFORE `fully_shard` so that both modules share the one FSDP
  parameter (transformers ties after, and the head then multiplies by the still-sharded weight).
  `maybe_distribute_tied` is that order; drop it once transformers ties before sharding.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel
from transformers.distributed import DistributedConfig
from transformers.distributed.fsdp import apply_fully_sharded_data_parallelism
from transformers.distributed.tensor_parallel import apply_tensor_parallelism

from .rng import get_rng_tracker


def _tied_targets(model: PreTrainedModel) -> dict[str, str]:
    if not model.config.tie_word_embeddings:
        return {}
    return model.get_expanded_tied_weights_keys(all_submodels=True)


def maybe_distribute_tied(model: PreTrainedModel, distributed_config: DistributedConfig, mesh_manager):
    """transformers' `maybe_distribute_model` (TP, then FSDP2) with the tied head tied in between."""
    if mesh_manager is None:
        return model
    if distributed_config.pp_size > 1 or distributed_config.ep_size > 1:
        raise ValueError("megahf models support tensor parallelism and FSDP2; set pp_size=1 and ep_size=1.")
    model.config.distributed_config = distributed_config
    model._mesh_manager = mesh_manager
    model._device_mesh = mesh_manager.get_mesh(("pp", "fsdp", "tp"))
    model._is_distributed_loading_by_transformers = True
    model._tp_size = distributed_config.tp_size
    model._fsdp_size = distributed_config.fsdp_size
    tp_plan, ep_plan, fsdp_plan = model._resolve_parallel_plans(distributed_config)
    if distributed_config.tp_size > 1:
        model = apply_tensor_parallelism(model, mesh_manager.get_mesh("tp"), tp_plan)
        # The per-rank dropout stream, from the seed the model was built with (the same on every rank).
        get_rng_tracker().seed(torch.initial_seed(), mesh_manager.get_mesh("tp").get_local_rank())
    tied = _tied_targets(model)
    if tied:
        model.tie_weights()
        # The embedding and the head share one parameter: leave both to the root FSDP unit, which owns every
        # module that uses it.
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        fsdp_plan = {n: s for n, s in fsdp_plan.items() if model.get_submodule(n) not in (embedding, head)}
    if distributed_config.dp_size > 1:
        model = apply_fully_sharded_data_parallelism(model, mesh_manager, fsdp_plan, ep_plan)
    return model


def retie_gathered_state_dict(model: PreTrainedModel, state_dict: dict) -> dict:
    """Gathering a TP-sharded state dict makes a separate full tensor of each key, so a tied head no longer shares
    the embedding's storage and `save_pretrained` (which drops tied keys by storage) would write it twice: point
    every tied key back at its source tensor."""
    for target, source in _tied_targets(model).items():
        if target in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]
    return state_dict


def gathered_state_dict(model: torch.nn.Module, names: set[str] | None = None) -> dict:
    """`model.state_dict()` with its DTensors (tensor-parallel and FSDP2 shards), or only those named in `names`,
    gathered into full tensors (collective: every rank calls it, each gets the full tensors)."""
    return {key: value.full_tensor() if isinstance(value, DTensor) and (names is None or key in names) else value
            for key, value in model.state_dict().items()}


def distribute_model(model: PreTrainedModel, distributed_config: DistributedConfig | dict) -> PreTrainedModel:
    """Apply tensor parallelism and/or FSDP2 from `distributed_config` to a fully initialised `model`."""
    cls = type(model)
    if isinstance(distributed_config, dict):
        distributed_config = DistributedConfig(**distributed_config)
    distributed_config, _, mesh_manager = cls.prepare_distribute_model(distributed_config)
    # A tied head is the embedding's Parameter and would be sharded twice: take it off its module; the
    # distribution step ties it to the sharded embedding.
    for target in _tied_targets(model):
        module_name, _, param_name = target.rpartition(".")
        del model.get_submodule(module_name)._parameters[param_name]
    return cls.maybe_distribute_model(model, distributed_config, mesh_manager)
